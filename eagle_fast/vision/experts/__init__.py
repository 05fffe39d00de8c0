"""The five Eagle vision experts, one file each; `build_expert(name, config)` by mixture name."""

from __future__ import annotations

from typing import Any

from eagle_fast.vision.experts.base import ExpertSpec, VisionExpert
from eagle_fast.vision.experts.clip import ClipConfig, ClipExpert
from eagle_fast.vision.experts.convnext import ConvNextConfig, ConvNextExpert
from eagle_fast.vision.experts.eva import EvaConfig, EvaExpert
from eagle_fast.vision.experts.pix2struct import Pix2StructConfig, Pix2StructExpert
from eagle_fast.vision.experts.sam import SamConfig, SamExpert

# mixture name -> (expert class, its config dataclass)
EXPERTS: dict[str, tuple[type[VisionExpert], type]] = {
    "clip-448": (ClipExpert, ClipConfig),
    "convnext-1024": (ConvNextExpert, ConvNextConfig),
    "sam-1024": (SamExpert, SamConfig),
    "det-1024": (EvaExpert, EvaConfig),
    "pix2struct-1024": (Pix2StructExpert, Pix2StructConfig),
}


def build_expert(name: str, config: dict[str, Any] | None = None) -> VisionExpert:
    """The expert `name` from its architecture config (official sizes when `config` is None)."""
    if name not in EXPERTS:
        raise ValueError(f"unknown vision expert {name!r}; known: {sorted(EXPERTS)}")
    cls, cfg_cls = EXPERTS[name]
    try:
        cfg = cfg_cls(**(config or {}))
    except TypeError as exc:
        raise ValueError(f"vision expert {name!r}: bad config {config}: {exc}") from None
    return cls(cfg, name=name)


__all__ = [
    "EXPERTS",
    "ExpertSpec",
    "VisionExpert",
    "build_expert",
    "ClipConfig",
    "ConvNextConfig",
    "EvaConfig",
    "Pix2StructConfig",
    "SamConfig",
]
