// The Python module shell of eagle_fast._C / eagle_fast._C_cuda. Importing it runs the static
// TORCH_LIBRARY registrations of the kernels linked into the same library: the ops are dispatcher
// custom ops (torch.compile, fake tensors and opcheck see them), never pybind11 functions.
//
// The module's one Python function, build_info(), is bound with pybind11 (the headers torch ships;
// no libtorch_python, no <torch/extension.h>). This is the only TU that includes pybind11.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <initializer_list>
#include <string>

#include "common/cpu_isa.h"
#if defined(EF_CUDA_MODULE)
#include "common/build_info.h"
#endif

#ifndef EF_MODULE_NAME
#define EF_MODULE_NAME _C
#endif
#define EF_STR2(x) #x
#define EF_STR(x) EF_STR2(x)
// Set by CMakeLists.txt on this file only (a torch upgrade rebuilds it, not the kernels).
#ifndef EF_TORCH_VERSION
#define EF_TORCH_VERSION ""
#endif
#ifndef EF_TORCH_CUDA_VERSION
#define EF_TORCH_CUDA_VERSION ""
#endif
#ifndef EF_BUILD_TYPE
#define EF_BUILD_TYPE ""
#endif

namespace py = pybind11;

namespace {

// Which clone the ifunc resolver picks for each clone list of common/cpu_isa.h: the same targets,
// as C++ function versions, go through the same GCC dispatcher (same priority order, same CPU
// feature tests) as the kernels' target_clones, so the answer is the resolver's, not a re-derivation.
#if defined(EF_CPU_CLONES) && !defined(EF_CUDA_MODULE)
__attribute__((target(EF_ISA_V4))) const char* clone_v4() {
  return EF_ISA_V4;
}
__attribute__((target(EF_ISA_AVX2))) const char* clone_v4() {
  return EF_ISA_AVX2;
}
__attribute__((target("default"))) const char* clone_v4() {
  return "default";
}
__attribute__((target(EF_ISA_V3))) const char* clone_v3() {
  return EF_ISA_V3;
}
__attribute__((target("default"))) const char* clone_v3() {
  return "default";
}
#endif

std::string cxx_standard(long v) {
  return v >= 202302L ? "C++23" : v >= 202002L ? "C++20" : v >= 201703L ? "C++17" : "C++14";
}

py::object str_or_none(const char* s) {
  return s[0] ? py::object(py::str(s)) : py::object(py::none());
}

#if !defined(EF_CUDA_MODULE)
// The CPU kernels' instruction-set paths: per op with clones, the targets and the clone taken.
py::dict cpu_isa() {
  py::dict ops;
#if defined(EF_CPU_CLONES)
  const auto entry = [](std::initializer_list<const char*> targets, const char* selected) {
    py::list t;
    for (const char* s : targets) t.append(s);
    py::dict d;
    d["targets"] = t;
    d["selected"] = selected;
    return d;
  };
  ops["fused_preprocess"] = entry({EF_ISA_V4, EF_ISA_AVX2, "default"}, clone_v4());
  ops["linear_cross_entropy"] = entry({EF_ISA_V3, "default"}, clone_v3());
  ops["paged_attention"] = entry({EF_ISA_V3, "default"}, clone_v3());
#endif
  py::dict d;
#if defined(EF_CPU_CLONES)
  d["dispatch"] = "ifunc (GCC target_clones, resolved when the library loads)";
#else
  d["dispatch"] = "none (one baseline build: not x86-64 GCC)";
#endif
  d["ops"] = ops;
  return d;
}
#endif

py::dict build_info() {
  py::dict d;
  d["module"] = "eagle_fast." EF_STR(EF_MODULE_NAME);
  d["torch_version"] = EF_TORCH_VERSION;
  d["torch_cuda_version"] = str_or_none(EF_TORCH_CUDA_VERSION);
  d["build_type"] = EF_BUILD_TYPE;
#if defined(__clang__)
  d["compiler"] = "Clang " __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = "GCC " __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["cxx_standard"] = cxx_standard(__cplusplus);
#if defined(EF_CUDA_MODULE)
  const eagle_fast::CudaBuildInfo c = eagle_fast::cuda_build_info();
  py::list archs;  // "800,900" -> ["sm_80", "sm_90"]
  std::string list = c.arch_list;
  for (size_t start = 0; start < list.size();) {
    const size_t end = std::min(list.find(',', start), list.size());
    const int a = std::stoi(list.substr(start, end - start));
    archs.append("sm_" + std::to_string(a / 10));
    start = end + 1;
  }
  d["cuda_archs"] = archs;
  const auto dotted = [](std::initializer_list<int> parts) {
    std::string s;
    for (const int v : parts) s += (s.empty() ? "" : ".") + std::to_string(v);
    return s;
  };
  d["cuda_runtime_version"] = dotted({c.cudart_version / 1000, c.cudart_version % 1000 / 10});  // 13000 -> 13.0
  d["nvcc_version"] = dotted({c.nvcc_major, c.nvcc_minor, c.nvcc_build});
  d["cuda_host_compiler"] = c.host_compiler;
  d["cuda_cxx_standard"] = cxx_standard(c.cplusplus);
#else
#if defined(_OPENMP)
  d["openmp"] = py::int_(_OPENMP);  // the OpenMP spec date, e.g. 201511
#else
  d["openmp"] = py::none();
#endif
  d["cpu_isa"] = cpu_isa();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(EF_MODULE_NAME, m) {
  m.doc() = "eagle_fast compiled kernels: importing registers them as eagle_fast:: custom ops.";
  m.def("build_info", &build_info,
        "How this library was built: torch and CUDA versions, compiler, C++ standard, and the CPU "
        "instruction-set clones taken (_C) or the CUDA architectures compiled (_C_cuda).");
}
