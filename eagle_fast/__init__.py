"""eagle_fast: a fast re-implementation of NVIDIA's Eagle mixture-of-vision-experts MLLM.

`import eagle_fast` registers model_type "eagle_llama" with transformers' Auto classes and nothing
more: the public names below load on first use (PEP 562), and each layer (ops, data, vision, model,
inference, train) imports only the layers beneath it.
"""

from __future__ import annotations

import importlib
from typing import Any

from eagle_fast.model.auto import register as _register

_register()

__version__ = "0.1.0"
_EXPORTS = {
    "ChatSession": "eagle_fast.inference.session",
    "load_model": "eagle_fast.inference.loading",
    "EagleImageProcessor": "eagle_fast.vision.processor",
}
__all__ = ["ChatSession", "EagleImageProcessor", "load_model", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eagle_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
