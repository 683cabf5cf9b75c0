// conv1x1_train, a bottleneck's 1x1 convolution (no bias, no padding) in training whose input x is
// relu(batch_norm(bn_input)) made by batch_norm_act (the unit before it, no residual): the
// forward is ATen's convolution (oneDNN's, as nn.Conv2d runs it); the op exists for its backward
// (csrc/autograd.cpp), which keeps bn_input (kept anyway by the BatchNorm's backward) rather than x
// and recomputes x for the weight gradient by batch_norm_act's own apply pass, bit for bit.
// Formula: resnet_fast.ops.reference.conv1x1_train.
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <torch/library.h>

namespace resnet_fast {
namespace {

at::Tensor conv1x1_train_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t stride, const at::Tensor& bn_input,
                             const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& bn_mean,
                             const at::Tensor& bn_var, double /*bn_eps*/, bool /*bn_training*/) {
  TORCH_CHECK(x.dim() == 4, "conv1x1_train: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 1 && weight.size(3) == 1,
              "conv1x1_train: expected a (K, ", x.size(1), ", 1, 1) weight, got shape ", weight.sizes());
  TORCH_CHECK(stride >= 1, "conv1x1_train: expected stride >= 1, got ", stride);
  TORCH_CHECK(bn_input.sizes() == x.sizes() && bn_input.scalar_type() == x.scalar_type(),
              "conv1x1_train: bn_input (the BatchNorm input x was made from) must have x's shape and dtype, got ",
              bn_input.scalar_type(), " ", bn_input.sizes(), " for x ", x.scalar_type(), " ", x.sizes());
  const int64_t C = x.size(1);
  for (const at::Tensor* t : {&bn_weight, &bn_bias, &bn_mean, &bn_var})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "conv1x1_train: bn_weight, bn_bias, bn_mean and bn_var must be "
                "vectors of x's ", C, " channels, got one of shape ", t->sizes());
  return at::convolution(x, weight, std::nullopt, {stride, stride}, {0, 0}, {1, 1}, false, {0, 0}, 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv1x1_train", &conv1x1_train_cpu);
}

}  // namespace resnet_fast
