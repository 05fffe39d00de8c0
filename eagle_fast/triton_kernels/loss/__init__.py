"""Triton kernels of eagle_fast::linear_cross_entropy."""
