"""The preprocessing plan's arithmetic, shared by the reference, the Triton launcher and the experts:
normalisation constants, where an image lands on the canvas, the Pix2Struct patch grid, and the
1-D resampling tables. A leaf module (torch and math only): every layer may import it.
"""

from __future__ import annotations

import math

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_FILL = (122, 116, 104)  # int(mean * 255): Eagle's expand-to-square background

_PRECISION_BITS = 22  # Pillow's fixed-point weights: 32 - 8 - 2


def plan_canvas(h: int, w: int, size: int, pad: bool) -> dict[str, int]:
    """Where an (h, w) image lands on the canvas; mirrors `plan_canvas` in fused_preprocess.h."""
    if pad:
        side = max(h, w)
        src_h = src_w = side
        top, left = (side - h) // 2, (side - w) // 2
        resized_h = resized_w = size
    else:
        src_h, src_w, top, left = h, w, 0, 0
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)  # transformers get_resize_output_image_size
        resized_h, resized_w = (new_long, size) if w <= h else (size, new_long)
    return dict(
        src_h=src_h,
        src_w=src_w,
        img_top=top,
        img_left=left,
        resized_h=resized_h,
        resized_w=resized_w,
        crop_top=(resized_h - size) // 2,
        crop_left=(resized_w - size) // 2,
    )


def pix2struct_grid(h: int, w: int, max_patches: int, patch: int) -> tuple[int, int]:
    """Rows x cols of `patch`-pixel patches, rows*cols <= max_patches (HF Pix2Struct processor)."""
    scale = (max_patches * (patch / h) * (patch / w)) ** 0.5
    rows = max(min(int(scale * h / patch), max_patches), 1)
    cols = max(min(int(scale * w / patch), max_patches), 1)
    return rows, cols


def _bicubic(x: torch.Tensor) -> torch.Tensor:  # Pillow's filter, a = -0.5
    x = x.abs()
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_min(0.0)


def resample_taps(in_size: int, out_size: int, *, bicubic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D resampling tables: (start (out,) int64, weights (out, ksize)); taps past each output's
    count carry weight 0.

    bicubic=True: Pillow's precompute_coeffs in float64, quantized to its 22-bit fixed point
    (int64). bicubic=False: torch's antialiased bilinear weights, computed in float32 as torch
    does for float inputs (the float rounding of centres near 1000 moves weights by ~1e-4).
    """
    if not bicubic:
        return _aa_bilinear_taps(in_size, out_size)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # (out,)
    xmin = torch.trunc(center - support + 0.5).clamp_min(0)
    xmax = torch.trunc(center + support + 0.5).clamp_max(in_size) - xmin  # tap count
    t = torch.arange(ksize, dtype=torch.float64)
    w = _bicubic(((t[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w = torch.where(t[None, :] < xmax[:, None], w, torch.zeros_like(w))  # (out, ksize)
    ww = torch.zeros(out_size, dtype=torch.float64)
    for i in range(ksize):  # sequential sum: the same rounding as Pillow's loop
        ww = ww + w[:, i]
    w = torch.where(ww[:, None] != 0, w / ww[:, None], w)
    f = w * float(1 << _PRECISION_BITS)
    return xmin.to(torch.int64), torch.trunc(torch.where(w < 0, f - 0.5, f + 0.5)).to(torch.int64)


def _aa_bilinear_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    f32 = torch.float32
    scale = torch.tensor(in_size, dtype=f32) / torch.tensor(out_size, dtype=f32)
    support = scale if scale >= 1 else torch.tensor(1.0, dtype=f32)
    invscale = 1.0 / scale if scale >= 1 else torch.tensor(1.0, dtype=f32)
    ksize = int(math.ceil(support.item())) * 2 + 1
    center = (scale.double() * (torch.arange(out_size, dtype=torch.float64) + 0.5)).to(f32)  # (out,)
    xmin = torch.trunc((center - support).double() + 0.5).clamp_min(0)
    xsize = torch.trunc((center + support).double() + 0.5).clamp_max(in_size) - xmin
    t = torch.arange(ksize, dtype=torch.float64)
    x = (((t[None, :] + xmin[:, None]) - center[:, None].double() + 0.5) * invscale.double()).to(f32)
    w = torch.where(t[None, :] < xsize[:, None], _triangle(x), torch.zeros_like(x))  # (out, ksize)
    total = torch.zeros(out_size, dtype=f32)
    for i in range(ksize):
        total = total + w[:, i]
    w = torch.where(total[:, None] != 0, w / total[:, None], w)
    return xmin.to(torch.int64), w
