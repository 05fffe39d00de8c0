"""fused_preprocess: decoded uint8 RGB images -> every vision expert's input, in one pass.

Eagle feeds all experts from one shared canvas (the original preprocessing):
  image (H, W, 3) uint8
    -> "pad": centred on a square of the fill colour, offset (long - short) // 2
       "square": shortest edge -> canvas_size, centre crop
    -> Pillow BICUBIC resize to (S, S)  [S = canvas_size, 1024 for the official models]
    -> * 1/255, (x - mean) / std                        -> pixel_values (B, 3, S, S)
    -> bilinear align_corners=True to clip_size          -> clip (B, 3, c, c)      (clip-448 runs at 336)
    -> de-normalize to 0..255, per-image standardization, antialiased bilinear to rows*16 x cols*16,
       16x16 patches flattened (ph, pw, C) after 1-based row/col ids, zero-padded to max_patches
                                                          -> flattened_patches (B, P, 2 + 16*16*3),
                                                             attention_mask (B, P)

Three parts, in order: the pure-torch reference (CPU fallback and test oracle), the
registration of `eagle_fast::fused_preprocess` (schema in csrc/registration.cpp when the
compiled library is present), and the public `fused_preprocess`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from eagle_fast.ops._library import has_cuda_kernels, has_triton, load_compiled, reference_active
from eagle_fast.preprocess_plan import (  # noqa: F401  (re-exported: this op's constants and plan maths)
    _PRECISION_BITS,
    CLIP_MEAN,
    CLIP_STD,
    PAD_FILL,
    pix2struct_grid,
    plan_canvas,
    resample_taps,
)


class PreprocessOutput(NamedTuple):
    pixel_values: torch.Tensor  # (B, 3, S, S)
    clip: torch.Tensor  # (B, 3, c, c), or an empty tensor when clip_size == 0
    flattened_patches: torch.Tensor  # (B, P, 2 + p*p*3), or empty when max_patches == 0
    attention_mask: torch.Tensor  # (B, P), 1 for real patches, or empty


# ----------------------------------------------------------------------------- reference


def _pil_resample(x: torch.Tensor, out_size: int, dim: int, first: int, count: int) -> torch.Tensor:
    """One Pillow BICUBIC pass along `dim` of a uint8 tensor: fixed-point sum, clip8.

    Only outputs [first, first + count) of the `out_size` ones are computed (the crop window).
    """
    in_size = x.shape[dim]
    start, w = resample_taps(in_size, out_size, bicubic=True)
    start, w = start[first : first + count].to(x.device), w[first : first + count].to(x.device)
    shape = [1] * x.dim()
    shape[dim] = count
    acc = torch.full((), 1 << (_PRECISION_BITS - 1), dtype=torch.int64, device=x.device)
    x64 = x.to(torch.int64)
    for t in range(w.shape[1]):
        idx = (start + t).clamp_max(in_size - 1)
        acc = acc + x64.index_select(dim, idx) * w[:, t].view(shape)
    out = torch.where(acc <= 0, torch.zeros_like(acc), acc >> _PRECISION_BITS)
    return torch.where(acc >= (1 << _PRECISION_BITS << 8), torch.full_like(acc, 255), out).to(torch.uint8)


def reference_canvas(image: torch.Tensor, size: int, pad: bool, fill: Sequence[int]) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (S, S, 3) canvas, as PIL expand2square + CLIPImageProcessorPil."""
    h, w, _ = image.shape
    p = plan_canvas(h, w, size, pad)
    src = image
    if pad and h != w:
        src = torch.tensor(list(fill), dtype=torch.uint8, device=image.device).expand(p["src_h"], p["src_w"], 3).clone()
        src[p["img_top"] : p["img_top"] + h, p["img_left"] : p["img_left"] + w] = image
    # Pillow: horizontal pass first, each pass only when that side changes; the centre crop only
    # keeps outputs [crop, crop + size), so only those are computed.
    if p["resized_w"] != p["src_w"]:
        src = _pil_resample(src, p["resized_w"], 1, p["crop_left"], size)
    else:
        src = src[:, p["crop_left"] : p["crop_left"] + size]
    if p["resized_h"] != p["src_h"]:
        src = _pil_resample(src, p["resized_h"], 0, p["crop_top"], size)
    else:
        src = src[p["crop_top"] : p["crop_top"] + size]
    return src


