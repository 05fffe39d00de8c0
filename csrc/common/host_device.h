// EF_HD marks per-element maths compiled for both the CPU kernels and the CUDA kernels, so the
// CPU tests exercise the arithmetic the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define EF_HD __host__ __device__ __forceinline__
#else
#define EF_HD inline
#endif
