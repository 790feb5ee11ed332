// Per-x86-level cloning of the CPU kernels (csrc/cpu/*.cpp), what ops.cpp reports of it, and the
// inline helpers the cloned kernels share.
//
// DENSEFUSE_CPU_CLONES: defined where the kernels are compiled once per x86-64 level and the copy for
// this CPU is picked at load time (GCC >= 12 target_clones; setup.py defines DENSEFUSE_X86); elsewhere
// they are compiled once, for the build's target.
// DF_CLONES: put on a kernel entry point to clone it (nothing elsewhere). Everything a kernel calls
// must be inlined into it (DF_INLINE, DF_ALWAYS_INLINE on lambdas) to be compiled for that level.
#pragma once

#include <cstring>

#if defined(DENSEFUSE_X86) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DENSEFUSE_CPU_CLONES 1
#endif

#ifdef DENSEFUSE_CPU_CLONES
#define DF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DF_CLONES
#endif
#define DF_ALWAYS_INLINE __attribute__((always_inline))
#define DF_INLINE inline DF_ALWAYS_INLINE

namespace densefuse::cpu {

// std::bit_cast for C++17 (inlined into the clones).
template <class To, class From>
DF_INLINE To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

}  // namespace densefuse::cpu
