"""pix2struct-1024: HF Pix2Struct vision encoder (official Eagle: Pix2Struct-Large) on the
processor's flattened patches; the first rows * cols output tokens (45 x 45 = 2025 for a square
1024 canvas) form the map (B, 1536, 45, 45). The final layernorm is applied (HF's output).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from eagle_fast.preprocess_plan import pix2struct_grid
from eagle_fast.vision.experts.base import ExpertSpec, VisionExpert
from eagle_fast.vision.experts.hf_attention import hf_attention


@dataclass
class Pix2StructConfig:
    hidden_size: int = 1536
    patch_embed_hidden_size: int = 768  # 16 * 16 * 3 values per patch
    d_ff: int = 3968
    d_kv: int = 64
    num_attention_heads: int = 24
    num_hidden_layers: int = 18
    dense_act_fn: str = "gelu_new"
    layer_norm_eps: float = 1e-6
    seq_len: int = 4096
    max_patches: int = 2048
    patch_size: int = 16
    image_size: int = 1024  # square canvas -> rows = cols = grid

    def hf(self):
        from transformers import Pix2StructVisionConfig

        kw = dataclasses.asdict(self)
        for k in ("max_patches", "patch_size", "image_size"):
            kw.pop(k)
        return Pix2StructVisionConfig(**kw)

    @property
    def grid(self) -> int:
        """Patches per side of the processor's grid for the square canvas (45 for 1024 / 2048 / 16)."""
        rows, cols = pix2struct_grid(self.image_size, self.image_size, self.max_patches, self.patch_size)
        return rows


class Pix2StructExpert(VisionExpert):
    def __init__(self, cfg: Pix2StructConfig | None = None, name: str = "pix2struct-1024"):
        super().__init__()
        from transformers import Pix2StructVisionModel

        self.cfg = cfg or Pix2StructConfig()
        self.vision_tower = Pix2StructVisionModel(hf_attention(self.cfg.hf()))
        self.spec = ExpertSpec(name, "pix2struct", self.cfg.hidden_size, self.cfg.grid)

    def forward(self, flattened_patches: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """flattened_patches (B, P, 2 + p*p*3), attention_mask (B, P) -> map (B, hidden, g, g)."""
        g = self.grid
        out = self.vision_tower(
            flattened_patches=flattened_patches.to(self.param_dtype()), attention_mask=attention_mask
        ).last_hidden_state
        return out[:, : g * g].reshape(out.shape[0], g, g, -1).permute(0, 3, 1, 2)
