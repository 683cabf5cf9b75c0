// conv_bn_act_train, a convolution + BatchNorm (+ ReLU) in training whose input is kept anyway (a
// network's stem: the images; a projection shortcut: the block's input, which its first convolution
// keeps): y = [relu](batch_norm(conv2d(x, weight))) with the batch's statistics, and the mean and
// biased variance it normalised with. The forward is ATen's convolution (oneDNN's, as nn.Conv2d runs
// it) and batch_norm_act's CPU kernel; the op exists for its backward (csrc/autograd.cpp), which keeps
// x rather than the convolution's output, and recomputes that output, bit for bit, by the same
// convolution (ResNet-50's stem at batch 16: 12 ms of a 3 s step, for 51 MB not kept from the
// forward to the backward).
// Formula: resnet_fast.ops.reference.conv_bn_act_train.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/batch_norm_act.h"
#include "cpu/conv_bn_act_train.h"

namespace resnet_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_act_train_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                      int64_t stride, int64_t padding,
                                                                      const at::Tensor& bn_weight,
                                                                      const at::Tensor& bn_bias, double bn_eps,
                                                                      bool relu) {
  TORCH_CHECK(x.dim() == 4, "conv_bn_act_train: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D of shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "conv_bn_act_train: expected a float32 or float64 input, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == weight.size(3),
              "conv_bn_act_train: expected a square (K, ", x.size(1), ", k, k) weight, got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "conv_bn_act_train: the weight must have the input's dtype (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(stride >= 1, "conv_bn_act_train: expected stride >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "conv_bn_act_train: expected padding >= 0, got ", padding);
  const int64_t K = weight.size(0);
  for (const at::Tensor* t : {&bn_weight, &bn_bias})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == K, "conv_bn_act_train: bn_weight and bn_bias must be vectors of the ",
                K, " output channels, got one of shape ", t->sizes());
  // ATen's convolution checks the map against the kernel and says so in its own words.
  const at::Tensor c = square_conv(x, weight, stride, padding);
  return batch_norm_act_forward(c, bn_weight, bn_bias, std::nullopt, std::nullopt, std::nullopt, 1, true, bn_eps, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv_bn_act_train", &conv_bn_act_train_cpu);
}

}  // namespace resnet_fast
