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
    q_lens: tuple[int, ...] = ()  # host copies of the new rows and key lengths per sequence: chunks of
    k_lens: tuple[int, ...] = ()  # DENSE_ROWS rows or more attend through the flash kernel


# A prompt chunk this long attends through `ops.attention` (the flash kernel, over its sequence's
# K/V gathered from the blocks once per layer) rather than `paged_attention`, whose row loop is
# made for decode: a 1,000-row prefill runs several times faster on the GEMM-based kernel.
DENSE_ROWS = 32


class _Split:
    """Which rows of a step take the dense path, and the paged path's inputs for the others."""

    def __init__(self, batch: StepBatch, block_size: int):
        self.dense = []  # (first row, rows, block ids (long), key length)
        keep = []
        cu = [0]
        for r, (n, kl) in enumerate(zip(batch.q_lens, batch.k_lens)):
            start = sum(batch.q_lens[:r])
            if n >= DENSE_ROWS:
                blocks = batch.block_table[r, : -(-kl // block_size)].long()
                self.dense.append((start, n, blocks, kl))
            else:
                keep.append(r)
                cu.append(cu[-1] + n)
        dev = batch.embeds.device
        self.rows = (
            torch.cat([torch.arange(sum(batch.q_lens[:r]), sum(batch.q_lens[: r + 1]), device=dev) for r in keep])
            if keep
            else None
        )
        if keep:
            idx = torch.tensor(keep, device=dev)
            self.cu = torch.tensor(cu, dtype=torch.int32, device=dev)
            self.seqlens_k = batch.seqlens_k.index_select(0, idx)
            self.block_table = batch.block_table.index_select(0, idx)
            self.max_q = max(batch.q_lens[r] for r in keep)


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
    split = _Split(batch, bs) if batch.q_lens and max(batch.q_lens) >= DENSE_ROWS else None
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
        if split is None or not split.dense:
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
        else:
            o = _split_attention(q[0], k_cache[i], v_cache[i], split, attn.scaling)
        h = residual + attn.o_proj(o.reshape(1, x.shape[1], -1))
        residual = h
        h = residual + layer.mlp(layer.post_attention_layernorm(h))
    last = norm(h[0].index_select(0, batch.last_rows))
    return head(last).float()


def _split_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, split: _Split, scale: float
) -> torch.Tensor:
    """q (T, H, D) -> (T, H, D): long chunks through the flash kernel over their gathered K/V
    (bottom-right causal: the chunk's rows see the cached prefix and the rows before them), the
    other rows through paged_attention."""
    from eagle_fast.ops.attention import attention

    o = torch.empty_like(q)
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    if split.rows is not None:
        o[split.rows] = paged_attention(
            q.index_select(0, split.rows),
            k_cache,
            v_cache,
            split.block_table,
            split.cu,
            split.seqlens_k,
            scale=scale,
            max_seqlen_q=split.max_q,
            validate=False,
        )
    for start, n, blocks, kl in split.dense:
        k = k_cache.index_select(0, blocks).reshape(-1, hkv, d)[:kl]
        v = v_cache.index_select(0, blocks).reshape(-1, hkv, d)[:kl]
        o[start : start + n] = attention(
            q[None, start : start + n], k[None].to(q.dtype), v[None].to(q.dtype), causal=True, scale=scale
        )[0]
    return o
