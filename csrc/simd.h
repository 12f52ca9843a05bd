// Function multiversioning for the CPU kernels' hot loops.
#pragma once

// The build targets baseline x86-64 (SSE2), so a loop marked KVPO_SIMD_CLONES is also compiled for
// AVX2 + FMA and AVX-512, and the loader picks the widest the CPU runs. (GCC 11 named the
// x86-64-v3/v4 levels; other compilers get the baseline build.) Only non-template functions.
#if defined(__GNUC__) && __GNUC__ >= 11 && !defined(__clang__) && defined(__x86_64__)
#define KVPO_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVPO_SIMD_CLONES
#endif
