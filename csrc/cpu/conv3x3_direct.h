#pragma once
// The stride-1 3x3 convolution (padding 1, no bias) by our direct AVX-512 kernel
// (conv3x3_direct.cpp): training's conv3x3_train forward and input gradient where the caller's
// plan says `direct`.
#include <ATen/core/Tensor.h>

namespace resnet_fast {

// Whether the kernel runs these: float32, a (K, C, 3, 3) weight with K a multiple of 16, x
// (N, C, H, W), on a CPU with AVX-512.
bool conv3x3_direct_can_run(const at::Tensor& x, const at::Tensor& weight);

// conv2d(x, weight, stride 1, padding 1) in channels_last (a clear error where it cannot run).
at::Tensor conv3x3_direct(const at::Tensor& x, const at::Tensor& weight);

}  // namespace resnet_fast
