"""The LLM forward of one engine step over packed tokens and a paged KV cache.

Several sequences' new rows (a decode token each, or a chunk of a prompt) are packed into one
(T, hidden) block and run through the model's own modules and weights: the embeddings (or the
spliced image features), then per layer the input RMSNorm, the q/k/v projections, RoPE at each
row's own position, K/V written into the cache blocks, `ops.paged_attention` (causal within each
sequence, against its cached prefix), o_proj, the residual, the post-attention RMSNorm and the MLP,
exactly the order of transformers' LlamaDecoderLayer. Only each sequence's last row goes through
the final norm and the LM head (a (T, vocab) logits block would cost more than the layers on a
small LLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from eagle_fast.ops.paged_attention import paged_attention


@dataclass
class StepBatch:
    """The packed inputs of one step (all on the model's device)."""

    embeds: torch.Tensor  # (T, hidden) input embeddings, sequences one after another
    positions: torch.Tensor  # (T,) each row's position in its sequence
    slots: torch.Tensor  # (T,) int64 flat cache slot (block * block_size + offset) per row
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    seqlens_k: torch.Tensor  # (B,) int32, the new rows included
    block_table: torch.Tensor  # (B, max_blocks) int32
    max_seqlen_q: int
    last_rows: torch.Tensor  # (B,) int64 index of each sequence's last row in the packed block


def llm_layers(model):
    """The Llama parts of an EagleLlamaForCausalLM (or any LlamaForCausalLM)."""
    inner = model.model
    return inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb, model.lm_head


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's LLM."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


@torch.no_grad()
def paged_forward(model, batch: StepBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Runs the decoder layers over the packed rows, writing their K/V into k_cache / v_cache
    ((layers, num_blocks, block_size, Hkv, D) each); returns the logits (B, vocab) of each
    sequence's last row, in fp32."""
    _, layers, norm, rotary, head = llm_layers(model)
    h = batch.embeds[None]  # (1, T, hidden): the modules' batch-first layout
    cos, sin = rotary(h, batch.positions[None])
    nb, bs = k_cache.shape[1], k_cache.shape[2]
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        residual = h
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim)
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim)
        v = attn.v_proj(x).view(1, x.shape[1], -1, attn.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # (1, T, H, D) layout
        kc, vc = k_cache[i].view(nb * bs, *k_cache.shape[3:]), v_cache[i].view(nb * bs, *v_cache.shape[3:])
        kc.index_copy_(0, batch.slots, k[0].to(kc.dtype))
        vc.index_copy_(0, batch.slots, v[0].to(vc.dtype))
        o = paged_attention(
            q[0],
            k_cache[i],
            v_cache[i],
            batch.block_table,
            batch.cu_seqlens_q,
            batch.seqlens_k,
            scale=attn.scaling,
            max_seqlen_q=batch.max_seqlen_q,
            validate=False,
        )
        h = residual + attn.o_proj(o.reshape(1, x.shape[1], -1))
        residual = h
        h = residual + layer.mlp(layer.post_attention_layernorm(h))
    last = norm(h[0].index_select(0, batch.last_rows))
    return head(last).float()
