#pragma once
// Shared between the CPU (.cpp) and CUDA (.cu) kernels: per-element math is written once,
// as RF_HOST_DEVICE functions, so the CPU tests exercise the code the GPU runs.
#include <cstdint>

#if defined(__CUDACC__)
#define RF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RF_HOST_DEVICE inline
#endif

namespace resnet_fast {

// Element strides of a 4-D (N, C, H, W) tensor, in logical dimension order.
struct Strides4 {
  int64_t n, c, h, w;
};

}  // namespace resnet_fast
