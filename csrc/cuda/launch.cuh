#pragma once
// Launch helpers shared by the CUDA kernels of every op.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace resnet_fast {
namespace cuda {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; grid-stride loops cover the rest.
constexpr int64_t kMaxBlocks = 1 << 16;

inline unsigned blocks_for(int64_t numel) {
  return static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks));
}

inline bool dense_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// Logical (n, c, h, w) of the element at memory offset i of a dense NCHW or channels_last tensor.
struct Index4 {
  int64_t n, c, h, w;
};
template <bool ChannelsLast>
__device__ __forceinline__ Index4 decompose(int64_t i, int64_t C, int64_t H, int64_t W) {
  if (ChannelsLast) {
    const int64_t c = i % C;
    i /= C;
    const int64_t w = i % W;
    i /= W;
    return {i / H, c, i % H, w};
  }
  const int64_t w = i % W;
  i /= W;
  const int64_t h = i % H;
  i /= H;
  return {i / C, i % C, h, w};
}

}  // namespace cuda
}  // namespace resnet_fast
