"""`attention` as a transformers attention implementation: attn_implementation="eagle_attention".

    from eagle_fast.ops.attention_hf import register_transformers_attention
    register_transformers_attention()      # once per process; idempotent
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eagle_attention")

The name has no "flash" in it on purpose: transformers >= 5 treats every implementation name
containing "flash" as a flash-attn package or Hub kernel and tries to import one for it.

Any HF model whose attention goes through `ALL_ATTENTION_FUNCTIONS` (Llama, Qwen2, Mistral, CLIP,
SigLIP, Pix2Struct, ...) then runs on `eagle_fast.ops.attention`. Which path a call takes is
decided by the mask `eagle_attention_mask` builds for it (the mask function registered with
transformers' AttentionMaskInterface under the same name):

- no padding, no cache prefix: no mask; dense flash kernel (causal or bidirectional).
- padding, Sq == Sk, no cache prefix (training, prefill of a left-padded batch, a vision encoder
  with padded patches): the 2-D (B, S) padding mask, as for flash_attention_2. The call is
  unpadded to the real tokens (T, H, D), run on the varlen kernel with cu_seqlens from the mask,
  and scattered back; padded rows come out as zeros. Causality is per sequence, counted from its
  first real token, so left and right padding are both right.
- anything else (decoding or chunked prefill against a KV cache, static caches, sliding-window or
  packed-position masks): transformers' boolean (B, 1, Sq, Sk) sdpa mask, run on
  scaled_dot_product_attention; a mask-free decode step stays on the flash kernel.

Packed batches passed with flash-attention kwargs (`cu_seq_lens_q`, `max_length_q`, batch 1,
e.g. from `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` or
EagleLlamaForCausalLM's `packed_seq_lens`) run as varlen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eagle_fast.ops.attention import _bottom_right_mask, attention

NAME = "eagle_attention"


def eagle_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' mask-interface signature. Returns None (no padding), the 2-D (B, Sk) bool
    padding mask (a plain causal or bidirectional self-attention call with Sq == Sk and nothing
    cached before it: the varlen path), or whatever `sdpa_mask` builds (every other call)."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    plain = (
        mask_function in (causal_mask_function, bidirectional_mask_function)
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
    )
    if plain and (attention_mask is None or attention_mask.shape[-1] == kv_length):
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    if q_length not in (1, kv_length):
        # sdpa_mask may skip the mask of a static cache's prefill (Sk = the cache's size > Sq),
        # relying on sdpa's top-left causal alignment; ours is bottom-right (KV-cache decoding),
        # which would let the prompt see the empty slots after it. Only where both alignments
        # agree (Sq == 1 or Sq == Sk) may the mask be left out.
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def _unpadded(q, k, v, keep, causal, scale):
    """q (B, S, Hq, D), k/v (B, S, Hkv, D), keep (B, S) bool -> (B, S, Hq, D): the real tokens of
    each row packed into one (T, H, D) varlen call, zeros at padded positions. The real rows equal
    sdpa's under the padding mask (no real query sees a padded key); the padded rows, whose sdpa
    values depend on the mask's convention, are zeros like the kernels' empty rows. Gather and
    scatter are index ops: gradients reach the real rows of q, k and v only."""
    lens = keep.sum(1, dtype=torch.int32)  # (B,)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    rows, cols = keep.nonzero(as_tuple=True)  # (T,) each: row-major, so each row's tokens in order
    # advanced indexing gathers from the strided (B, S, H, D) views straight into (T, H, D)
    out = attention(
        q[rows, cols],
        k[rows, cols],
        v[rows, cols],
        causal=causal,
        scale=scale,
        cu_seqlens=cu,
        max_seqlen=int(lens.max()),
    )
    return out.new_zeros(q.shape).index_put((rows, cols), out)


def _autocast_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """One dtype for q, k and v, as sdpa would compute them. Under autocast, Llama's rotary
    embedding hands back q and k in fp32 while v comes from a bf16 projection: sdpa, on autocast's
    lower-precision list, casts all three to the autocast dtype, and so do we (a custom op is not
    autocast-aware). Outside autocast, mixed inputs are promoted."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    elif q.dtype == k.dtype == v.dtype:
        return q, k, v
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def eagle_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D),
    attention_mask None, a 2-D (B, Sk) padding mask (True = real token) or a 4-D mask
    broadcastable to (B, Hq, Sq, Sk) -> ((B, Sq, Hq, D), None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{NAME}: attention logit softcapping is not supported")
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"{NAME}: additive position bias is not supported")
    if dropout > 0.0 and module.training:
        raise ValueError(f"{NAME}: attention dropout is not supported (set the config's attention_dropout to 0)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    query, key, value = _autocast_dtypes(query, key, value)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and attention_mask is None and q.shape[0] == 1:
        out = attention(
            q[0], k[0], v[0], causal=causal, scale=scaling, cu_seqlens=cu, max_seqlen=kwargs.get("max_length_q")
        )
        return out[None], None
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask.bool()
        sq, sk = q.shape[1], k.shape[1]
        if sq == sk and keep.shape[1] == sk:
            return _unpadded(q, k, v, keep, causal, scaling), None
        # a 2-D mask on a call with cached keys (only reached when a caller builds masks itself):
        # padding of the last Sk keys, combined with the bottom-right causal pattern -> (B, 1, Sq, Sk)
        attention_mask = keep[:, None, None, -sk:]
        if causal:
            attention_mask = attention_mask & _bottom_right_mask(sq, sk, 0, q.device)
    if attention_mask is not None:
        causal = False  # the mask already holds the causal pattern
    return attention(q, k, v, causal=causal, scale=scaling, attn_mask=attention_mask), None


def register_transformers_attention() -> str:
    """Registers "eagle_attention" with transformers' attention and mask interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, eagle_attention_forward)
    AttentionMaskInterface.register(NAME, eagle_attention_mask)
    return NAME
