// CPU implementation of bias_act, the inference epilogue after a convolution with BatchNorm folded
// into its weights: y = act(x + bias[c] + r) (formula: resnet_fast.ops.reference.bias_act). It runs
// batch_norm_act's apply loops (cpu/batch_norm_act/apply.inc) with a scale of 1.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/batch_norm_act.h"

namespace resnet_fast {
namespace {

at::Tensor bias_act_cpu(const at::Tensor& input, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                        int64_t residual_stride, bool relu) {
  check_bias_act_args(input, bias, residual, residual_stride);
  const auto fmt = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto acc = x.options().dtype(acc_dtype(x));
  channel_affine_act(x, y, at::ones({x.size(1)}, acc), bias.to(acc_dtype(x)).contiguous(), residual, residual_stride,
                     relu);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
}

}  // namespace resnet_fast
