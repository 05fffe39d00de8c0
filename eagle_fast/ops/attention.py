"""attention: flash attention for the vision experts (non-causal) and the LLM (causal).

Layouts: dense q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); packed (T, H, D) with `cu_seqlens`
(B + 1,) for variable-length / packed sequences (self-attention: one cu_seqlens for q and k).
Grouped-query attention when Hq is a multiple of Hkv. Causal masks are aligned bottom-right (query
i sees keys j <= i + Sk - Sq: the right thing for a KV cache, as in flash-attn >= 2.1); a query
with no visible key outputs zeros.

Three parts, in order: the pure-torch math reference (the oracle), the registration of
`eagle_fast::attention` (+ its backward op, fake kernels, autograd: the dispatcher runs PyTorch's
own CPU flash kernel on CPU and the Triton kernels on CUDA), and the public `attention`. The op
has no C++ kernel, so its schema is declared here rather than in csrc/registration.cpp. An
additive or boolean `attn_mask` (padding masks) runs on `scaled_dot_product_attention`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from eagle_fast.ops._library import has_triton, reference_active

BACKENDS = ("auto", "flash", "triton", "sdpa", "reference")
_FORCED: contextvars.ContextVar[str] = contextvars.ContextVar("eagle_fast_attention_backend", default="auto")

# ----------------------------------------------------------------------------- reference


def _segments(cu_seqlens: torch.Tensor | None, n: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, n)]
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def _attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in fp32 (fp64 for fp64), one sequence at a time; q's dtype out."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens is not None:  # packed: each segment is a batch of one
        outs = [
            _attention_reference(q[None, a:b], k[None, a:b], v[None, a:b], causal, scale)[0]
            for a, b in _segments(cu_seqlens, q.shape[0])
        ]
        return torch.cat(outs) if outs else q.new_empty(q.shape)
    group = q.shape[2] // k.shape[2]
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    kf, vf = kf.repeat_interleave(group, 1), vf.repeat_interleave(group, 1)
    s = qf @ kf.transpose(-1, -2) * scale
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        i, j = torch.arange(sq, device=q.device)[:, None], torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(acc)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no visible key -> zeros
    return (p @ vf).transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------- CPU kernels
# PyTorch's CPU flash kernel (memory-efficient, returns the log-sum-exp) per sequence. It takes
# (B, H, S, D) with equal head counts and top-left causal masks, so GQA heads are expanded and a
# bottom-right causal mask with Sq != Sk is passed explicitly; rows with no visible key are left
# out of the call and stay zero.


def _cpu_segment(q, k, v, causal, scale):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq)."""
    b, sq, h, d = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    first = max(sq - sk, 0) if causal else 0  # rows before it see no key
    if sk == 0 or first >= sq:
        return q.new_zeros(q.shape), torch.full((b, h, sq), float("inf"), dtype=torch.float32)
    if sq == 1:
        causal = False  # one query row, aligned bottom-right: it sees every key (decoding)
    if group > 1 and not causal:
        return _cpu_segment_grouped(q, k, v, scale)
    qt = q[:, first:].transpose(1, 2)
    kt, vt = (x.transpose(1, 2) if group == 1 else x.transpose(1, 2).repeat_interleave(group, 1) for x in (k, v))
    mask = _bottom_right_mask(sq, sk, first, q.device, q.dtype) if causal and sq != sk else None
    o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, 0.0, causal and sq == sk, attn_mask=mask, scale=scale
    )
    if first == 0:  # the kernel's output is laid out (B, S, H, D) already
        return o.transpose(1, 2).contiguous(), l
    out = q.new_zeros(q.shape)
    lse = torch.full((b, h, sq), float("inf"), dtype=torch.float32)
    out[:, first:] = o.transpose(1, 2)
    lse[:, :, first:] = l
    return out, lse


