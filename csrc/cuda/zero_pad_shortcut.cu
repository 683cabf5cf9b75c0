// CUDA kernels of the option-A shortcut: one thread per output element, in the output's
// memory order so that stores coalesce. The per-element math is shared with the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/zero_pad_shortcut.h"
#include "cuda/launch.cuh"

namespace resnet_fast {
namespace {

using cuda::blocks_for;
using cuda::decompose;
using cuda::dense_channels_last;
using cuda::Index4;
using cuda::kThreads;

template <typename T, bool ChannelsLast>
__global__ void zero_pad_shortcut_kernel(T* __restrict__ out, const T* __restrict__ x, Strides4 xs, int64_t numel,
                                         int64_t C, int64_t H, int64_t W, int64_t in_channels, int64_t stride) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Index4 p = decompose<ChannelsLast>(i, C, H, W);
    out[i] = zero_pad_shortcut_at(x, xs, in_channels, stride, p.n, p.c, p.h, p.w);
  }
}

template <typename T, bool ChannelsLast>
__global__ void zero_pad_shortcut_backward_kernel(T* __restrict__ grad_x, const T* __restrict__ grad_out, Strides4 gs,
                                                  int64_t numel, int64_t C, int64_t H, int64_t W, int64_t stride) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Index4 p = decompose<ChannelsLast>(i, C, H, W);
    grad_x[i] = zero_pad_shortcut_grad_at(grad_out, gs, stride, p.n, p.c, p.h, p.w);
  }
}

at::Tensor zero_pad_shortcut_cuda(const at::Tensor& x, int64_t out_channels, int64_t stride) {
  check_zero_pad_shortcut_args(x, out_channels, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), out_channels, zero_pad_shortcut_out_size(x.size(2), stride),
                              zero_pad_shortcut_out_size(x.size(3), stride)},
                             x.options().memory_format(x.suggest_memory_format()));
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const bool cl = dense_channels_last(out);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "zero_pad_shortcut_cuda", [&] {
    auto kernel = cl ? zero_pad_shortcut_kernel<scalar_t, true> : zero_pad_shortcut_kernel<scalar_t, false>;
    kernel<<<blocks_for(numel), kThreads, 0, stream>>>(out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                       strides_of(x), numel, out.size(1), out.size(2), out.size(3),
                                                       x.size(1), stride);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor zero_pad_shortcut_backward_cuda(const at::Tensor& grad_out, at::IntArrayRef input_size, int64_t stride) {
  check_zero_pad_shortcut_backward_args(grad_out, input_size, stride);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor grad_x = at::empty(input_size, grad_out.options().memory_format(grad_out.suggest_memory_format()));
  const int64_t numel = grad_x.numel();
  if (numel == 0) return grad_x;
  const bool cl = dense_channels_last(grad_x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "zero_pad_shortcut_backward_cuda", [&] {
    auto kernel = cl ? zero_pad_shortcut_backward_kernel<scalar_t, true> : zero_pad_shortcut_backward_kernel<scalar_t, false>;
    kernel<<<blocks_for(numel), kThreads, 0, stream>>>(grad_x.mutable_data_ptr<scalar_t>(),
                                                       grad_out.const_data_ptr<scalar_t>(), strides_of(grad_out), numel,
                                                       grad_x.size(1), grad_x.size(2), grad_x.size(3), stride);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("zero_pad_shortcut", &zero_pad_shortcut_cuda);
  m.impl("zero_pad_shortcut_backward", &zero_pad_shortcut_backward_cuda);
}

}  // namespace resnet_fast
