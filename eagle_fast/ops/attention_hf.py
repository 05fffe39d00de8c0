"""`attention` as a transformers attention implementation: attn_implementation="eagle_attention".

    from eagle_fast.ops.attention_hf import register_transformers_attention
    register_transformers_attention()      # once per process; idempotent
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eagle_attention")

The name has no "flash" in it on purpose: transformers >= 5 treats every implementation name
containing "flash" as a flash-attn package or Hub kernel and tries to import one for it.

Any HF model whose attention goes through `ALL_ATTENTION_FUNCTIONS` (Llama, Qwen2, Mistral, CLIP,
SigLIP, ...) then runs on `eagle_fast.ops.attention`. Masks are built as for "sdpa": none when
the batch has no padding (causal or bidirectional attention then runs on the flash kernels), a
boolean (B, 1, Sq, Sk) mask otherwise (that call runs on scaled_dot_product_attention). Packed
batches passed with flash-attention kwargs (`cu_seq_lens_q`, `max_length_q`, batch 1, e.g. from
`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`) run as varlen.
"""

from __future__ import annotations

import torch

from eagle_fast.ops.attention import attention

NAME = "eagle_attention"


def eagle_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None,
                                  **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D)
    -> ((B, Sq, Hq, D), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME}: attention logit softcapping is not supported")
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"{NAME}: additive position bias is not supported")
    if dropout > 0.0 and module.training:
        raise ValueError(f"{NAME}: attention dropout is not supported (set the config's attention_dropout to 0)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and attention_mask is None and q.shape[0] == 1:
        out = attention(q[0], k[0], v[0], causal=causal, scale=scaling, cu_seqlens=cu,
                        max_seqlen=kwargs.get("max_length_q"))
        return out[None], None
    if attention_mask is not None:
        causal = False  # the mask already holds the causal pattern
    return attention(q, k, v, causal=causal, scale=scaling, attn_mask=attention_mask), None


def register_transformers_attention() -> str:
    """Registers "eagle_attention" with transformers' attention and mask interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, eagle_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
