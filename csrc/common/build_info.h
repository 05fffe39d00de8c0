// What nvcc compiled eagle_fast._C_cuda for, read inside an nvcc-compiled TU (build_info_cuda.cu)
// because only nvcc defines it; csrc/module.cpp, compiled by the C++ compiler, puts it into
// build_info(). Plain C++ on both sides: no ATen, no pybind11.
#pragma once

namespace eagle_fast {

struct CudaBuildInfo {
  const char* arch_list;  // nvcc's __CUDA_ARCH_LIST__, e.g. "800,900" ("" before CUDA 11.5)
  int cudart_version;     // CUDART_VERSION of the toolkit headers, e.g. 13000
  int nvcc_major, nvcc_minor, nvcc_build;
  long cplusplus;  // __cplusplus of the CUDA TUs' host compilation
  const char* host_compiler;
};

CudaBuildInfo cuda_build_info();

}  // namespace eagle_fast
