"""The Eagle model: config, projector, splice and EagleLlamaForCausalLM (model_type "eagle_llama").

Importing eagle_fast registers "eagle_llama" with transformers' Auto classes (eagle_fast.model.auto),
so official checkpoints load through AutoModelForCausalLM. The names below load on first use
(PEP 562): importing eagle_fast.model.config alone does not build the model's module graph.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EagleLlamaConfig": "eagle_fast.model.config",
    "EagleLlamaForCausalLM": "eagle_fast.model.eagle",
    "EagleLlamaModel": "eagle_fast.model.eagle",
    "IGNORE_INDEX": "eagle_fast.constants",
    "IMAGE_TOKEN_INDEX": "eagle_fast.constants",
    "presets": "eagle_fast.model.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eagle_fast.model' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value  # once resolved, an ordinary attribute
    return value
