"""Triton kernels of eagle_fast::attention: flash attention forward and backward.

Layouts: dense q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); packed (varlen) q/k/v (T, H, D) with
cu_seqlens (B + 1,) int32 shared by queries and keys (self-attention over packed sequences). The
last dim must be contiguous; other strides are free. Grouped-query attention: query head h reads
key/value head h // (Hq // Hkv). Causal masking is aligned bottom-right (query i of a sequence
sees keys j <= i + Sk - Sq, as flash-attn >= 2.1 does); a query row with no visible key outputs 0.

  forward   _attn_fwd_kernel: one program per (BLOCK_M queries, batch * query head); online
            softmax in base 2 over BLOCK_N key tiles; writes out and the log-sum-exp (natural
            log, +inf for rows with no key) as lse (Hq, total queries), fp32.
  backward  delta = rowsum(dout * out) (torch), then two kernels without atomics:
            _attn_bwd_dkdv_kernel: one program per (BLOCK_N keys, batch * kv head), looping over
            the query heads of its group and the query tiles that see it;
            _attn_bwd_dq_kernel: one program per (BLOCK_M queries, batch * query head).

Scores and probabilities are fp32. On a GPU the products run in the input dtype on tensor cores
(fp32 inputs: IEEE fp32, no TF32); in the CPU interpreter (TRITON_INTERPRET=1) operands are upcast
to fp32 first, as bf16 arithmetic there is wrong. Outputs are rounded to nearest-even
(`cast_out`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from eagle_fast.triton_kernels.utils import cast_out, dot_acc

_LOG2E = 1.4426950408889634


@triton.jit
def _row_range(CU, b, SEQ, VARLEN: tl.constexpr):
    """(first row, length, first lse row) of sequence b. Rows address tensors as
    ptr + b * stride_b + row * stride_row: packed, stride_b is 0 and rows start at cu[b]; dense,
    rows start at 0. lse/delta rows are b * SEQ + i (dense) or cu[b] + i (packed)."""
    if VARLEN:
        start = tl.load(CU + b)
        seq = tl.load(CU + b + 1) - start
        lse_start = start
    else:
        start = b * 0
        seq = SEQ
        lse_start = b * SEQ
    return start, seq, lse_start


@triton.jit
def _query_program(CU, H, GROUP, SEQ_Q, SEQ_K, VARLEN: tl.constexpr):
    """For a program over (query tile, batch * query head): batch, head, kv head and the row
    ranges of its sequence's queries and keys."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q_start, seq_q, lse_start = _row_range(CU, b, SEQ_Q, VARLEN)
    k_start, seq_k, _ = _row_range(CU, b, SEQ_K, VARLEN)
    return b, h, h // GROUP, q_start, seq_q, lse_start, k_start, seq_k


