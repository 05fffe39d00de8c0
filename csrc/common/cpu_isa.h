// The instruction-set clones of the CPU kernels' hot loops, in one place.
//
// On x86-64 GCC builds a function marked EF_CLONES_V3 or EF_CLONES_V4 is compiled once per listed
// target, and the dynamic linker's ifunc resolver picks one clone per function when _C loads
// (best target the CPU supports first, "default" = the x86-64 baseline, SSE2). The wheel stays
// portable; a modern CPU still runs AVX2 / AVX-512 code. Elsewhere (clang, other CPUs) the macros
// are empty and the baseline build runs. build_info() reports the clone each list resolves to with
// probes of the same targets (csrc/module.cpp): a new list here needs its probe there.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EF_CPU_CLONES 1
#define EF_ISA_V4 "arch=x86-64-v4"  // AVX-512 F/BW/CD/DQ/VL on top of v3
#define EF_ISA_V3 "arch=x86-64-v3"  // AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE
#define EF_ISA_AVX2 "avx2"
// AVX2 + FMA (8 fp32 lanes) or the baseline: the fp32 row passes of the loss and of paged attention.
#define EF_CLONES_V3 __attribute__((target_clones(EF_ISA_V3, "default")))
// AVX-512, AVX2 or the baseline: fused_preprocess's integer and float row kernels.
#define EF_CLONES_V4 __attribute__((target_clones(EF_ISA_V4, EF_ISA_AVX2, "default")))
#else
#define EF_CLONES_V3
#define EF_CLONES_V4
#endif
