#pragma once
// The 3x3 convolution (padding 1, no bias, stride 1 or 2) by our direct AVX-512 kernel
// (conv3x3_direct.cpp): training's conv3x3_train forward and input gradient where the caller's
// plan says `direct`.
#include <ATen/core/Tensor.h>

namespace resnet_fast {

// Whether the kernel runs these: float32, a (K, C, 3, 3) weight with K a multiple of 16, x
// (N, C, H, W), on a CPU with AVX-512.
bool conv3x3_direct_can_run(const at::Tensor& x, const at::Tensor& weight);

// conv2d(x, weight, stride, padding 1), stride 1 or 2, in channels_last (a clear error where it
// cannot run).
at::Tensor conv3x3_direct(const at::Tensor& x, const at::Tensor& weight, int64_t stride);

// Whether the stride-2 input gradient runs: float32 grad_out (N, K, OH, OW), a (K, C, 3, 3) weight
// with C a multiple of 16, on a CPU with AVX-512.
bool conv3x3_direct_input_grad_can_run(const at::Tensor& grad_out, const at::Tensor& weight);

// The input gradient of conv2d(x, weight, stride 2, padding 1) for x of input_size, in
// channels_last (a clear error where it cannot run).
at::Tensor conv3x3_direct_input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size);

}  // namespace resnet_fast