@triton.jit
def _load_tile(ptr, rows, row_stride, offs_d, row_ok, d_ok, UPCAST: tl.constexpr):
    """(len(rows), BLOCK_D) tile of a (row, D) matrix; zeros outside; fp32 in the interpreter."""
    x = tl.load(ptr + rows[:, None] * row_stride + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _row_stats(LSE, DELTA, h, TOTAL_Q, lse_start, offs_m, m_ok):
    """Saved log-sum-exp (as log2) and delta = rowsum(dout * out) of query rows offs_m of head h."""
    lse2 = tl.load(LSE + h * TOTAL_Q + lse_start + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + h * TOTAL_Q + lse_start + offs_m, mask=m_ok, other=0.0)
    return lse2, delta


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    CU,
    scale_log2,
    sq_b,
    sq_r,
    sq_h,
    sk_b,
    sk_r,
    sk_h,
    sv_b,
    sv_r,
    sv_h,
    so_b,
    so_r,
    so_h,
    SEQ_Q,
    SEQ_K,
    TOTAL_Q,
    H,
    GROUP,
    D,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h, hk, q_start, seq_q, lse_start, k_start, seq_k = _query_program(CU, H, GROUP, SEQ_Q, SEQ_K, VARLEN)
    if pid_m * BLOCK_M >= seq_q:
        return
    Q += b * sq_b + h * sq_h
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    O += b * so_b + h * so_h
    diag = seq_k - seq_q  # causal: key j visible from query i iff j <= i + diag
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < D
    q = _load_tile(Q, q_start + offs_m, sq_r, offs_d, m_ok, d_ok, UPCAST)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end_n = seq_k
    if CAUSAL:
        end_n = tl.minimum(seq_k, tl.maximum((pid_m + 1) * BLOCK_M + diag, 0))
    for start_n in range(0, end_n, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < seq_k
        k = _load_tile(K, k_start + n, sk_r, offs_d, n_ok, d_ok, UPCAST)
        v = _load_tile(V, k_start + n, sv_r, offs_d, n_ok, d_ok, UPCAST)
        s = dot_acc(q, tl.trans(k), IEEE)
        s = s * scale_log2
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(s - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot_acc(p, v, IEEE)
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(
        O + (q_start + offs_m)[:, None] * so_r + offs_d[None, :],
        cast_out(out, O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(LSE + h * TOTAL_Q + lse_start + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU,
    scale,
    scale_log2,
    sq_b,
    sq_r,
    sq_h,
    sk_b,
    sk_r,
    sk_h,
    sv_b,
    sv_r,
    sv_h,
    sdo_b,
    sdo_r,
    sdo_h,
    sdk_b,
    sdk_r,
    sdk_h,
    sdv_b,
    sdv_r,
    sdv_h,
    SEQ_Q,
    SEQ_K,
    TOTAL_Q,
    HK,
    GROUP,
    D,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1) // HK
    hk = tl.program_id(1) % HK
    q_start, seq_q, lse_start = _row_range(CU, b, SEQ_Q, VARLEN)
    k_start, seq_k, _ = _row_range(CU, b, SEQ_K, VARLEN)
    if pid_n * BLOCK_N >= seq_k:
        return
    Q += b * sq_b
    DO += b * sdo_b
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    DK += b * sdk_b + hk * sdk_h
    DV += b * sdv_b + hk * sdv_h
    diag = seq_k - seq_q
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_k
    d_ok = offs_d < D
    k = _load_tile(K, k_start + offs_n, sk_r, offs_d, n_ok, d_ok, UPCAST)
    v = _load_tile(V, k_start + offs_n, sv_r, offs_d, n_ok, d_ok, UPCAST)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    start_m = 0
    if CAUSAL:  # the first query that sees key pid_n * BLOCK_N: i >= j - diag
        start_m = tl.maximum(pid_n * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for m0 in range(start_m, seq_q, BLOCK_M):
            offs_m = m0 + offs_m0
            m_ok = offs_m < seq_q
            q = _load_tile(Q + h * sq_h, q_start + offs_m, sq_r, offs_d, m_ok, d_ok, UPCAST)
            do = _load_tile(DO + h * sdo_h, q_start + offs_m, sdo_r, offs_d, m_ok, d_ok, UPCAST)
            lse2, delta = _row_stats(LSE, DELTA, h, TOTAL_Q, lse_start, offs_m, m_ok)
            st = dot_acc(k, tl.trans(q), IEEE)  # (BLOCK_N, BLOCK_M)
            visible = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + diag)
            pt = tl.where(visible, tl.math.exp2(st * scale_log2 - lse2[None, :]), 0.0)
            dv += dot_acc(pt, do, IEEE)
            dst = pt * (dot_acc(v, tl.trans(do), IEEE) - delta[None, :])
            dk += dot_acc(dst, q, IEEE)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(
        DK + (k_start + offs_n)[:, None] * sdk_r + offs_d[None, :],
        cast_out(dk * scale, DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + (k_start + offs_n)[:, None] * sdv_r + offs_d[None, :], cast_out(dv, DV.dtype.element_ty), mask=kv_mask
    )


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU,
    scale,
    scale_log2,
    sq_b,
    sq_r,
    sq_h,
    sk_b,
    sk_r,
    sk_h,
    sv_b,
    sv_r,
    sv_h,
    sdo_b,
    sdo_r,
    sdo_h,
    sdq_b,
    sdq_r,
    sdq_h,
    SEQ_Q,
    SEQ_K,
    TOTAL_Q,
    H,
    GROUP,
    D,
    CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h, hk, q_start, seq_q, lse_start, k_start, seq_k = _query_program(CU, H, GROUP, SEQ_Q, SEQ_K, VARLEN)
    if pid_m * BLOCK_M >= seq_q:
        return
    Q += b * sq_b + h * sq_h
    DO += b * sdo_b + h * sdo_h
    DQ += b * sdq_b + h * sdq_h
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h
    diag = seq_k - seq_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < D
    q = _load_tile(Q, q_start + offs_m, sq_r, offs_d, m_ok, d_ok, UPCAST)
    do = _load_tile(DO, q_start + offs_m, sdo_r, offs_d, m_ok, d_ok, UPCAST)
    lse2, delta = _row_stats(LSE, DELTA, h, TOTAL_Q, lse_start, offs_m, m_ok)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end_n = seq_k
    if CAUSAL:
        end_n = tl.minimum(seq_k, tl.maximum((pid_m + 1) * BLOCK_M + diag, 0))
    for start_n in range(0, end_n, BLOCK_N):
        n = start_n + offs_n0
        n_ok = n < seq_k
        k = _load_tile(K, k_start + n, sk_r, offs_d, n_ok, d_ok, UPCAST)
        v = _load_tile(V, k_start + n, sv_r, offs_d, n_ok, d_ok, UPCAST)
        s = dot_acc(q, tl.trans(k), IEEE)
        dp = dot_acc(do, tl.trans(v), IEEE)
        visible = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(visible, tl.math.exp2(s * scale_log2 - lse2[:, None]), 0.0)
        dq += dot_acc(p * (dp - delta[:, None]), k, IEEE)
    tl.store(
        DQ + (q_start + offs_m)[:, None] * sdq_r + offs_d[None, :],
        cast_out(dq * scale, DQ.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


# ----------------------------------------------------------------------------- launchers


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, row, head) strides in elements; packed (T, H, D) tensors have no batch stride."""
    if x.dim() == 4:
        return x.stride(0), x.stride(1), x.stride(2)
    return 0, x.stride(0), x.stride(1)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _geometry(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int):
    """(batch, seq_q, seq_k, total_q): dense (B, S, H, D) or packed (T, H, D) + cu_seqlens."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[1], k.shape[1], q.shape[0] * q.shape[1]
    return cu_seqlens.numel() - 1, max_seqlen, max_seqlen, q.shape[0]


def _blocks(d: int, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). The interpreter prefers large blocks (fewer
    Python-level iterations); GPU choices keep the fp32 tiles within the register file."""
    bd = max(16, triton.next_power_of_2(d))
    if _interpreted():
        return 64, 64, bd, 4
    if backward:
        return (64, 64, bd, 4) if bd <= 64 else (32, 64, bd, 8) if bd <= 128 else (32, 32, bd, 8)
    return (128, 64, bd, 4) if bd <= 64 else (64, 64, bd, 4) if bd <= 128 else (64, 32, bd, 8)


def _flags(q: torch.Tensor, causal: bool, varlen: bool, backward: bool) -> dict:
    upcast = _interpreted()
    bm, bn, bd, warps = _blocks(q.shape[-1], backward)
    return dict(
        CAUSAL=causal,
        VARLEN=varlen,
        UPCAST=upcast,
        IEEE=q.dtype == torch.float32 and not upcast,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        num_warps=warps,
    )


def flash_attention_fwd_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (q's shape, contiguous), lse (Hq, total_q) fp32."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    batch, seq_q, seq_k, total_q = _geometry(q, k, cu_seqlens, max_seqlen)
    h, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((h, total_q), device=q.device, dtype=torch.float32)
    flags = _flags(q, causal, cu_seqlens is not None, backward=False)
    cu = cu_seqlens if cu_seqlens is not None else lse  # any pointer; unread when dense
    grid = (triton.cdiv(max(seq_q, 1), flags["BLOCK_M"]), batch * h)
    _attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        cu,
        scale * _LOG2E,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        seq_q,
        seq_k,
        total_q,
        h,
        h // hk,
        d,
        **flags,
    )
    return out, lse


def flash_attention_bwd_triton(
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
    """(dq, dk, dv) in the shapes of q, k, v, contiguous."""
    q, k, v, dout = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v), _last_contiguous(dout)
    batch, seq_q, seq_k, total_q = _geometry(q, k, cu_seqlens, max_seqlen)
    h, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    # delta_i = sum_d dout_i * out_i in fp32, laid out like lse: (Hq, total_q)
    delta = (dout.float() * out.float()).sum(-1).reshape(total_q, h).t().contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    flags = _flags(q, causal, cu_seqlens is not None, backward=True)
    cu = cu_seqlens if cu_seqlens is not None else lse
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    _attn_bwd_dkdv_kernel[(triton.cdiv(max(seq_k, 1), flags["BLOCK_N"]), batch * hk)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        cu,
        scale,
        scale * _LOG2E,
        *strides,
        *_strides(dk),
        *_strides(dv),
        seq_q,
        seq_k,
        total_q,
        hk,
        h // hk,
        d,
        **flags,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(max(seq_q, 1), flags["BLOCK_M"]), batch * h)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        cu,
        scale,
        scale * _LOG2E,
        *strides,
        *_strides(dq),
        seq_q,
        seq_k,
        total_q,
        h,
        h // hk,
        d,
        **flags,
    )
    return dq, dk, dv
