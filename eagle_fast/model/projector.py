"""The multimodal projector: fused vision features (.., mm_hidden) -> LLM embeddings (.., hidden).

Types (LLaVA's names, as stored in `mm_projector_type`): "linear", "mlp{N}x_gelu" (N linear
layers with exact-erf GELU between them; Eagle uses mlp2x_gelu, keys `0.*` and `2.*`), "identity".
"""

from __future__ import annotations

import re

from torch import nn


def build_projector(kind: str, mm_hidden: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(mm_hidden, hidden)
    if kind == "identity":
        if mm_hidden != hidden:
            raise ValueError(f"projector 'identity' needs mm_hidden_size == hidden_size, got {mm_hidden} and {hidden}")
        return nn.Identity()
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m and int(m[1]) >= 1:
        layers: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
        for _ in range(int(m[1]) - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown mm_projector_type {kind!r} (linear, mlp<N>x_gelu, identity)")
