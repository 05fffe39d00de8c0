"""eagle_fast: a fast re-implementation of NVIDIA's Eagle mixture-of-vision-experts MLLM."""

__version__ = "0.1.0"
