"""Triton kernels of eagle_fast (the GPU path where the CUDA C++ build is absent)."""
