"""convnext-1024: ConvNeXt (timm layout; official Eagle: ConvNeXt-XXLarge) -> stage-4 map.

Eagle's copy of timm's ConvNeXt names each block's layer scale `weight` (timm: `gamma`); this
module carries the official names, so checkpoints load without renaming. Stem 4x4/4 conv +
LayerNorm2d; stages 2-4 start with LayerNorm2d + 2x2/2 conv; blocks: 7x7 depthwise conv,
channels-last LayerNorm (eps 1e-5 in Eagle's copy), MLP x4 with exact GELU, layer scale, residual. The
classifier head (`head.norm`, `head.fc`) exists for the state dict and is never run: the expert
returns the raw stage-4 map, no final norm. 1024 input -> (B, 3072, 32, 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eagle_fast.vision.experts.base import ExpertSpec, VisionExpert


@dataclass
class ConvNextConfig:
    depths: tuple[int, ...] = (3, 4, 30, 3)
    dims: tuple[int, ...] = (384, 768, 1536, 3072)
    image_size: int = 1024
    num_classes: int = 1000  # the unused head of the checkpoint
    eps: float = 1e-5  # Eagle's copy of timm's ConvNeXt (timm's own default is 1e-6)
    # initial layer scale of every block (timm's ls_init_value): 1e-6 makes each block start as the
    # identity, right for fine-tuning; a network trained from scratch in a few minutes (the CPU
    # demo) learns much faster with its blocks switched on from the start
    layer_scale_init: float = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ConvNextBlock(nn.Module):
    def __init__(self, dim: int, eps: float, layer_scale_init: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim)
        self.weight = nn.Parameter(torch.full((dim,), layer_scale_init))  # layer scale (timm: gamma)
        self.layer_scale_init = layer_scale_init

    def reset_layer_scale(self) -> None:
        """Layer scale to its initial value: transformers builds models on the meta device and then
        initializes what a checkpoint does not hold (new experts on an LLM), module by module; a
        loaded value is kept."""
        from transformers import initialization  # its init functions leave loaded tensors alone

        with torch.no_grad():
            initialization.constant_(self.weight, self.layer_scale_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # channels-last for the norm and MLP
        y = self.mlp(self.norm(y)) * self.weight
        return x + y.permute(0, 3, 1, 2)


class ConvNextStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, downsample: bool, layer_scale_init: float):
        super().__init__()
        self.downsample = (
            nn.Sequential(LayerNorm2d(in_dim, eps=eps), nn.Conv2d(in_dim, dim, 2, stride=2))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(*(ConvNextBlock(dim, eps, layer_scale_init) for _ in range(depth)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class _Head(nn.Module):
    def __init__(self, dim: int, num_classes: int, eps: float):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)


class ConvNeXt(nn.Module):
    def __init__(self, cfg: ConvNextConfig):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.dims[0], 4, stride=4), LayerNorm2d(cfg.dims[0], eps=cfg.eps))
        self.stages = nn.Sequential(
            *(
                ConvNextStage(cfg.dims[max(i - 1, 0)], d, n, cfg.eps, i > 0, cfg.layer_scale_init)
                for i, (d, n) in enumerate(zip(cfg.dims, cfg.depths))
            )
        )
        self.head = _Head(cfg.dims[-1], cfg.num_classes, cfg.eps)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x


class ConvNextExpert(VisionExpert):
    def __init__(self, cfg: ConvNextConfig | None = None, name: str = "convnext-1024"):
        super().__init__()
        self.cfg = cfg or ConvNextConfig()
        self.vision_tower = ConvNeXt(self.cfg)
        self.spec = ExpertSpec(name, "canvas", self.cfg.dims[-1], self.cfg.image_size // 32)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) normalized canvas -> (B, dims[-1], S/32, S/32)."""
        return self.vision_tower(pixel_values.to(self.param_dtype()))
