"""clip-448: HF CLIP vision transformer (official Eagle: ViT-L/14-336) with Eagle's quirks.

Despite its name the expert runs at 336 (the processor's CLIP resize; Eagle issue #22). The CLS
token is dropped *before* `pre_layrnorm`, so attention runs over the patch tokens only; all layers
run; no post-layernorm (it exists in the state dict, unused); `mm_vision_select_layer` is ignored.
336 input, patch 14 -> (B, 576, 1024) tokens, a 24 x 24 grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from eagle_fast.vision.experts.base import ExpertSpec, VisionExpert
from eagle_fast.vision.experts.hf_attention import hf_attention


@dataclass
class ClipConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def hf(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**dataclasses.asdict(self), projection_dim=768)


class _ClipTower(nn.Module):
    """Holds the HF model as `vision_model` (official keys `vision_tower.vision_model.*`)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_model = CLIPVisionModel(hf_attention(cfg.hf()))


class ClipExpert(VisionExpert):
    def __init__(self, cfg: ClipConfig | None = None, name: str = "clip-448"):
        super().__init__()
        self.cfg = cfg or ClipConfig()
        self.vision_tower = _ClipTower(self.cfg)
        self.spec = ExpertSpec(name, "clip", self.cfg.hidden_size, self.cfg.image_size // self.cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, 336, 336) -> map (B, hidden, 24, 24), a channels-last view of the
        (B, 576, hidden) tokens (no copy; resize_concat reads it in place)."""
        vm = self.vision_tower.vision_model
        x = vm.embeddings(pixel_values.to(self.param_dtype()))[:, 1:]  # CLS dropped before the pre-LN
        x = vm.pre_layrnorm(x)
        tokens = vm.encoder(inputs_embeds=x).last_hidden_state
        g = self.grid
        return tokens.view(tokens.shape[0], g, g, -1).permute(0, 3, 1, 2)
