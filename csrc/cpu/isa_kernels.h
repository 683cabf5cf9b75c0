// Includes a file's kernels (the .inc named by RF_KERNELS) twice, as isa.h describes: once in
// namespace cpu_generic and, where RESNET_FAST_AVX2 is defined, once in namespace cpu_avx2 inside
// `#pragma GCC target("avx2,fma")`; RF_KERNEL_AVX2 is 0 or 1 inside the .inc. A file that also
// has AVX-512 kernels defines RF_KERNELS_AVX512 first: its .inc is then included a third time, in
// namespace cpu_avx512 inside `#pragma GCC target("avx512f,avx2,fma")`, with RF_KERNEL_AVX512 1
// (0 in the other two). Use inside namespace resnet_fast:
//   #define RF_KERNELS "cpu/<op>_kernels.inc"
//   #include "cpu/isa_kernels.h"
// (No include guard: each kernel file includes it once, with its own RF_KERNELS.)
#ifndef RF_KERNELS
#error "define RF_KERNELS (the kernels' .inc) before including cpu/isa_kernels.h"
#endif

#define RF_KERNEL_AVX512 0
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
#undef RF_KERNEL_AVX512
#ifdef RF_KERNELS_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// (GCC 12 warns of the uninitialised vector inside its own _mm512_undefined_ps.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace cpu_avx512 {
#define RF_KERNEL_AVX2 1
#define RF_KERNEL_AVX512 1
#include RF_KERNELS
#undef RF_KERNEL_AVX512
#undef RF_KERNEL_AVX2
}  // namespace cpu_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#undef RF_KERNELS_AVX512
#endif
#else
#undef RF_KERNEL_AVX512
#endif

#undef RF_KERNELS
