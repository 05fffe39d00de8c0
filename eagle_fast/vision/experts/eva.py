"""det-1024: EVA-02 ViTDet backbone (official Eagle: EVA-02-L, COCO/O365 detection weights).

Patch 16 conv (with bias) -> (B, 64, 64, 1024) tokens + the absolute position table, stored for a
14 x 14 pre-training grid with a CLS entry (1, 197, 1024) and resized every forward: CLS dropped,
bicubic, align_corners=False, fp32, to the token grid. 24 pre-norm blocks (LayerNorm eps 1e-6):
attention with q/v biases only, 2-D RoPE on q and k, windowed over 16 x 16 windows except the
global blocks 2, 5, 8, ..., 23; SwiGLU MLP (hidden 2730) with a LayerNorm before its output
projection. No final norm: output (B, 1024, 64, 64).

2-D RoPE (EVA's VisionRotaryEmbeddingFast): per axis dim/2 = 32 channels, 16 frequencies
1 / 10000^(2i/32) each repeated twice (interleaved pairs), coordinates arange(N) / N * 16 with
N = 16 (window blocks) or 64 (global blocks); the row axis fills the first 32 channels of a head,
the column axis the last 32; rotation on interleaved pairs (x1, x2) -> (-x2, x1). The tables are
recomputed from the config, never loaded (non-persistent buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eagle_fast.ops.attention import attention
from eagle_fast.vision.experts.base import ExpertSpec, VisionExpert


@dataclass
class EvaConfig:
    image_size: int = 1024
    patch_size: int = 16
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 2730  # int(1024 * 8 / 3)
    window: int = 16
    global_blocks: tuple[int, ...] = (2, 5, 8, 11, 14, 17, 20, 23)
    pretrain_grid: int = 14  # the stored position table: 14 x 14 (+ CLS)
    rope_pt_seq: int = 16
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def rope_2d(head_dim: int, n: int, pt_seq: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables (n*n, head_dim) for an n x n token grid, rows then columns."""
    half = head_dim // 2  # per axis
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half)  # (half/2,)
    t = torch.arange(n, dtype=torch.float64) / n * pt_seq
    f = torch.repeat_interleave(torch.outer(t, freqs), 2, dim=-1)  # (n, half): pairs share a frequency
    grid = torch.cat([f[:, None, :].expand(n, n, half), f[None, :, :].expand(n, n, half)], dim=-1)
    grid = grid.reshape(n * n, head_dim)
    return grid.cos().float(), grid.sin().float()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., 2k) interleaved pairs (x1, x2) -> (-x2, x1)."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)


def window_partition(x: torch.Tensor, w: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, w*w, C), zero-padding H and W up to multiples of w."""
    b, h, wd, c = x.shape
    ph, pw = (-h) % w, (-wd) % w
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, wd + pw
    x = x.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c), (hp, wp)


def window_unpartition(x: torch.Tensor, w: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of window_partition: (B * nH * nW, w*w, C) -> (B, H, W, C)."""
    hp, wp = padded
    b = x.shape[0] // (hp // w * wp // w)
    x = x.view(b, hp // w, wp // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : size[0], : size[1]].contiguous()


class EvaAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (N, T, C) windows of T tokens; cos/sin (T, head_dim)."""
        n, t, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias).view(n, t, self.heads, -1)
        k = self.k_proj(x).view(n, t, self.heads, -1)
        v = F.linear(x, self.v_proj.weight, self.v_bias).view(n, t, self.heads, -1)
        cos, sin = cos[:, None, :].to(q.dtype), sin[:, None, :].to(q.dtype)
        q = q * cos + rotate_pairs(q) * sin
        k = k * cos + rotate_pairs(k) * sin
        return self.proj(attention(q, k, v, causal=False).reshape(n, t, c))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, cfg: EvaConfig, window: int):
        super().__init__()
        self.window = window  # 0: global attention over the whole grid
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = EvaAttention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, cfg.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window:
            win, padded = window_partition(y, self.window)
            y = window_unpartition(self.attn(win, cos, sin), self.window, padded, (h, w))
        else:
            y = self.attn(y.reshape(b, h * w, c), cos, sin).view(b, h, w, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)


class EvaViT(nn.Module):
    def __init__(self, cfg: EvaConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pretrain_grid**2 + 1, cfg.dim))
        self.blocks = nn.ModuleList(
            EvaBlock(cfg, 0 if i in cfg.global_blocks else cfg.window) for i in range(cfg.depth)
        )
        for name, (cos, sin) in self._rope_tables().items():
            self.register_buffer(f"rope_{name}_cos", cos, persistent=False)
            self.register_buffer(f"rope_{name}_sin", sin, persistent=False)
        self.grad_checkpointing = False

    def _rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        head_dim = self.cfg.dim // self.cfg.heads
        return {
            name: rope_2d(head_dim, n, self.cfg.rope_pt_seq)
            for name, n in (("win", self.cfg.window), ("glb", self.cfg.grid))
        }

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Recomputes the RoPE tables in place: checkpoint loaders that build the model on the meta
        device leave non-persistent buffers uninitialized."""
        for name, (cos, sin) in self._rope_tables().items():
            getattr(self, f"rope_{name}_cos").copy_(cos)
            getattr(self, f"rope_{name}_sin").copy_(sin)

    def resized_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C): the stored grid (CLS dropped) resized bicubic, align_corners=False, in fp32."""
        g = self.cfg.pretrain_grid
        table = self.pos_embed[:, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if (h, w) != (g, g):
            table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixel_values).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = x + self.resized_pos_embed(x.shape[1], x.shape[2]).to(x.dtype)
        for blk in self.blocks:
            rope = (self.rope_win_cos, self.rope_win_sin) if blk.window else (self.rope_glb_cos, self.rope_glb_sin)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, *rope, use_reentrant=False)
            else:
                x = blk(x, *rope)
        return x.permute(0, 3, 1, 2)


class EvaExpert(VisionExpert):
    def __init__(self, cfg: EvaConfig | None = None, name: str = "det-1024"):
        super().__init__()
        self.cfg = cfg or EvaConfig()
        if self.cfg.grid % self.cfg.window:
            raise ValueError(f"{name}: token grid {self.cfg.grid} is not a multiple of the window {self.cfg.window}")
        self.vision_tower = EvaViT(self.cfg)
        self.spec = ExpertSpec(name, "canvas", self.cfg.dim, self.cfg.grid)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> (B, dim, S/16, S/16)."""
        return self.vision_tower(pixel_values.to(self.param_dtype()))
