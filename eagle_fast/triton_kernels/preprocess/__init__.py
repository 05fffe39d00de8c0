"""Triton kernels of eagle_fast::fused_preprocess."""
