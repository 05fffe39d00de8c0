"""sam-1024: HF SAM image encoder (official Eagle: SAM ViT-L) with Eagle's replaced neck.

The SAM neck is replaced by a 1x1 conv (no bias) to `out_channels` and a channels-first LayerNorm
(eps 1e-6, computed in fp32); its keys are `neck.conv1` and `neck.layer_norm1` only. The fusion
then applies pixel_unshuffle(2): (B, 256, 64, 64) -> (B, 1024, 32, 32), channel c*4 + 2*dy + dx.
The expert reads the CLIP-normalized canvas, like the original.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from eagle_fast.vision.experts.base import ExpertSpec, VisionExpert


@dataclass
class SamConfig:
    image_size: int = 1024
    patch_size: int = 16
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_dim: int = 4096
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [5, 11, 17, 23])
    output_channels: int = 256
    layer_norm_eps: float = 1e-6
    unshuffle: int = 2

    def hf(self):
        from transformers import SamVisionConfig

        kw = dataclasses.asdict(self)
        kw.pop("unshuffle")
        return SamVisionConfig(**kw, use_rel_pos=True, use_abs_pos=True)


class EagleSamNeck(nn.Module):
    """(B, H, W, hidden) tokens -> (B, out, H, W): 1x1 conv, then LayerNorm over channels in fp32."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, out, 1, bias=False)
        self.layer_norm1 = nn.LayerNorm(out, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = F.layer_norm(
            y.float(),
            (y.shape[-1],),
            self.layer_norm1.weight.float(),
            self.layer_norm1.bias.float(),
            self.layer_norm1.eps,
        ).to(y.dtype)
        return y.permute(0, 3, 1, 2)


class SamExpert(VisionExpert):
    def __init__(self, cfg: SamConfig | None = None, name: str = "sam-1024"):
        super().__init__()
        from transformers.models.sam.modeling_sam import SamVisionEncoder

        self.cfg = cfg or SamConfig()
        self.vision_tower = SamVisionEncoder(self.cfg.hf())
        self.vision_tower.neck = EagleSamNeck(self.cfg.hidden_size, self.cfg.output_channels)
        u = self.cfg.unshuffle
        grid = self.cfg.image_size // self.cfg.patch_size // u
        self.spec = ExpertSpec(name, "canvas", self.cfg.output_channels * u * u, grid, unshuffle=u)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> raw map (B, out, S/16, S/16); the fusion unshuffles it."""
        return self.vision_tower(pixel_values.to(self.param_dtype())).last_hidden_state
