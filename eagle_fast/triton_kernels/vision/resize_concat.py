"""Triton kernels of eagle_fast::resize_concat (same maths as csrc/vision/resize_concat.h).

Feature i is a (B, C, H, W) map with any strides (token grids arrive as channels-last views); with
unshuffle factor u it is read as pixel_unshuffle(x, u): (B, C*u*u, H/u, W/u), channel
c' = c*u*u + u*dy + dx reading x[b, c, y*u + dy, x*u + dx], then resized to (G, G) by bilinear
align_corners=True and written into channels [off, off + C*u*u) of out (B, G*G, sum C_i*u_i^2).

  forward  _resize_concat_fwd_kernel: one launch per feature, tiles of (BLOCK_M output cells of the
           flattened b*G*G, BLOCK_C unshuffled channels): four strided taps per element, stores
           contiguous along channels.
  backward _resize_concat_bwd_kernel: one launch per feature, a deterministic gather (no atomics):
           tiles of (BLOCK_M input pixels of the flattened b*H*W, BLOCK_C input channels); each
           pixel sums weight_y * weight_x * grad over the output cells whose taps reach it, from
           per-axis tables (for unshuffled index i: the (g, weight) pairs, padded with g = -1).

Axis taps (i0, i1, l0, l1) are computed on the host in the accumulation type (fp32; fp64 for fp64
inputs) exactly as axis_tap does (scale = (n-1)/(G-1), src = scale*g, i0 = int(src), ...) and
travel as small tables: computing src in-kernel would let the GPU compiler fuse scale*g into
src - i0 as an FMA and shift lambda. Accumulation is fp32 (fp64 for fp64); bf16/fp16 values are
loaded and upcast first (bf16 arithmetic is wrong in the interpreter), and fp32 -> bf16 stores go
through `cast_out`, round-to-nearest-even (the interpreter's own cast truncates).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from eagle_fast.triton_kernels.utils import cast_out

_TILE = tl.constexpr(2048)  # elements per program tile (BLOCK_M * BLOCK_C); powers of 2
_MAX_BLOCK_C = 128


@triton.jit
def _resize_concat_fwd_kernel(
    x_ptr,
    out_ptr,
    ty_idx,
    ty_lam,
    tx_idx,
    tx_lam,
    sb,
    sc,
    sy,
    sx,
    M,
    G,
    CU,
    C_TOT,
    C_OFF,
    U: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # b * G*G + gy * G + gx
    cu = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # unshuffled channel
    m_ok = m < M
    c_ok = cu < CU
    ok = m_ok[:, None] & c_ok[None, :]
    GG = G * G
    b = m // GG
    cell = m % GG
    gy = cell // G
    gx = cell % G
    # Tables: idx (G, 2) int32 = (i0, i1); lam (G, 2) accumulation type = (l0, l1).
    iy0 = tl.load(ty_idx + 2 * gy, mask=m_ok, other=0)
    iy1 = tl.load(ty_idx + 2 * gy + 1, mask=m_ok, other=0)
    ly0 = tl.load(ty_lam + 2 * gy, mask=m_ok, other=0.0)
    ly1 = tl.load(ty_lam + 2 * gy + 1, mask=m_ok, other=0.0)
    ix0 = tl.load(tx_idx + 2 * gx, mask=m_ok, other=0)
    ix1 = tl.load(tx_idx + 2 * gx + 1, mask=m_ok, other=0)
    lx0 = tl.load(tx_lam + 2 * gx, mask=m_ok, other=0.0)
    lx1 = tl.load(tx_lam + 2 * gx + 1, mask=m_ok, other=0.0)

    c = cu // (U * U)
    r = cu % (U * U)
    coff = c.to(tl.int64) * sc + (r // U).to(tl.int64) * sy + (r % U).to(tl.int64) * sx
    base = b.to(tl.int64) * sb
    row0 = base + (iy0 * U).to(tl.int64) * sy
    row1 = base + (iy1 * U).to(tl.int64) * sy
    col0 = (ix0 * U).to(tl.int64) * sx
    col1 = (ix1 * U).to(tl.int64) * sx
    v00 = tl.load(x_ptr + (row0 + col0)[:, None] + coff[None, :], mask=ok, other=0.0).to(ACC)
    v01 = tl.load(x_ptr + (row0 + col1)[:, None] + coff[None, :], mask=ok, other=0.0).to(ACC)
    v10 = tl.load(x_ptr + (row1 + col0)[:, None] + coff[None, :], mask=ok, other=0.0).to(ACC)
    v11 = tl.load(x_ptr + (row1 + col1)[:, None] + coff[None, :], mask=ok, other=0.0).to(ACC)
    lx0 = lx0[:, None]
    lx1 = lx1[:, None]
    val = ly0[:, None] * (lx0 * v00 + lx1 * v01) + ly1[:, None] * (lx0 * v10 + lx1 * v11)
    dst = out_ptr + m.to(tl.int64)[:, None] * C_TOT + C_OFF + cu[None, :]
    tl.store(dst, cast_out(val, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _resize_concat_bwd_kernel(
    g_ptr,
    gin_ptr,
    ry_g,
    ry_w,
    rx_g,
    rx_w,
    gsb,
    gsn,
    gsc,
    sb,
    sc,
    sy,
    sx,
    M,
    H,
    W,
    C,
    G,
    C_OFF,
    KY,
    KX,
    U: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # b * H*W + hy * W + wx (input pixel)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # input channel
    m_ok = m < M
    c_ok = c < C
    HW = H * W
    b = m // HW
    p = m % HW
    hy = p // W
    wx = p % W
    yu = hy // U
    xu = wx // U
    sub = (hy % U) * U + wx % U  # u*dy + dx of the unshuffled channel
    # grad[b, gy*G + gx, C_OFF + c*u*u + sub]
    gch = (C_OFF + c * (U * U)).to(tl.int64)[None, :] * gsc + sub.to(tl.int64)[:, None] * gsc
    gbase = b.to(tl.int64) * gsb
    acc = tl.zeros((BLOCK_M, BLOCK_C), ACC)
    for ky in range(KY):
        gy = tl.load(ry_g + yu * KY + ky, mask=m_ok, other=-1)
        wy = tl.load(ry_w + yu * KY + ky, mask=m_ok, other=0.0)
        for kx in range(KX):
            gx = tl.load(rx_g + xu * KX + kx, mask=m_ok, other=-1)
            wgt = wy * tl.load(rx_w + xu * KX + kx, mask=m_ok, other=0.0)
            valid = (gy >= 0) & (gx >= 0)
            n = (gy * G + gx).to(tl.int64)
            v = tl.load(g_ptr + (gbase + n * gsn)[:, None] + gch, mask=valid[:, None] & c_ok[None, :], other=0.0).to(
                ACC
            )
            acc += wgt[:, None] * v
    dst = (
        gin_ptr
        + (b.to(tl.int64) * sb + hy.to(tl.int64) * sy + wx.to(tl.int64) * sx)[:, None]
        + c.to(tl.int64)[None, :] * sc
    )
    tl.store(dst, cast_out(acc, gin_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------- host side


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32  # torch's opmath for the resize


@functools.lru_cache(maxsize=256)
def _axis_taps(n: int, G: int, fp64: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """axis_tap for g = 0..G-1 in the accumulation type: (i0, i1, l0, l1) as numpy arrays."""
    t = np.float64 if fp64 else np.float32
    scale = t(n - 1) / t(G - 1) if G > 1 else t(0)
    src = (scale * np.arange(G, dtype=t)).astype(t)
    i0 = src.astype(np.int32)  # truncation, as static_cast<int>
    i1 = np.where(i0 < n - 1, i0 + 1, i0).astype(np.int32)
    l1 = (src - i0.astype(t)).astype(t)
    l0 = (t(1) - l1).astype(t)
    return i0, i1, l0, l1


@functools.lru_cache(maxsize=256)
def _fwd_tables(n: int, G: int, fp64: bool) -> tuple[torch.Tensor, torch.Tensor]:
    i0, i1, l0, l1 = _axis_taps(n, G, fp64)
    return torch.from_numpy(np.stack([i0, i1], 1).copy()), torch.from_numpy(np.stack([l0, l1], 1).copy())


@functools.lru_cache(maxsize=256)
def _bwd_tables(n: int, G: int, fp64: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For each unshuffled index i < n: the (g, weight) pairs of the taps reading it, (n, K) padded
    with g = -1 / weight 0; pairs in g order, i0's before i1's (both when i0 == i1)."""
    i0, i1, l0, l1 = _axis_taps(n, G, fp64)
    pairs: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for g in range(G):
        pairs[int(i0[g])].append((g, l0[g]))
        pairs[int(i1[g])].append((g, l1[g]))
    k = max(1, max(len(p) for p in pairs))
    gs = np.full((n, k), -1, dtype=np.int32)
    ws = np.zeros((n, k), dtype=np.float64 if fp64 else np.float32)
    for i, p in enumerate(pairs):
        for j, (g, w) in enumerate(p):
            gs[i, j], ws[i, j] = g, w
    return torch.from_numpy(gs), torch.from_numpy(ws)