def _cpu_segment_grouped(q, k, v, scale):
    """Unmasked GQA without expanding k/v: the `group` query heads sharing a kv head become extra
    query rows of it, q (B, Sq, Hkv*G, D) -> (B, Hkv, G*Sq, D), so a decoding step reads the cache
    in place instead of copying it G times."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.view(b, sq, hkv, h // hkv, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, h // hkv * sq, d)
    o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg, k.transpose(1, 2), v.transpose(1, 2), 0.0, False, scale=scale
    )
    # o (B, Hkv, G*Sq, D) -> (B, Sq, Hkv*G, D)
    out = o.reshape(b, hkv, h // hkv, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, h, d)
    return out.contiguous(), l.reshape(b, h, sq)


def _cpu_segment_backward(dout, q, k, v, out, lse, causal, scale):
    b, sq, h, d = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    first = max(sq - sk, 0) if causal else 0
    if sk == 0 or first >= sq:
        return dq, dk, dv
    qt, ot, dot = (x[:, first:].transpose(1, 2) for x in (q, out, dout))
    kt, vt = (x.transpose(1, 2) if group == 1 else x.transpose(1, 2).repeat_interleave(group, 1) for x in (k, v))
    mask = _bottom_right_mask(sq, sk, first, q.device, q.dtype) if causal and sq != sk else None
    gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dot, qt, kt, vt, ot, lse[:, :, first:].contiguous(), 0.0, causal and sq == sk, attn_mask=mask, scale=scale
    )
    dq[:, first:] = gq.transpose(1, 2)
    # expanded heads h*group + g -> kv head h
    dk.copy_(gk.unflatten(1, (k.shape[2], group)).sum(2).transpose(1, 2))
    dv.copy_(gv.unflatten(1, (v.shape[2], group)).sum(2).transpose(1, 2))
    return dq, dk, dv


def _bottom_right_mask(sq: int, sk: int, first: int, device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Rows first..sq-1 of the causal mask: bool (True = attend) or additive (0 / -inf) in dtype."""
    i = torch.arange(first, sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    visible = j <= i + (sk - sq)
    if dtype == torch.bool:
        return visible
    return torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _lse_rows(lse: torch.Tensor) -> torch.Tensor:
    """(B, H, S) -> (H, B*S), the layout the op returns (shared with the Triton kernels)."""
    return lse.permute(1, 0, 2).reshape(lse.shape[1], -1)


def _attention_cpu(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    if cu_seqlens is None:
        out, lse = _cpu_segment(q, k, v, causal, scale)
        return out, _lse_rows(lse).contiguous()
    out = q.new_zeros(q.shape)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    for a, b in _segments(cu_seqlens, q.shape[0]):
        o, l = _cpu_segment(q[None, a:b], k[None, a:b], v[None, a:b], causal, scale)
        out[a:b], lse[:, a:b] = o[0], l[0]
    return out, lse


def _attention_backward_cpu(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    if cu_seqlens is None:
        b, sq, h = q.shape[:3]
        return _cpu_segment_backward(dout, q, k, v, out, lse.reshape(h, b, sq).permute(1, 0, 2), causal, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b in _segments(cu_seqlens, q.shape[0]):
        g = _cpu_segment_backward(
            dout[None, a:b], q[None, a:b], k[None, a:b], v[None, a:b], out[None, a:b], lse[None, :, a:b], causal, scale
        )
        dq[a:b], dk[a:b], dv[a:b] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


# ----------------------------------------------------------------------------- registration


@torch.library.custom_op("eagle_fast::attention", mutates_args=(), device_types="cpu")
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_cpu(q, k, v, cu_seqlens, max_seqlen, causal, scale)


@torch.library.custom_op("eagle_fast::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward_cpu(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale)


def _register() -> None:
    if has_triton():
        from eagle_fast.triton_kernels.attention.flash import flash_attention_bwd_triton, flash_attention_fwd_triton

        _attention_op.register_kernel("cuda")(flash_attention_fwd_triton)
        _attention_backward_op.register_kernel("cuda")(flash_attention_bwd_triton)

    @_attention_op.register_fake
    def _fake(q, k, v, cu_seqlens, max_seqlen, causal, scale):
        total = q.shape[0] * q.shape[1] if q.dim() == 4 else q.shape[0]
        return q.new_empty(q.shape), q.new_empty((q.shape[-2], total), dtype=torch.float32)

    @_attention_backward_op.register_fake
    def _fake_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen, causal, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale

    def _backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.ops.eagle_fast.attention_backward(
            dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.scale
        )
        return dq, dk, dv, None, None, None, None

    _attention_op.register_autograd(_backward, setup_context=_setup)


_register()


class _TritonAttention(torch.autograd.Function):
    """The Triton kernels called directly (backend="triton"): on CPU tensors under
    TRITON_INTERPRET=1, which is how they are tested without a GPU."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        from eagle_fast.triton_kernels.attention.flash import flash_attention_fwd_triton

        out, lse = flash_attention_fwd_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.args = (max_seqlen, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        from eagle_fast.triton_kernels.attention.flash import flash_attention_bwd_triton

        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        max_seqlen, causal, scale = ctx.args
        dq, dk, dv = flash_attention_bwd_triton(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- public API


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Within the block, `attention(..., backend="auto")` (and so every model running on
    attn_implementation="eagle_attention") uses `name`: "flash", "triton", "sdpa" or "reference"
    ("flash" and "triton" for calls without attn_mask; masked calls stay on sdpa). Scoped like `torch.nn.attention.sdpa_kernel`; thread- and task-local."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r} ({', '.join(BACKENDS)})")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _check(q, k, v, cu_seqlens, max_seqlen, attn_mask) -> int:
    """Validates shapes, dtypes and devices; returns max_seqlen (0 when dense)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    ):
        raise ValueError(f"attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on {q.device}, {k.device}, {v.device}")
    dims = 3 if cu_seqlens is not None else 4
    layout = "(T, H, D) with cu_seqlens" if dims == 3 else "(B, S, H, D)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != dims:
            raise ValueError(f"attention: {name} has shape {tuple(x.shape)}, expected {layout}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: head dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"attention: {q.shape[-2]} query heads are not a multiple of {k.shape[-2]} kv heads")
    if dims == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if cu_seqlens is None:
        return 0
    if attn_mask is not None:
        raise ValueError("attention: attn_mask cannot be combined with cu_seqlens")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: packed q has {q.shape[0]} tokens, k has {k.shape[0]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"attention: cu_seqlens must be a 1-D int32 tensor of B + 1 offsets, got "
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    lengths = cu_seqlens.diff()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or bool((lengths < 0).any()):
        raise ValueError(
            f"attention: cu_seqlens must rise from 0 to the {q.shape[0]} packed tokens, got "
            f"{cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}"
        )
    longest = int(lengths.max())
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"attention: max_seqlen {max_seqlen} is shorter than a packed sequence ({longest})")
    return longest if max_seqlen is None else int(max_seqlen)


def _attention_sdpa(q, k, v, causal, scale, cu_seqlens, attn_mask):
    """scaled_dot_product_attention on (B, H, S, D) views; bottom-right causal masks made explicit."""
    if cu_seqlens is not None:
        outs = [
            _attention_sdpa(q[None, a:b], k[None, a:b], v[None, a:b], causal, scale, None, None)[0]
            for a, b in _segments(cu_seqlens, q.shape[0])
        ]
        return torch.cat(outs) if outs else q.new_empty(q.shape)
    sq, sk = q.shape[1], k.shape[1]
    mask = attn_mask
    if causal and sq != sk:
        causal_mask = _bottom_right_mask(sq, sk, 0, q.device)
        if mask is None:
            mask = causal_mask
        elif mask.dtype == torch.bool:
            mask = mask & causal_mask
        else:
            mask = mask.masked_fill(~causal_mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal and sq == sk,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    out = out.transpose(1, 2)
    if causal and sq > sk:  # rows with no visible key: zeros, like the flash kernels
        out = out.clone()
        out[:, : sq - sk] = 0
    return out.contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    attn_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Flash attention.

    Args:
        q: (B, Sq, Hq, D), or packed (T, Hq, D) with `cu_seqlens`; fp16, bf16, fp32 (fp64 on the
            sdpa and reference backends). Any strides with a contiguous last dim (HF's
            (B, H, S, D).transpose(1, 2) views are read in place).
        k, v: (B, Sk, Hkv, D) or packed (T, Hkv, D); Hq must be a multiple of Hkv (GQA).
        causal: mask future keys, aligned bottom-right (query i sees keys j <= i + Sk - Sq).
        scale: softmax scale, default 1 / sqrt(D).
        cu_seqlens: (B + 1,) int32 offsets of packed sequences in T (the same for q and k/v).
        max_seqlen: longest packed sequence; computed (one device sync) when omitted.
        attn_mask: additive float or boolean (True = attend) mask broadcastable to
            (B, Hq, Sq, Sk); runs on scaled_dot_product_attention.
        backend: "auto" (the dispatcher: PyTorch's CPU flash kernel on CPU, Triton on CUDA; sdpa
            when attn_mask is given), "flash" (that op explicitly), "triton" (the Triton kernels
            directly; on CPU only under TRITON_INTERPRET=1), "sdpa" or "reference" (fp32 math).
            `attention_backend(...)` changes what "auto" means within a block.

    Returns:
        Like q: (B, Sq, Hq, D) or (T, Hq, D), contiguous, differentiable in q, k and v.
    """
    longest = _check(q, k, v, cu_seqlens, max_seqlen, attn_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if backend == "auto":
        backend = "reference" if reference_active() else _FORCED.get()
        if attn_mask is not None and backend in ("flash", "triton"):
            backend = "sdpa"  # a forced kernel applies where it can; masked calls stay on sdpa
    if backend == "auto":
        flash_ok = (
            q.dtype != torch.float64
            and q.shape[-1] <= 256
            and (q.device.type == "cpu" or (q.device.type == "cuda" and has_triton()))
        )
        backend = "sdpa" if attn_mask is not None or not flash_ok else "flash"
    if backend == "reference":
        return _attention_reference(q, k, v, causal, scale, cu_seqlens, attn_mask)
    if backend == "sdpa":
        return _attention_sdpa(q, k, v, causal, scale, cu_seqlens, attn_mask)
    if backend not in ("flash", "triton"):
        raise ValueError(f"attention: unknown backend {backend!r} ({', '.join(BACKENDS)})")
    if attn_mask is not None:
        raise ValueError(f"attention: backend {backend!r} takes no attn_mask (use 'sdpa' or 'auto')")
    if q.dtype == torch.float64 or q.shape[-1] > 256:
        raise ValueError(
            f"attention: backend {backend!r} supports fp16/bf16/fp32 and head dims <= 256, got "
            f"{q.dtype}, D={q.shape[-1]}"
        )
    if backend == "triton":
        return _TritonAttention.apply(q, k, v, cu_seqlens, longest, causal, scale)
    return torch.ops.eagle_fast.attention(q, k, v, cu_seqlens, longest, causal, scale)[0]
