"""VisionMixture: the experts of a mixture string, fused on one grid by channel concatenation.

"clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024" -> experts in that order (module
index k = position, state-dict keys `vision_towers.{k}.vision_tower.*` as in the official
checkpoints), each run on its processor input, their maps fused by `ops.resize_concat` into
(B, grid * grid, sum of expert channels): 7680 channels on a 32 x 32 grid for X5. Any subset and
order of the five experts works (the original requires ConvNeXt).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eagle_fast.ops import resize_concat
from eagle_fast.vision.experts import VisionExpert, build_expert
from eagle_fast.vision.processor import parse_mixture


class VisionMixture(nn.Module):
    def __init__(self, vision_towers: str, grid: int = 32, expert_configs: dict[str, dict[str, Any]] | None = None):
        super().__init__()
        self.names = parse_mixture(vision_towers)
        expert_configs = expert_configs or {}
        unknown = set(expert_configs) - set(self.names)
        if unknown:
            raise ValueError(f"expert_configs name experts not in the mixture {vision_towers!r}: {sorted(unknown)}")
        self.vision_towers = nn.ModuleList(build_expert(n, expert_configs.get(n)) for n in self.names)
        self.grid = grid

    @property
    def hidden_size(self) -> int:
        return sum(e.hidden_size for e in self.vision_towers)

    def expert_inputs(self, expert: VisionExpert, images: dict[str, Any]) -> tuple:
        """The arguments of `expert` from a processor output (EagleImageProcessor's dict)."""
        name = expert.spec.name
        try:
            if expert.input_key == "canvas":
                return (images["pixel_values"],)
            entry = images["expert_inputs"][name]
            if expert.input_key == "pix2struct":
                return entry["flattened_patches"], entry["attention_mask"]
            return (entry,)
        except KeyError as exc:
            raise ValueError(
                f"vision expert {name!r}: the image inputs lack {exc}; build them with an "
                f"EagleImageProcessor for this mixture"
            ) from None

    def expert_maps(self, images: dict[str, Any]) -> list[torch.Tensor]:
        return [e(*self.expert_inputs(e, images)) for e in self.vision_towers]

    def forward(self, images: dict[str, Any]) -> torch.Tensor:
        """images: processor output for B images -> fused features (B, grid * grid, hidden_size)."""
        maps = self.expert_maps(images)
        dtype = maps[0].dtype
        return resize_concat([m.to(dtype) for m in maps], self.grid, [e.spec.unshuffle for e in self.vision_towers])
