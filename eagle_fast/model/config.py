"""EagleLlamaConfig: a Llama config plus the official Eagle multimodal fields (model_type "eagle_llama").

Field names and defaults follow the official checkpoints' config.json (written by the LLaVA-derived
training code with transformers 4.37), so those files load as they are: `mm_vision_tower` (the
`;`-joined mixture), `mm_hidden_size`, `mm_projector_type`, `image_aspect_ratio`, ... . Fields the
original carries but never reads (`mm_vision_select_layer`, `mm_vision_select_feature`,
`mm_patch_merge_type`, ...) are kept for round trips. Two fields are ours: `mm_grid` (the fusion
grid, 32 in every official model) and `mm_expert_configs` (per-expert architecture overrides, for
small models; empty means the official expert sizes).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

X5 = "clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"


@strict
class EagleLlamaConfig(LlamaConfig):
    model_type = "eagle_llama"

    mm_vision_tower: str = X5
    mm_hidden_size: int | None = None  # sum of the experts' channels; filled in from the mixture
    mm_projector_type: str = "mlp2x_gelu"
    mm_grid: int = 32
    mm_expert_configs: dict[str, dict[str, Any]] | None = None
    image_aspect_ratio: str = "pad"
    image_size: int = 1024
    mm_vision_select_layer: int = -2  # stored by the original, ignored by every Eagle expert
    mm_vision_select_feature: str = "patch"
    mm_patch_merge_type: str = "flat"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    mm_projector_lr: float | None = None
    use_mm_proj: bool = True
    tune_mm_mlp_adapter: bool = False
    freeze_mm_mlp_adapter: bool = False
    tokenizer_model_max_length: int = 2048
    tokenizer_padding_side: str = "right"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        from eagle_fast.vision.processor import parse_mixture

        names = parse_mixture(self.mm_vision_tower)
        if self.mm_expert_configs:
            unknown = set(self.mm_expert_configs) - set(names)
            if unknown:
                raise ValueError(f"mm_expert_configs names experts not in mm_vision_tower: {sorted(unknown)}")
