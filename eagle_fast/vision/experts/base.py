"""What every vision expert declares and returns.

An expert is an nn.Module holding the library-layout network as `vision_tower` (so its state-dict
keys are `vision_tower.<library keys>`, as in the official checkpoints) and declaring:
  input_key    which processor output it reads: "canvas" (pixel_values, the normalized square
               canvas), "clip" (the 336 CLIP resize) or "pix2struct" (flattened patches + mask);
  hidden_size  channels of its output map;
  grid         side of its output map before fusion (after any pixel-unshuffle);
  unshuffle    pixel_unshuffle factor the fusion applies to its raw map (SAM: 2).
`forward(inputs)` returns the raw map (B, C, H, W) (any strides: token grids come back as
channels-last views), which `ops.resize_concat` unshuffles and resamples to the mixture's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ExpertSpec:
    name: str
    input_key: str
    hidden_size: int  # channels after unshuffle, i.e. this expert's share of the fused channels
    grid: int
    unshuffle: int = 1


class VisionExpert(nn.Module):
    spec: ExpertSpec

    @property
    def input_key(self) -> str:
        return self.spec.input_key

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def grid(self) -> int:
        return self.spec.grid

    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
