"""eagle_fast: a fast re-implementation of NVIDIA's Eagle mixture-of-vision-experts MLLM."""

import eagle_fast.model  # noqa: F401  (registers "eagle_llama" with transformers' Auto classes)
from eagle_fast.inference import ChatSession, load_model
from eagle_fast.vision.processor import EagleImageProcessor

__version__ = "0.1.0"
__all__ = ["ChatSession", "EagleImageProcessor", "load_model", "__version__"]
