#pragma once
// Host-side helpers and argument checks shared by the CPU and CUDA implementations of each op, so both reject
// bad input with the same message.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <type_traits>

#include "common/macros.h"

namespace resnet_fast {

// Arithmetic type of a kernel: float for float, half and bfloat16 inputs, double for double.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls f(std::integral_constant<bool, flag>) so that a run-time flag picks a template instance.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag)
    f(std::true_type{});
  else
    f(std::false_type{});
}

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline void check_zero_pad_shortcut_args(const at::Tensor& x, int64_t out_channels, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "zero_pad_shortcut: expected a 4-D input (N, C, H, W), got ", x.dim(),
              "-D of shape ", x.sizes());
  TORCH_CHECK(stride >= 1, "zero_pad_shortcut: expected stride >= 1, got ", stride);
  TORCH_CHECK(out_channels >= x.size(1), "zero_pad_shortcut: out_channels (", out_channels,
              ") must be at least the input's channels (", x.size(1), ")");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "zero_pad_shortcut: expected a floating-point input, got ",
              x.scalar_type());
}

inline void check_zero_pad_shortcut_backward_args(const at::Tensor& grad_out, at::IntArrayRef input_size,
                                                  int64_t stride) {
  TORCH_CHECK(grad_out.dim() == 4 && input_size.size() == 4,
              "zero_pad_shortcut_backward: expected a 4-D grad_out and a 4-element input_size, got ",
              grad_out.sizes(), " and ", input_size);
  TORCH_CHECK(stride >= 1, "zero_pad_shortcut_backward: expected stride >= 1, got ", stride);
  TORCH_CHECK(grad_out.size(0) == input_size[0] && grad_out.size(1) >= input_size[1] &&
                  grad_out.size(2) == (input_size[2] + stride - 1) / stride &&
                  grad_out.size(3) == (input_size[3] + stride - 1) / stride,
              "zero_pad_shortcut_backward: grad_out of shape ", grad_out.sizes(),
              " does not fit an input of shape ", input_size, " with stride ", stride);
}

// A residual read in place with a stride: the identity, a projection's output, or the option-A
// shortcut (fewer channels, zero beyond them).
inline void check_residual(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                           int64_t residual_stride) {
  if (!residual.has_value()) return;
  const at::Tensor& r = *residual;
  TORCH_CHECK(residual_stride >= 1, op, ": expected residual_stride >= 1, got ", residual_stride);
  TORCH_CHECK(r.dim() == 4 && r.size(0) == x.size(0) && r.size(1) <= x.size(1) &&
                  (r.size(2) + residual_stride - 1) / residual_stride == x.size(2) &&
                  (r.size(3) + residual_stride - 1) / residual_stride == x.size(3),
              op, ": a residual of shape ", r.sizes(), " with stride ", residual_stride,
              " does not fit an output of shape ", x.sizes(),
              " (expected (N, C_r <= C, H_r, W_r) with ceil(H_r / stride) = H and ceil(W_r / stride) = W)");
  TORCH_CHECK(r.scalar_type() == x.scalar_type() && r.device() == x.device(), op,
              ": the residual must have the input's dtype and device, got ", r.scalar_type(), " on ", r.device(),
              " for ", x.scalar_type(), " on ", x.device());
}

inline void check_batch_norm_act_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const std::optional<at::Tensor>& running_mean,
                                      const std::optional<at::Tensor>& running_var,
                                      const std::optional<at::Tensor>& residual, int64_t residual_stride,
                                      bool training) {
  TORCH_CHECK(x.dim() == 4, "batch_norm_act: expected a 4-D input (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "batch_norm_act: expected a floating-point input, got ",
              x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.numel() == C && bias.numel() == C, "batch_norm_act: expected weight and bias of ", C,
              " elements (one per channel), got ", weight.numel(), " and ", bias.numel());
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()),
              "batch_norm_act: eval mode needs running_mean and running_var");
  for (const auto* t : {&running_mean, &running_var}) {
    TORCH_CHECK(!t->has_value() || (*t)->numel() == C, "batch_norm_act: expected running statistics of ", C,
                " elements, got ", (*t)->numel());
  }
  if (training) {
    TORCH_CHECK(x.numel() == 0 || x.size(0) * x.size(2) * x.size(3) > 1,
                "Expected more than 1 value per channel when training, got input size ", x.sizes());
  }
  check_residual("batch_norm_act", x, residual, residual_stride);
}

// The backward of batch_norm_act (and its two CPU halves, which pass their own name and gradient):
// the gradient of x's shape and dtype, per-channel tensors of C elements, and, with relu, the
// forward's output for the ReLU mask or (where the kernel can recompute the mask from x, the CPU
// kernels: `mask_from_input`) the bias.
inline void check_batch_norm_act_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                               const std::optional<at::Tensor>& output, const at::Tensor& weight,
                                               const at::Tensor& mean, const at::Tensor& var, bool relu,
                                               const std::optional<at::Tensor>& bias, bool mask_from_input) {
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D input (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": expected a gradient of shape ", x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": the gradient has dtype ", grad.scalar_type(),
              ", the input ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.numel() == C && mean.numel() == C && var.numel() == C, op,
              ": expected weight, mean and var of ", C, " elements, got ", weight.numel(), ", ", mean.numel(), " and ",
              var.numel());
  const bool has_output = output.has_value() && output->sizes() == x.sizes();
  if (mask_from_input) {
    TORCH_CHECK(!relu || has_output || (bias.has_value() && bias->numel() == C), op,
                ": with relu=True the forward output is needed, of shape ", x.sizes(), " (or the bias, of ", C,
                " elements, to recompute the ReLU mask from x)");
  } else {
    TORCH_CHECK(!relu || has_output, op, ": with relu=True this kernel needs the forward output, of shape ",
                x.sizes());
  }
}

inline void check_bias_act_args(const at::Tensor& x, const at::Tensor& bias,
                                const std::optional<at::Tensor>& residual, int64_t residual_stride) {
  TORCH_CHECK(x.dim() == 4, "bias_act: expected a 4-D input (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bias_act: expected a floating-point input, got ",
              x.scalar_type());
  TORCH_CHECK(bias.numel() == x.size(1), "bias_act: expected a bias of ", x.size(1), " elements, got ", bias.numel());
  check_residual("bias_act", x, residual, residual_stride);
}

}  // namespace resnet_fast
