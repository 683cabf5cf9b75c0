#pragma once
// Run-time choice between a kernel's two builds: a file includes its kernels (a .inc) once in
// namespace cpu_generic and, where RESNET_FAST_AVX2 is defined, once more in namespace cpu_avx2
// inside `#pragma GCC target("avx2,fma")` (cpu/isa_kernels.h does both); RF_ISA(fn<...>) then
// names the build this CPU runs.
#if defined(__GNUC__) && defined(__x86_64__)
#define RESNET_FAST_AVX2 1
#endif

namespace resnet_fast {

inline bool use_avx2() {
#ifdef RESNET_FAST_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// AVX-512F (kernels built with RF_KERNELS_AVX512, see cpu/isa_kernels.h).
inline bool use_avx512() {
#ifdef RESNET_FAST_AVX2
  static const bool yes = use_avx2() && __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

}  // namespace resnet_fast

#ifdef RESNET_FAST_AVX2
#define RF_ISA(...) (::resnet_fast::use_avx2() ? cpu_avx2::__VA_ARGS__ : cpu_generic::__VA_ARGS__)
#else
#define RF_ISA(...) (cpu_generic::__VA_ARGS__)
#endif
