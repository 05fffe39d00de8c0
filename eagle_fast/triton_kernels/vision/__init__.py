"""Triton kernels of eagle_fast::resize_concat."""
