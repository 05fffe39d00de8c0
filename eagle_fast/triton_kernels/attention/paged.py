"""Triton kernel of eagle_fast::paged_attention (semantics: eagle_fast/ops/paged_attention.py).

q (Tq, Hq, D) packed with cu_seqlens_q (B + 1,); k_cache / v_cache (num_blocks, block_size, Hkv,
D); block_table (B, max_blocks) int32; seqlens_k (B,) int32 (the new rows included). Last dims
must be contiguous (the launcher copies otherwise); other strides are free.

  _paged_fwd_kernel: one program per (BLOCK_M query vectors, batch * kv head). A sequence's query
  vectors are its (row, head of the kv head's group) pairs, row-major: vector m is row m // G,
  query head hk * G + m % G. So a decode step (one row) packs the G heads sharing a kv head into
  one tile, and every key tile loaded serves all of them. Keys go in tiles of BLOCK_N logical
  positions; key n is read from physical block block_table[b, n // block_size], slot
  n % block_size (any block size: each key row is addressed on its own). Online softmax in base 2,
  bottom-right causal mask (row i sees keys n <= i + Lk - Lq), the loop stops at the last key the
  tile's last row sees.

Scores and probabilities are fp32. On a GPU the products run in the input dtype on tensor cores
(fp32 inputs: IEEE fp32, no TF32); in the CPU interpreter (TRITON_INTERPRET=1) operands are upcast
to fp32 first, as bf16 arithmetic there is wrong. Outputs are rounded to nearest-even (`cast_out`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from eagle_fast.triton_kernels.utils import cast_out, dot_acc

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_fwd_kernel(
    Q,
    K,
    V,
    O,
    BT,
    CU,
    LK,
    scale_log2,
    sq_r,
    sq_h,
    sk_b,
    sk_s,
    sk_h,
    sv_b,
    sv_s,
    sv_h,
    so_r,
    so_h,
    sbt,
    HKV,
    GROUP,
    D,
    BLOCK_SIZE,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // HKV
    hk = tl.program_id(1) % HKV
    q_start = tl.load(CU + b)
    seq_q = tl.load(CU + b + 1) - q_start
    seq_k = tl.load(LK + b)
    n_vec = seq_q * GROUP
    if pid_m * BLOCK_M >= n_vec:
        return
    diag = seq_k - seq_q  # key n visible from row i iff n <= i + diag
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < n_vec
    d_ok = offs_d < D
    row = offs_m // GROUP
    head = hk * GROUP + offs_m % GROUP
    q_ptr = Q + (q_start + row).to(tl.int64)[:, None] * sq_r + head[:, None] * sq_h + offs_d[None, :]
    q = tl.load(q_ptr, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    K += hk * sk_h
    V += hk * sv_h
    BT += b.to(tl.int64) * sbt
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    last_row = (tl.minimum((pid_m + 1) * BLOCK_M, n_vec) - 1) // GROUP
    end_n = tl.minimum(seq_k, last_row + diag + 1)
    for start_n in range(0, end_n, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < end_n
        blk = tl.load(BT + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = (n % BLOCK_SIZE).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + blk[:, None] * sk_b + slot[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + blk[:, None] * sv_b + slot[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = dot_acc(q, tl.trans(k), IEEE) * scale_log2
        visible = n_ok[None, :] & (n[None, :] <= row[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # vectors with nothing visible yet
        p = tl.math.exp2(s - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot_acc(p, v, IEEE)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l_i > 0 for every real vector (Lq <= Lk)
    o_ptr = O + (q_start + row).to(tl.int64)[:, None] * so_r + head[:, None] * so_h + offs_d[None, :]
    tl.store(o_ptr, cast_out(out, O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _blocks(vectors: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). The interpreter prefers large blocks (fewer
    Python-level iterations); on a GPU decode-sized tiles (a few query vectors) take the smallest
    BLOCK_M tl.dot allows, prefill chunks 64."""
    bd = max(16, triton.next_power_of_2(d))
    if _interpreted():
        return 64, 64, bd, 4
    bm = 16 if vectors <= 16 else 64
    return (bm, 64, bd, 4) if bd <= 128 else (bm, 32, bd, 8)


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
) -> torch.Tensor:
    """out (Tq, Hq, D) contiguous in q's dtype. Metadata int32, on q's device, already validated."""
    q, k_cache, v_cache = _last_contiguous(q), _last_contiguous(k_cache), _last_contiguous(v_cache)
    block_table = _last_contiguous(block_table)  # the kernel steps along a row by 1
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    batch, hq, hkv, d = seqlens_k.numel(), q.shape[1], k_cache.shape[2], q.shape[2]
    if batch == 0 or q.shape[0] == 0:
        return out
    group = hq // hkv
    bm, bn, bd, warps = _blocks(max_seqlen_q * group, d)
    upcast = _interpreted()
    grid = (triton.cdiv(max(max_seqlen_q * group, 1), bm), batch * hkv)
    _paged_fwd_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_table,
        cu_seqlens_q,
        seqlens_k,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        hkv,
        group,
        d,
        k_cache.shape[1],
        UPCAST=upcast,
        IEEE=q.dtype == torch.float32 and not upcast,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        num_warps=warps,
    )
    return out
