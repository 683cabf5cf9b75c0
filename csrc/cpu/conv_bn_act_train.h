#pragma once
// The convolution of conv_bn_act_train (conv_bn_act_train.cpp), which its backward and the first
// 3x3 after a network's stem (csrc/autograd.cpp) recompute: one call, so that the recomputation is
// the forward's, bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>

#include <optional>

namespace resnet_fast {

// conv2d(x, weight) with a square stride and padding, no bias, dilation 1, one group.
inline at::Tensor square_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding) {
  return at::convolution(x, weight, std::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1);
}

}  // namespace resnet_fast
