"""Decoded images of any common kind -> uint8 RGB tensors (H, W, 3), with limits.

Accepted per image: a PIL image (any mode: converted exactly as PIL's `convert("RGB")`), a numpy
array or a torch tensor of dtype uint8 shaped (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}.
Channel order is guessed as the ecosystems do: numpy is channels-last unless only the first axis
can be channels; torch is channels-first (torchvision) unless only the last axis can be.
One channel is replicated, a fourth (alpha) is dropped — both as PIL's convert("RGB") does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

try:
    import PIL.Image
except ImportError:  # pillow is a dependency; keep array inputs usable without it
    PIL = None  # type: ignore[assignment]

DEFAULT_MAX_PIXELS = 64_000_000  # decompression-bomb guard (64 MP)
_CHANNELS = (1, 3, 4)


def _from_array(arr: torch.Tensor, index: int, channels_first: bool) -> torch.Tensor:
    if arr.dtype != torch.uint8:
        raise ValueError(
            f"image {index}: dtype {str(arr.dtype).removeprefix('torch.')} unsupported, expected uint8 pixels (0..255)"
        )
    if arr.dim() == 2:
        arr = arr[:, :, None]
    elif arr.dim() == 3:
        first, last = arr.shape[0] in _CHANNELS, arr.shape[-1] in _CHANNELS
        if (channels_first and first) or (first and not last):
            arr = arr.permute(1, 2, 0)
        elif not last:
            raise ValueError(f"image {index}: shape {tuple(arr.shape)} has no channel axis of size 1, 3 or 4")
    else:
        raise ValueError(f"image {index}: {arr.dim()}-D array, expected (H, W), (H, W, C) or (C, H, W)")
    if arr.shape[2] == 1:
        arr = arr.expand(-1, -1, 3)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return arr


def to_rgb_uint8(image: Any, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """One image -> contiguous uint8 (H, W, 3) CPU tensor (torch inputs keep their device).

    Raises:
        ValueError: naming `index` and the problem (type, dtype, shape, empty, too many pixels,
            a PIL mode that cannot become RGB).
    """
    if isinstance(image, (str, os.PathLike)):  # a file: EXIF orientation, byte and pixel limits
        path = os.path.abspath(os.fspath(image))
        return load_image_file(os.path.basename(path), os.path.dirname(path), max_pixels=max_pixels)
    if PIL is not None and isinstance(image, PIL.Image.Image):
        w, h = image.size  # known before the pixels are decoded: check limits first
        _check_size(h, w, index, max_pixels)
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ValueError(f"image {index}: PIL mode {image.mode!r} cannot be converted to RGB ({exc})") from exc
        out = torch.from_numpy(np.array(image, dtype=np.uint8))
    elif isinstance(image, np.ndarray):
        out = _from_array(torch.from_numpy(np.ascontiguousarray(image)), index, channels_first=False)
    elif isinstance(image, torch.Tensor):
        out = _from_array(image.detach(), index, channels_first=True)
    else:
        raise ValueError(
            f"image {index}: unsupported type {type(image).__name__} (PIL image, numpy array, torch tensor, file path)"
        )
    _check_size(out.shape[0], out.shape[1], index, max_pixels)
    return out.contiguous()


def _check_size(h: int, w: int, index: int, max_pixels: int) -> None:
    if h == 0 or w == 0:
        raise ValueError(f"image {index}: empty image ({w}x{h} pixels)")
    if h * w > max_pixels:
        raise ValueError(f"image {index}: {w}x{h} = {h * w} pixels exceeds max_pixels={max_pixels}")


def to_rgb_batch(images: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[torch.Tensor]:
    """One image or a sequence of images -> list of uint8 (H, W, 3) tensors."""
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("no images given")
        return [to_rgb_uint8(im, i, max_pixels) for i, im in enumerate(images)]
    return [to_rgb_uint8(images, 0, max_pixels)]


DEFAULT_MAX_BYTES = 64 << 20  # image files larger than this are refused unread


class ImageFileError(ValueError):
    """An image file that cannot be used; `reason` is "path_escape", "missing_image" or "corrupt_image"."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def resolve_image_path(name: str, image_folder: str) -> str:
    """`name` inside `image_folder` (symlinks resolved); absolute paths and `..` that leave the
    folder are refused."""
    if not isinstance(name, str) or not name:
        raise ImageFileError("missing_image", f"image entry {name!r} is not a file name")
    root = os.path.realpath(image_folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ImageFileError("path_escape", f"{name!r} resolves outside the image folder {image_folder!r}")
    return path


def load_image_file(
    name: str, image_folder: str, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Decode an image file to uint8 RGB (H, W, 3): EXIF orientation applied, palette / RGBA /
    grayscale converted as PIL's convert("RGB"), size limits enforced, truncated files refused."""
    path = resolve_image_path(name, image_folder)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ImageFileError("missing_image", f"{path}: no such file") from None
    if size > max_bytes:
        raise ImageFileError("corrupt_image", f"{path}: {size} bytes exceeds the {max_bytes}-byte limit")
    import PIL.ImageOps

    try:
        with PIL.Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ImageFileError("corrupt_image", f"{path}: {im.width}x{im.height} exceeds {max_pixels} pixels")
            im.load()  # decode now: truncated or corrupt data raises here, not later
            im = PIL.ImageOps.exif_transpose(im)
            return to_rgb_uint8(im, max_pixels=max_pixels)
    except ImageFileError:
        raise
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise ImageFileError("corrupt_image", f"{path}: cannot decode ({exc})") from None
