// The check_<op> ops (schemas in ops.cpp): the argument checks of csrc/common/checks.h on their own,
// for any device, so that the Triton launchers refuse bad input with the C++ kernels' words.
#include <torch/library.h>

#include "common/checks.h"

namespace resnet_fast {
namespace {

void check_zero_pad_shortcut(const at::Tensor& x, int64_t out_channels, int64_t stride) {
  check_zero_pad_shortcut_args(x, out_channels, stride);
}

void check_zero_pad_shortcut_backward(const at::Tensor& grad_out, at::IntArrayRef input_size, int64_t stride) {
  check_zero_pad_shortcut_backward_args(grad_out, input_size, stride);
}

void check_batch_norm_act(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                          const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& residual, int64_t residual_stride, bool training,
                          double /*eps*/, bool /*relu*/) {
  check_batch_norm_act_args(x, weight, bias, running_mean, running_var, residual, residual_stride, training);
}

void check_batch_norm_act_backward(const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& output,
                                   const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                                   bool /*training*/, double /*eps*/, bool relu, bool /*residual_grad*/,
                                   const std::optional<at::Tensor>& bias) {
  check_batch_norm_act_backward_args("batch_norm_act_backward", grad_y, x, output, weight, mean, var, relu, bias,
                                     /*mask_from_input=*/false);
}

void check_bias_act(const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                    int64_t residual_stride, bool /*relu*/) {
  check_bias_act_args(x, bias, residual, residual_stride);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CompositeExplicitAutograd, m) {
  m.impl("check_zero_pad_shortcut", &check_zero_pad_shortcut);
  m.impl("check_zero_pad_shortcut_backward", &check_zero_pad_shortcut_backward);
  m.impl("check_batch_norm_act", &check_batch_norm_act);
  m.impl("check_batch_norm_act_backward", &check_batch_norm_act_backward);
  m.impl("check_bias_act", &check_bias_act);
}

}  // namespace resnet_fast