def _reference_flattened_patches(
    pixel_values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, max_patches: int, patch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eagle's pix2struct input: de-normalize, then the HF Pix2Struct processor's maths."""
    batch, _, h, w = pixel_values.shape
    rows, cols = pix2struct_grid(h, w, max_patches, patch)
    x = (pixel_values * std + mean) * 255.0  # (B, 3, S, S), 0..255
    flat = x.flatten(1)
    mu = flat.mean(1, dtype=torch.float64)
    sd = flat.std(1, correction=0).double().clamp_min(1.0 / math.sqrt(flat.shape[1]))
    x = ((x - mu.view(-1, 1, 1, 1)) / sd.view(-1, 1, 1, 1)).float()
    x = F.interpolate(x, size=(rows * patch, cols * patch), mode="bilinear", align_corners=False, antialias=True)
    x = x.view(batch, 3, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)  # (B, r, c, ph, pw, C)
    x = x.reshape(batch, rows * cols, patch * patch * 3)
    r = torch.arange(rows, device=x.device).repeat_interleave(cols).float() + 1
    c = torch.arange(cols, device=x.device).repeat(rows).float() + 1
    ids = torch.stack([r, c], -1).expand(batch, -1, -1)
    out = torch.zeros(batch, max_patches, 2 + patch * patch * 3, device=x.device)
    out[:, : rows * cols] = torch.cat([ids, x], -1)
    mask = torch.zeros(batch, max_patches, device=x.device)
    mask[:, : rows * cols] = 1.0
    return out, mask


def _fused_preprocess_reference(
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
    device = images[0].device
    canvas = torch.stack([reference_canvas(im, canvas_size, pad, fill) for im in images])  # (B, S, S, 3)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    # (B, S, S, 3) -> (B, 3, S, S) made contiguous here, on the uint8 canvas (the cheapest copy):
    # every output is then laid out as the kernels (and the op's fake kernel) lay theirs out.
    planar = canvas.permute(0, 3, 1, 2).contiguous()
    scaled = (planar.double() * (1.0 / 255.0)).float()  # HF rescale
    pixel_values = (scaled - mean_t) / std_t  # HF normalize, float32

    def empty() -> torch.Tensor:  # a skipped output: its own (0,) tensor, never shared between outputs
        return torch.empty(0, dtype=dtype, device=device)

    clip = empty()
    if clip_size > 0:
        clip = F.interpolate(pixel_values, size=(clip_size, clip_size), mode="bilinear", align_corners=True).to(dtype)
    patches, mask = empty(), empty()
    if p2s_max_patches > 0:
        patches, mask = _reference_flattened_patches(pixel_values, mean_t, std_t, p2s_max_patches, p2s_patch)
        patches, mask = patches.to(dtype), mask.to(dtype)
    return pixel_values.to(dtype), clip, patches, mask


# ----------------------------------------------------------------------------- registration

_OP_NAME = "eagle_fast::fused_preprocess"


def _register() -> None:
    """Bind the op name to the best kernels present; the schema lives in csrc/registration.cpp."""
    if not load_compiled():
        # No compiled library: the same op name, with the reference as its body on every device.
        torch.library.custom_op(_OP_NAME, mutates_args=())(_fused_preprocess_reference)
    if has_triton() and not has_cuda_kernels():
        from eagle_fast.triton_kernels.preprocess.fused_preprocess import fused_preprocess_triton

        torch.library.register_kernel(_OP_NAME, "cuda", fused_preprocess_triton)

    @torch.library.register_fake(_OP_NAME)
    def _fake(images, canvas_size, pad, fill, mean, std, clip_size, p2s_max_patches, p2s_patch, dtype):
        b = len(images)

        def new(*shape: int) -> torch.Tensor:  # contiguous, one tensor per output (skipped: (0,))
            return images[0].new_empty(shape, dtype=dtype)

        pv = new(b, 3, canvas_size, canvas_size)
        clip = new(b, 3, clip_size, clip_size) if clip_size > 0 else new(0)
        if p2s_max_patches > 0:
            patches, mask = new(b, p2s_max_patches, 2 + p2s_patch * p2s_patch * 3), new(b, p2s_max_patches)
        else:
            patches, mask = new(0), new(0)
        return pv, clip, patches, mask


_register()


# ----------------------------------------------------------------------------- public API


def _check_images(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(images) == 0:
        raise ValueError("fused_preprocess: no images given")
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor):
            raise ValueError(f"image {i}: expected a torch.Tensor, got {type(im).__name__}")
        if im.dtype != torch.uint8:
            raise ValueError(f"image {i}: dtype {im.dtype}, expected torch.uint8 (H, W, 3)")
        if im.dim() != 3 or im.shape[2] != 3:
            raise ValueError(f"image {i}: shape {tuple(im.shape)}, expected (H, W, 3) RGB")
        if im.shape[0] == 0 or im.shape[1] == 0:
            raise ValueError(f"image {i}: empty image of size {im.shape[1]}x{im.shape[0]}")
        if im.device != images[0].device:
            raise ValueError(f"image {i}: on {im.device}, image 0 on {images[0].device}")
        out.append(im.contiguous())
    return out


def fused_preprocess(
    images: Sequence[torch.Tensor],
    *,
    canvas_size: int = 1024,
    pad: bool = True,
    fill: Sequence[int] = PAD_FILL,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    clip_size: int = 336,
    pix2struct_max_patches: int = 2048,
    pix2struct_patch: int = 16,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> PreprocessOutput:
    """Every expert input of a mixture from decoded images, in one pass.

    Args:
        images: B uint8 RGB tensors (H_i, W_i, 3), any sizes, all on one device.
        canvas_size: S, the shared canvas side (1024 for Eagle).
        pad: True for Eagle's "pad" aspect mode, False for "square" (shortest edge + centre crop).
        fill: RGB background of the pad canvas.
        mean, std: per-channel normalization of the canvas (OpenAI CLIP by default).
        clip_size: side of the bilinear (align_corners=True) CLIP input; 0 to skip.
        pix2struct_max_patches: P, Pix2Struct's patch budget; 0 to skip.
        pix2struct_patch: Pix2Struct's patch side p (16).
        dtype: float32 or bfloat16 outputs (the maths runs in fp32 / integer either way).
        backend: "auto" (the dispatcher: C++ on CPU, CUDA C++ or Triton on GPU), "reference",
            or "triton" (the Triton launcher directly; on CPU under TRITON_INTERPRET=1).

    Returns:
        PreprocessOutput(pixel_values (B, 3, S, S), clip (B, 3, c, c),
        flattened_patches (B, P, 2 + p*p*3), attention_mask (B, P)); skipped parts are empty.

    Raises:
        ValueError: naming the image index and the problem (dtype, shape, empty, device).
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused_preprocess: dtype {dtype} unsupported, use torch.float32 or torch.bfloat16")
    if canvas_size < 1 or clip_size < 0 or pix2struct_max_patches < 0 or pix2struct_patch < 1:
        raise ValueError("fused_preprocess: sizes must be positive (clip_size / max_patches may be 0)")
    if len(fill) != 3 or len(mean) != 3 or len(std) != 3:
        raise ValueError("fused_preprocess: fill, mean and std need 3 values (RGB)")
    args = (
        _check_images(images),
        canvas_size,
        pad,
        [int(v) for v in fill],
        [float(v) for v in mean],
        [float(v) for v in std],
        clip_size,
        pix2struct_max_patches,
        pix2struct_patch,
        dtype,
    )
    if backend == "auto" and reference_active():
        backend = "reference"
    if backend == "auto":
        out = torch.ops.eagle_fast.fused_preprocess(*args)
    elif backend == "reference":
        out = _fused_preprocess_reference(*args)
    elif backend == "triton":
        from eagle_fast.triton_kernels.preprocess.fused_preprocess import fused_preprocess_triton

        out = fused_preprocess_triton(*args)
    else:
        raise ValueError(f"fused_preprocess: unknown backend {backend!r} (auto, reference, triton)")
    return PreprocessOutput(*out)
