"""Triton kernels of eagle_fast::fused_preprocess (same maths as csrc/preprocess/fused_preprocess.h).

Data flow for B images (H_i, W_i, 3) uint8, canvas side S, every launch covering the whole batch:

  images, concatenated flat (sum H_i*W_i*3,) uint8
    -> _pil_resample_h_kernel: Pillow BICUBIC horizontal pass, only the S crop columns and only
       the source rows the vertical taps will read; the pad-mode square is virtual (positions
       outside the image read `fill`)                      -> tmp (sum n_i, S, 3) uint8
    -> _pil_resample_v_normalize_kernel: vertical pass over the S crop rows, clip8, then the
       rescale/normalize lookup table                       -> canvas (B, S, S, 3) uint8,
                                                               pixel_values (B, 3, S, S)
    -> _bilinear_align_corners_kernel (clip_size c > 0)      -> clip (B, 3, c, c)
    -> _aa_resample_h_kernel (max_patches P > 0): antialiased bilinear along x of the
       standardized canvas                                  -> tmp (B, S, cols*p, 3) float32
    -> _aa_resample_v_patches_kernel: along y, scattered into p x p patches (ph, pw, C) after
       their 1-based (row, col) ids                         -> patches (B, P, 2 + p*p*3), mask (B, P)

A pass Pillow skips (source and resized size equal) runs as an identity table (one tap of weight
1 << 22), which clip8 maps back to the same byte, so every image takes the same two launches.
Coefficient tables come from the reference's own helpers (host, float64) and travel as int32 /
float32 tensors; all arithmetic is int32 (Pillow passes) or float32 (everything after).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from eagle_fast.preprocess_plan import pix2struct_grid, plan_canvas, resample_taps
from eagle_fast.triton_kernels.utils import cast_out

_PRECISION_BITS = 22  # Pillow's fixed point, as in the reference
_BLOCK_R, _BLOCK_C = 8, 256  # row x (column*channel) tiles; powers of 2 (Triton, interpreter)

# meta columns, one row per image (int64: the flat offsets may pass 2**31 for large batches)
_IMG_OFF, _IMG_H, _IMG_W, _TOP, _LEFT, _TMP_OFF, _TMP_ROWS, _ROW0 = (tl.constexpr(i) for i in range(8))


@triton.jit
def _clip8(acc):
    # Pillow's clip8: acc already holds the +0.5 rounding term (1 << 21).
    return tl.where(acc >= (1 << 30), 255, tl.where(acc <= 0, 0, acc >> 22))


@triton.jit
def _pil_resample_h_kernel(
    img_ptr,
    meta_ptr,
    start_ptr,
    w_ptr,
    tmp_ptr,
    fill0,
    fill1,
    fill2,
    S,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2)
    meta = meta_ptr + b * 8
    img_off = tl.load(meta + _IMG_OFF)
    h = tl.load(meta + _IMG_H).to(tl.int32)
    w = tl.load(meta + _IMG_W).to(tl.int32)
    top = tl.load(meta + _TOP).to(tl.int32)
    left = tl.load(meta + _LEFT).to(tl.int32)
    tmp_off = tl.load(meta + _TMP_OFF)
    n_rows = tl.load(meta + _TMP_ROWS).to(tl.int32)
    row0 = tl.load(meta + _ROW0).to(tl.int32)

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # tmp rows
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # x * 3 + channel of the S crop cols
    row_ok = rows < n_rows
    col_ok = cols < 3 * S
    j = cols // 3
    ch = cols % 3
    y = row0 + rows - top  # image row; outside [0, h) is the pad colour
    y_in = (y >= 0) & (y < h) & row_ok
    fill = tl.where(ch == 0, fill0, tl.where(ch == 1, fill1, fill2))
    start = tl.load(start_ptr + b * S + j, mask=col_ok, other=0)

    acc = tl.full((BLOCK_R, BLOCK_C), 1 << 21, tl.int32)
    for t in range(K):
        wt = tl.load(w_ptr + (b * S + j) * K + t, mask=col_ok, other=0)
        x = start + t - left
        inside = y_in[:, None] & ((x >= 0) & (x < w) & col_ok)[None, :]
        v = tl.load(img_ptr + img_off + (y[:, None] * w + x[None, :]) * 3 + ch[None, :], mask=inside, other=0)
        # Taps past the virtual square carry weight 0, so `fill` there is harmless.
        v = tl.where(inside, v.to(tl.int32), fill[None, :])
        acc += v * wt[None, :]
    u = _clip8(acc)
    tl.store(
        tmp_ptr + tmp_off + rows[:, None] * (3 * S) + cols[None, :],
        u.to(tl.uint8),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _pil_resample_v_normalize_kernel(
    tmp_ptr, meta_ptr, start_ptr, w_ptr, lut_ptr, canvas_ptr, pv_ptr, S, K, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    b = tl.program_id(2)
    tmp_off = tl.load(meta_ptr + b * 8 + _TMP_OFF)
    n_rows = tl.load(meta_ptr + b * 8 + _TMP_ROWS).to(tl.int32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # canvas rows
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < S
    col_ok = cols < 3 * S
    start = tl.load(start_ptr + b * S + rows, mask=row_ok, other=0)  # relative to tmp row 0

    acc = tl.full((BLOCK_R, BLOCK_C), 1 << 21, tl.int32)
    for t in range(K):
        wt = tl.load(w_ptr + (b * S + rows) * K + t, mask=row_ok, other=0)
        y = start + t
        m = ((y < n_rows) & row_ok)[:, None] & col_ok[None, :]
        v = tl.load(tmp_ptr + tmp_off + y[:, None] * (3 * S) + cols[None, :], mask=m, other=0)
        acc += v.to(tl.int32) * wt[:, None]
    u = _clip8(acc)

    ok = row_ok[:, None] & col_ok[None, :]
    bb = b.to(tl.int64)
    tl.store(canvas_ptr + bb * S * S * 3 + rows[:, None] * (3 * S) + cols[None, :], u.to(tl.uint8), mask=ok)
    # The lookup table holds ((float32(u / 255.0) - mean) / std) per (u, channel): bit-exact.
    ch = cols % 3
    val = tl.load(lut_ptr + u * 3 + ch[None, :], mask=ok, other=0.0)
    dst = ((bb * 3 + ch[None, :]) * S + rows[:, None]) * S + (cols // 3)[None, :]
    tl.store(pv_ptr + dst, cast_out(val, pv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bilinear_align_corners_kernel(
    canvas_ptr, lut_ptr, src_ptr, out_ptr, S, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    bc = tl.program_id(2)  # b * 3 + channel
    b = (bc // 3).to(tl.int64)
    ch = bc % 3
    oy = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ox = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (oy < C)[:, None] & (ox < C)[None, :]
    # torch align_corners=True: src = scale * dst, rounded to float32 (a host table: in-kernel, the
    # GPU compiler would fuse the product into the `- i0` below as an FMA, shifting lambda by up
    # to half an ulp of src, ~3e-5 at S = 1024); i1 clamped at the last pixel.
    sy = tl.load(src_ptr + oy, mask=oy < C, other=0.0)
    y0 = sy.to(tl.int32)
    y1 = tl.where(y0 < S - 1, y0 + 1, y0)
    ly1 = sy - y0.to(tl.float32)
    ly0 = 1.0 - ly1
    sx = tl.load(src_ptr + ox, mask=ox < C, other=0.0)
    x0 = sx.to(tl.int32)
    x1 = tl.where(x0 < S - 1, x0 + 1, x0)
    lx1 = sx - x0.to(tl.float32)
    lx0 = 1.0 - lx1

    base = canvas_ptr + b * S * S * 3 + ch
    # Normalized values via the same lookup table as pixel_values: fp32 even when dtype is bf16.
    u00 = tl.load(base + (y0[:, None] * S + x0[None, :]) * 3, mask=ok, other=0).to(tl.int32)
    u01 = tl.load(base + (y0[:, None] * S + x1[None, :]) * 3, mask=ok, other=0).to(tl.int32)
    u10 = tl.load(base + (y1[:, None] * S + x0[None, :]) * 3, mask=ok, other=0).to(tl.int32)
    u11 = tl.load(base + (y1[:, None] * S + x1[None, :]) * 3, mask=ok, other=0).to(tl.int32)
    v00 = tl.load(lut_ptr + u00 * 3 + ch)
    v01 = tl.load(lut_ptr + u01 * 3 + ch)
    v10 = tl.load(lut_ptr + u10 * 3 + ch)
    v11 = tl.load(lut_ptr + u11 * 3 + ch)
    top = lx0[None, :] * v00 + lx1[None, :] * v01
    bot = lx0[None, :] * v10 + lx1[None, :] * v11
    out = ly0[:, None] * top + ly1[:, None] * bot
    dst = out_ptr + (bc.to(tl.int64) * C + oy[:, None]) * C + ox[None, :]
    tl.store(dst, cast_out(out, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _aa_resample_h_kernel(
    canvas_ptr, lut_ptr, start_ptr, w_ptr, tmp_ptr, S, WO, K, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # canvas rows
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # output x * 3 + channel
    row_ok = rows < S
    col_ok = cols < 3 * WO
    j = cols // 3
    ch = cols % 3
    start = tl.load(start_ptr + j, mask=col_ok, other=0)
    src = canvas_ptr + b * S * S * 3 + rows[:, None] * (3 * S) + ch[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for t in range(K):
        wt = tl.load(w_ptr + j * K + t, mask=col_ok, other=0.0)
        x = start + t
        m = row_ok[:, None] & ((x < S) & col_ok)[None, :]
        u = tl.load(src + x[None, :] * 3, mask=m, other=0).to(tl.int32)
        # Per-image standardization (u - mean) / std as a 256-entry float32 table.
        v = tl.load(lut_ptr + b * 256 + u)
        acc += v * wt[None, :]
    dst = tmp_ptr + (b * S + rows[:, None]) * (3 * WO) + cols[None, :]
    tl.store(dst, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _aa_resample_v_patches_kernel(
    tmp_ptr,
    start_ptr,
    w_ptr,
    patches_ptr,
    mask_ptr,
    S,
    HO,
    WO,
    K,
    P,
    n_cols,
    PATCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # output y
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # output x * 3 + channel
    row_ok = rows < HO
    col_ok = cols < 3 * WO
    start = tl.load(start_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for t in range(K):
        wt = tl.load(w_ptr + rows * K + t, mask=row_ok, other=0.0)
        y = start + t
        m = ((y < S) & row_ok)[:, None] & col_ok[None, :]
        v = tl.load(tmp_ptr + (b * S + y[:, None]) * (3 * WO) + cols[None, :], mask=m, other=0.0)
        acc += v * wt[:, None]

    # Pixel (y, x, ch) -> patch k = (y // p) * n_cols + x // p, feature 2 + ((y % p) * p + x % p) * 3 + ch.
    j = cols // 3
    ch = cols % 3
    r = rows // PATCH
    c = j // PATCH
    k = r[:, None] * n_cols + c[None, :]
    D = 2 + PATCH * PATCH * 3
    row_base = patches_ptr + (b * P + k) * D
    feat = 2 + ((rows % PATCH)[:, None] * PATCH + (j % PATCH)[None, :]) * 3 + ch[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    out_ty = patches_ptr.dtype.element_ty
    tl.store(row_base + feat, cast_out(acc, out_ty), mask=ok)
    # The patch's first element writes its 1-based (row, col) ids and its attention mask.
    first = ok & ((rows % PATCH) == 0)[:, None] & (((j % PATCH) == 0) & (ch == 0))[None, :]
    ids_r = (r[:, None] + 1 + k * 0).to(tl.float32)  # `+ k * 0`: broadcast to the 2-D tile
    ids_c = (c[None, :] + 1 + k * 0).to(tl.float32)
    tl.store(row_base, cast_out(ids_r, out_ty), mask=first)
    tl.store(row_base + 1, cast_out(ids_c, out_ty), mask=first)
    tl.store(
        mask_ptr + b * P + k, tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32).to(mask_ptr.dtype.element_ty), mask=first
    )


# ----------------------------------------------------------------------------- host side


@functools.lru_cache(maxsize=256)
def _taps(in_size: int, out_size: int, bicubic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(start (out,), weights (out, K)) on the CPU: int32 fixed point (bicubic) or float32."""

    start, w = resample_taps(in_size, out_size, bicubic=bicubic)
    return start.to(torch.int32), w.to(torch.int32 if bicubic else torch.float32)


