"""eagle_fast: a fast re-implementation of NVIDIA's Eagle mixture-of-vision-experts MLLM."""

from eagle_fast.vision.processor import EagleImageProcessor

__version__ = "0.1.0"
__all__ = ["EagleImageProcessor", "__version__"]