def _blocks(channels: int) -> tuple[int, int]:
    block_c = min(_MAX_BLOCK_C, max(16, triton.next_power_of_2(channels)))
    return _TILE.value // block_c, block_c


def _check(features: list[torch.Tensor], unshuffle: list[int]) -> None:
    if len(features) != len(unshuffle):
        raise ValueError(f"resize_concat: {len(unshuffle)} unshuffle factors for {len(features)} features")
    for i, (x, u) in enumerate(zip(features, unshuffle)):
        if x.dim() != 4:
            raise ValueError(f"feature {i}: {x.dim()}-D, the kernels take (B, C, H, W) maps")
        if u < 1 or x.shape[2] % u or x.shape[3] % u:
            raise ValueError(f"feature {i}: unshuffle {u} does not divide its {x.shape[2]}x{x.shape[3]} map")
        if x.dtype != features[0].dtype or x.device != features[0].device or x.shape[0] != features[0].shape[0]:
            raise ValueError(f"feature {i}: {x.dtype} {tuple(x.shape)} on {x.device} does not match feature 0")


def resize_concat_triton(features: list[torch.Tensor], grid: int, unshuffle: list[int]) -> torch.Tensor:
    """The Triton body of eagle_fast::resize_concat; output as `_resize_concat_reference`."""
    features, unshuffle = list(features), [int(u) for u in unshuffle]
    _check(features, unshuffle)
    x0, G = features[0], int(grid)
    B, device = x0.shape[0], x0.device
    acc_tl = _acc(x0.dtype)
    fp64 = x0.dtype == torch.float64
    c_tot = sum(x.shape[1] * u * u for x, u in zip(features, unshuffle))
    out = torch.empty(B, G * G, c_tot, dtype=x0.dtype, device=device)
    off, M = 0, B * G * G
    for x, u in zip(features, unshuffle):
        cu = x.shape[1] * u * u
        if cu and M:
            ty_idx, ty_lam = (t.to(device) for t in _fwd_tables(x.shape[2] // u, G, fp64))
            tx_idx, tx_lam = (t.to(device) for t in _fwd_tables(x.shape[3] // u, G, fp64))
            bm, bc = _blocks(cu)
            launch = (triton.cdiv(M, bm), triton.cdiv(cu, bc))
            _resize_concat_fwd_kernel[launch](
                x,
                out,
                ty_idx,
                ty_lam,
                tx_idx,
                tx_lam,
                *x.stride(),
                M,
                G,
                cu,
                c_tot,
                off,
                U=u,
                ACC=acc_tl,
                BLOCK_M=bm,
                BLOCK_C=bc,
            )
        off += cu
    return out


def resize_concat_backward_triton(
    grad: torch.Tensor, features: list[torch.Tensor], grid: int, unshuffle: list[int]
) -> list[torch.Tensor]:
    """The Triton body of eagle_fast::resize_concat_backward: per feature, the adjoint of the forward
    in a tensor created by torch.empty_like(feature) (same strides); deterministic (no atomics)."""
    features, unshuffle = list(features), [int(u) for u in unshuffle]
    _check(features, unshuffle)
    G = int(grid)
    c_tot = sum(x.shape[1] * u * u for x, u in zip(features, unshuffle))
    B = features[0].shape[0]
    if grad.dim() != 3 or tuple(grad.shape) != (B, G * G, c_tot):
        raise ValueError(f"resize_concat_backward: grad {tuple(grad.shape)}, expected {(B, G * G, c_tot)}")
    acc_tl = _acc(features[0].dtype)
    fp64 = features[0].dtype == torch.float64
    grads, off = [], 0
    for x, u in zip(features, unshuffle):
        gin = torch.empty_like(x)
        C, H, W = x.shape[1], x.shape[2], x.shape[3]
        M = B * H * W
        if C and M:
            ry_g, ry_w = (t.to(x.device) for t in _bwd_tables(H // u, G, fp64))
            rx_g, rx_w = (t.to(x.device) for t in _bwd_tables(W // u, G, fp64))
            bm, bc = _blocks(C)
            launch = (triton.cdiv(M, bm), triton.cdiv(C, bc))
            _resize_concat_bwd_kernel[launch](
                grad,
                gin,
                ry_g,
                ry_w,
                rx_g,
                rx_w,
                *grad.stride(),
                *gin.stride(),
                M,
                H,
                W,
                C,
                G,
                off,
                ry_g.shape[1],
                rx_g.shape[1],
                U=u,
                ACC=acc_tl,
                BLOCK_M=bm,
                BLOCK_C=bc,
            )
        grads.append(gin)
        off += C * u * u
    return grads
