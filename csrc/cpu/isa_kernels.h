// Includes a file's kernels (the .inc named by RF_KERNELS) twice, as isa.h describes: once in
// namespace cpu_generic and, where RESNET_FAST_AVX2 is defined, once in namespace cpu_avx2 inside
// `#pragma GCC target("avx2,fma")`; RF_KERNEL_AVX2 is 0 or 1 inside the .inc. Use inside
// namespace resnet_fast:
//   #define RF_KERNELS "cpu/<op>_kernels.inc"
//   #include "cpu/isa_kernels.h"
// (No include guard: each kernel file includes it once, with its own RF_KERNELS.)
#ifndef RF_KERNELS
#error "define RF_KERNELS (the kernels' .inc) before including cpu/isa_kernels.h"
#endif

namespace cpu_generic {
#define RF_KERNEL_AVX2 0
#include RF_KERNELS
#undef RF_KERNEL_AVX2
}  // namespace cpu_generic

#ifdef RESNET_FAST_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace cpu_avx2 {
#define RF_KERNEL_AVX2 1
#include RF_KERNELS
#undef RF_KERNEL_AVX2
}  // namespace cpu_avx2
#pragma GCC pop_options
#endif

#undef RF_KERNELS
