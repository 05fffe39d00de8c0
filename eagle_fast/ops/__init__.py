"""The only door to eagle_fast's kernels: one module per op, each with its pure-torch reference."""

from eagle_fast.ops._library import has_compiled_ops, has_cuda_kernels, has_triton, reference_ops
from eagle_fast.ops.attention import attention, attention_backend
from eagle_fast.ops.fused_preprocess import PreprocessOutput, fused_preprocess
from eagle_fast.ops.linear_cross_entropy import linear_cross_entropy
from eagle_fast.ops.paged_attention import paged_attention
from eagle_fast.ops.resize_concat import resize_concat

__all__ = [
    "PreprocessOutput",
    "attention",
    "attention_backend",
    "fused_preprocess",
    "linear_cross_entropy",
    "paged_attention",
    "resize_concat",
    "reference_ops",
    "has_compiled_ops",
    "has_cuda_kernels",
    "has_triton",
]
