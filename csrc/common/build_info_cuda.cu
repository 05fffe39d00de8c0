// nvcc's view of the CUDA build, compiled with the flags of every kernel TU of _C_cuda (same
// target): the architectures it generated code for, its own version and the toolkit's runtime
// version, and the host compiler and C++ standard it ran with. See build_info.h.
#include <cuda_runtime_api.h>  // CUDART_VERSION

#include "common/build_info.h"

#define EF_STR2(...) #__VA_ARGS__  // variadic: the list holds commas
#define EF_STR(...) EF_STR2(__VA_ARGS__)

namespace eagle_fast {

CudaBuildInfo cuda_build_info() {
#if defined(__CUDA_ARCH_LIST__)
  const char* archs = EF_STR(__CUDA_ARCH_LIST__);
#else
  const char* archs = "";
#endif
#if defined(__clang__)
  const char* host = "Clang " __clang_version__;
#elif defined(__GNUC__)
  const char* host = "GCC " __VERSION__;
#else
  const char* host = "unknown";
#endif
  return {archs,
          CUDART_VERSION,
          __CUDACC_VER_MAJOR__,
          __CUDACC_VER_MINOR__,
          __CUDACC_VER_BUILD__,
          static_cast<long>(__cplusplus),
          host};
}

}  // namespace eagle_fast