def _crop_taps(in_size: int, resized: int, crop: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic taps of the `size` outputs from `crop` on; identity when Pillow skips the pass."""
    if resized == in_size:
        start = torch.arange(crop, crop + size, dtype=torch.int32)
        return start, torch.full((size, 1), 1 << _PRECISION_BITS, dtype=torch.int32)
    start, w = _taps(in_size, resized, True)
    return start[crop : crop + size], w[crop : crop + size]


def _pad_k(ws: list[torch.Tensor]) -> torch.Tensor:
    k = max(w.shape[1] for w in ws)
    return torch.stack([torch.nn.functional.pad(w, (0, k - w.shape[1])) for w in ws])


def _canvas(images, S, pad, fill, lut, pixel_values):
    """Both Pillow passes for the whole batch -> canvas (B, S, S, 3) uint8; fills pixel_values."""

    device, B = images[0].device, len(images)
    meta, hs, hw, vs, vw = [], [], [], [], []
    img_off = tmp_off = 0
    for im in images:
        h, w = im.shape[0], im.shape[1]
        p = plan_canvas(h, w, S, pad)
        start_h, w_h = _crop_taps(p["src_w"], p["resized_w"], p["crop_left"], S)
        start_v, w_v = _crop_taps(p["src_h"], p["resized_h"], p["crop_top"], S)
        # Only the source rows the vertical taps reach need a horizontal pass.
        row0 = int(start_v.min())
        n_rows = min(p["src_h"], int(start_v.max()) + w_v.shape[1]) - row0
        meta.append([img_off, h, w, p["img_top"], p["img_left"], tmp_off, n_rows, row0])
        hs.append(start_h), hw.append(w_h), vs.append(start_v - row0), vw.append(w_v)
        img_off += h * w * 3
        tmp_off += n_rows * S * 3
    meta_t = torch.tensor(meta, dtype=torch.int64).to(device)
    hs_t, vs_t = torch.stack(hs).to(device), torch.stack(vs).to(device)
    hw_t, vw_t = _pad_k(hw).to(device), _pad_k(vw).to(device)
    flat = torch.cat([im.reshape(-1) for im in images])
    tmp = torch.empty(tmp_off, dtype=torch.uint8, device=device)
    canvas = torch.empty(B, S, S, 3, dtype=torch.uint8, device=device)
    max_rows = max(m[6] for m in meta)  # the _TMP_ROWS column
    grid = (triton.cdiv(max_rows, _BLOCK_R), triton.cdiv(3 * S, _BLOCK_C), B)
    _pil_resample_h_kernel[grid](
        flat,
        meta_t,
        hs_t,
        hw_t,
        tmp,
        int(fill[0]),
        int(fill[1]),
        int(fill[2]),
        S,
        hw_t.shape[2],
        BLOCK_R=_BLOCK_R,
        BLOCK_C=_BLOCK_C,
    )
    grid = (triton.cdiv(S, _BLOCK_R), triton.cdiv(3 * S, _BLOCK_C), B)
    _pil_resample_v_normalize_kernel[grid](
        tmp, meta_t, vs_t, vw_t, lut, canvas, pixel_values, S, vw_t.shape[2], BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C
    )
    return canvas


def _pix2struct(canvas, max_patches, patch, dtype):

    B, S, device = canvas.shape[0], canvas.shape[1], canvas.device
    rows, cols = pix2struct_grid(S, S, max_patches, patch)
    HO, WO = rows * patch, cols * patch
    flat = canvas.reshape(B, -1).double()
    mu = flat.mean(1)
    sd = flat.std(1, correction=0).clamp_min(1.0 / flat.shape[1] ** 0.5)
    lut = ((torch.arange(256, dtype=torch.float64, device=device)[None] - mu[:, None]) / sd[:, None]).float()
    start_x, w_x = (t.to(device) for t in _taps(S, WO, False))
    start_y, w_y = (t.to(device) for t in _taps(S, HO, False))
    tmp = torch.empty(B, S, WO, 3, dtype=torch.float32, device=device)
    grid = (triton.cdiv(S, _BLOCK_R), triton.cdiv(3 * WO, _BLOCK_C), B)
    _aa_resample_h_kernel[grid](canvas, lut, start_x, w_x, tmp, S, WO, w_x.shape[1], BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
    patches = torch.zeros(B, max_patches, 2 + patch * patch * 3, dtype=dtype, device=device)
    mask = torch.zeros(B, max_patches, dtype=dtype, device=device)
    grid = (triton.cdiv(HO, _BLOCK_R), triton.cdiv(3 * WO, _BLOCK_C), B)
    _aa_resample_v_patches_kernel[grid](
        tmp,
        start_y,
        w_y,
        patches,
        mask,
        S,
        HO,
        WO,
        w_y.shape[1],
        max_patches,
        cols,
        PATCH=patch,
        BLOCK_R=_BLOCK_R,
        BLOCK_C=_BLOCK_C,
    )
    return patches, mask


def fused_preprocess_triton(
    images: list[torch.Tensor],
    canvas_size: int,
    pad: bool,
    fill: list[int],
    mean: list[float],
    std: list[float],
    clip_size: int,
    p2s_max_patches: int,
    p2s_patch: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton body of eagle_fast::fused_preprocess; outputs as `_fused_preprocess_reference`."""
    images = [im.contiguous() for im in images]
    device, B, S = images[0].device, len(images), canvas_size
    # (float32(u * (1/255.0) in double) - mean) / std, exactly as the reference computes it.
    scaled = (torch.arange(256, dtype=torch.float64) * (1.0 / 255.0)).float()[:, None]
    lut = ((scaled - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)).to(device)
    pixel_values = torch.empty(B, 3, S, S, dtype=dtype, device=device)
    canvas = _canvas(images, S, pad, fill, lut.contiguous(), pixel_values)

    def empty() -> torch.Tensor:  # one (0,) tensor per skipped output: an op's outputs never alias
        return torch.empty(0, dtype=dtype, device=device)

    clip = empty()
    if clip_size > 0:
        # torch's scale: float(in - 1) / float(out - 1) in float32 (0 for a single output).
        scale = np.float32(S - 1) / np.float32(clip_size - 1) if clip_size > 1 else np.float32(0.0)
        src = torch.from_numpy(scale * np.arange(clip_size, dtype=np.float32)).to(device)
        clip = torch.empty(B, 3, clip_size, clip_size, dtype=dtype, device=device)
        grid = (triton.cdiv(clip_size, 16), triton.cdiv(clip_size, 64), B * 3)
        _bilinear_align_corners_kernel[grid](canvas, lut, src, clip, S, clip_size, BLOCK_R=16, BLOCK_C=64)
    patches, mask = empty(), empty()
    if p2s_max_patches > 0:
        patches, mask = _pix2struct(canvas, p2s_max_patches, p2s_patch, dtype)
    return pixel_values, clip, patches, mask
