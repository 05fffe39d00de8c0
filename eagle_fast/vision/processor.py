"""EagleImageProcessor: images -> the shared canvas and every expert input of a mixture.

One call of `ops.fused_preprocess` replaces the original's chain (PIL expand-to-square, HF
CLIPImageProcessor, a per-expert F.interpolate, and the Pix2Struct processor run on the CPU
inside the model's forward). Which expert inputs exist follows the mixture string:

  "clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"
    pixel_values                         (B, 3, 1024, 1024)  ConvNeXt, SAM and EVA read this canvas
    expert_inputs["clip-448"]            (B, 3, 336, 336)    CLIP runs at 336 despite its name
    expert_inputs["pix2struct-1024"]     {"flattened_patches": (B, 2048, 770), "attention_mask": (B, 2048)}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from eagle_fast.images import DEFAULT_MAX_PIXELS, to_rgb_batch
from eagle_fast.ops.fused_preprocess import fused_preprocess
from eagle_fast.preprocess_plan import CLIP_MEAN, CLIP_STD, PAD_FILL

CONFIG_NAME = "preprocessor_config.json"

# What each expert reads: the canvas itself, the CLIP resize, or Pix2Struct's flattened patches.
EXPERT_INPUT_KINDS = {
    "clip-448": "clip",
    "convnext-1024": "canvas",
    "sam-1024": "canvas",
    "det-1024": "canvas",
    "pix2struct-1024": "pix2struct",
}
ASPECT_MODES = ("pad", "square")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_mixture(vision_towers: str) -> list[str]:
    """`;`-joined expert names, in module (= channel-concat) order; unknown names are an error."""
    names = [n.strip() for n in vision_towers.split(";") if n.strip()]
    if not names:
        raise ValueError(f"vision_towers {vision_towers!r} names no expert")
    unknown = [n for n in names if n not in EXPERT_INPUT_KINDS]
    if unknown:
        raise ValueError(f"vision_towers: unknown expert(s) {unknown}; known: {sorted(EXPERT_INPUT_KINDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"vision_towers {vision_towers!r} names an expert twice")
    return names


@dataclass
class ImageProcessorConfig:
    vision_towers: str = "clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"
    image_aspect_ratio: str = "pad"
    image_size: int = 1024
    dtype: str = "float32"
    clip_size: int = 336  # Eagle's clip-448 tower resizes its input to 336 (Eagle issue #22)
    pix2struct_max_patches: int = 2048
    pix2struct_patch: int = 16
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    pad_fill: tuple[int, int, int] = PAD_FILL
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unsupported; use one of {sorted(_DTYPES)}")
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r} unsupported; use one of {ASPECT_MODES}")
        if self.image_size < 1 or self.max_pixels < 1:
            raise ValueError("image_size and max_pixels must be positive")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        self.pad_fill = tuple(self.pad_fill)
        parse_mixture(self.vision_towers)


def image_digest(image: torch.Tensor) -> str:
    """Content digest of one decoded (H, W, 3) uint8 image: its shape and bytes, read on the host
    (an image already on a device is copied once; the processor's inputs are host images)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(image.shape)).encode())
    h.update(image.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class EagleImageProcessor:
    """Images (PIL, numpy, torch; one or a list) -> {"pixel_values", "expert_inputs"}."""

    def __init__(
        self,
        vision_towers: str = ImageProcessorConfig.vision_towers,
        image_aspect_ratio: str = "pad",
        image_size: int = 1024,
        dtype: torch.dtype | str = torch.float32,
        **kwargs: Any,
    ) -> None:
        self.config = ImageProcessorConfig(
            vision_towers=vision_towers,
            image_aspect_ratio=image_aspect_ratio,
            image_size=image_size,
            dtype=dtype,
            **kwargs,
        )
        self.experts = parse_mixture(self.config.vision_towers)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.config.dtype]

    def __call__(self, images: Any, device: torch.device | str | None = None) -> dict[str, Any]:
        """Process one image or a list of them.

        Args:
            images: PIL image / numpy array / torch uint8 tensor, or a list of them (mixed sizes).
            device: where the kernels run and the outputs live (default: the images' device).

        Returns:
            {"pixel_values": (B, 3, S, S), "expert_inputs": {name: tensor or dict}} holding only
            the experts whose input differs from the canvas, and "image_digests": one content
            digest per image (of its decoded RGB bytes: what the KV-prefix reuse compares).

        Raises:
            ValueError: naming the image index and the problem.
        """
        cfg = self.config
        batch = to_rgb_batch(images, cfg.max_pixels)
        digests = [image_digest(im) for im in batch]  # from the host bytes, before any upload
        if device is not None:  # uint8 crosses to the device (a quarter of fp32), the kernels run there
            batch = [im.to(device, non_blocking=True) for im in batch]
        kinds = {EXPERT_INPUT_KINDS[n] for n in self.experts}
        out = fused_preprocess(
            batch,
            canvas_size=cfg.image_size,
            pad=cfg.image_aspect_ratio == "pad",
            fill=cfg.pad_fill,
            mean=cfg.image_mean,
            std=cfg.image_std,
            clip_size=cfg.clip_size if "clip" in kinds else 0,
            pix2struct_max_patches=cfg.pix2struct_max_patches if "pix2struct" in kinds else 0,
            pix2struct_patch=cfg.pix2struct_patch,
            dtype=self.dtype,
        )
        expert_inputs: dict[str, Any] = {}
        for name in self.experts:
            kind = EXPERT_INPUT_KINDS[name]
            if kind == "clip":
                expert_inputs[name] = out.clip
            elif kind == "pix2struct":
                expert_inputs[name] = {
                    "flattened_patches": out.flattened_patches,
                    "attention_mask": out.attention_mask,
                }
        return {"pixel_values": out.pixel_values, "expert_inputs": expert_inputs, "image_digests": digests}

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {"processor_class": type(self).__name__, **dataclasses.asdict(self.config)}

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write `preprocessor_config.json` into `save_directory`; returns the file's path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> EagleImageProcessor:
        """The processor an Eagle model config implies (an EagleLlamaConfig, or the dict of an
        official config.json): its mixture, aspect mode, canvas size and experts' input sizes."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        experts = get("mm_expert_configs") or {}
        clip, p2s = experts.get("clip-448", {}), experts.get("pix2struct-1024", {})
        kw = dict(
            vision_towers=get("mm_vision_tower"),
            image_aspect_ratio=get("image_aspect_ratio") or "pad",
            image_size=get("image_size") or 1024,
            clip_size=clip.get("image_size", 336),
            pix2struct_max_patches=p2s.get("max_patches", 2048),
            pix2struct_patch=p2s.get("patch_size", 16),
        )
        return cls(**{**kw, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> EagleImageProcessor:
        """Load from a directory holding `preprocessor_config.json` (or that JSON file), or from a
        model directory whose Eagle `config.json` implies it (official repos ship no processor file)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            model_config = os.path.join(path, "config.json")
            if not os.path.exists(os.path.join(path, CONFIG_NAME)) and os.path.exists(model_config):
                with open(model_config, encoding="utf-8") as f:
                    data = json.load(f)
                if "mm_vision_tower" not in data:
                    raise ValueError(f"{model_config}: not an Eagle model config (no mm_vision_tower)")
                return cls.from_model_config(data)
            path = os.path.join(path, CONFIG_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: no image processor config") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        data.pop("processor_class", None)
        fields = {f.name for f in dataclasses.fields(ImageProcessorConfig)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown image processor field(s) {unknown}")
        return cls(**data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
