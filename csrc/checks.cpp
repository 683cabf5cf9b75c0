// The check_<op> ops (schemas in ops.cpp): the argument checks of csrc/common/checks.h on their own,
// for any device, so that the Triton launchers refuse bad input with the C++ kernels' words.
#include <torch/library.h>

#include <array>
#include <vector>

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

void check_norm_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, bool /*relu*/) {
  TORCH_CHECK(x.dim() == 4, "norm_conv: expected a 4-D input (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "norm_conv: expected a float32 or float64 input, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "norm_conv: expected a ", x.scalar_type(),
              " weight like the input, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == weight.size(3),
              "norm_conv: expected a square (K, ", x.size(1), ", R, R) weight for ", x.size(1),
              " input channels, got shape ", weight.sizes());
  const int64_t r = weight.size(2);
  TORCH_CHECK(r >= 1 && stride >= 1 && padding >= 0 && padding < r,
              "norm_conv: expected a stride of 1 or more and a padding in [0, kernel), got stride ", stride,
              ", padding ", padding, " for a ", r, "x", r, " kernel");
  TORCH_CHECK(x.size(2) + 2 * padding >= r && x.size(3) + 2 * padding >= r, "norm_conv: the ", x.size(2), "x",
              x.size(3), " input with padding ", padding, " is smaller than the ", r, "x", r, " kernel");
  TORCH_CHECK(scale.has_value() == shift.has_value(),
              "norm_conv: expected both scale and shift or neither, got ", scale.has_value() ? "scale" : "shift",
              " alone");
  for (const auto* t : {&scale, &shift}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->numel() == x.size(1),
                "norm_conv: expected a scale and a shift of shape (", x.size(1), "), got ", (*t)->sizes());
    TORCH_CHECK((*t)->scalar_type() == x.scalar_type() || (*t)->scalar_type() == at::kFloat,
                "norm_conv: expected a float32 (or the input's dtype) scale and shift, got ", (*t)->scalar_type());
    TORCH_CHECK((*t)->device() == x.device(), "norm_conv: expected the scale and shift on ", x.device(), ", got ",
                (*t)->device());
  }
  TORCH_CHECK(weight.device() == x.device(), "norm_conv: expected the weight on ", x.device(), ", got ",
              weight.device());
}

void check_norm_conv_backward(const std::optional<at::Tensor>& grad_y, const at::Tensor& x, const at::Tensor& weight,
                              int64_t stride, int64_t padding, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift, bool relu, const at::Tensor& y,
                              const at::Tensor& mean, const std::optional<at::Tensor>& grad_mean,
                              const std::optional<at::Tensor>& grad_var, std::array<bool, 3> /*output_mask*/) {
  check_norm_conv(x, weight, stride, padding, scale, shift, relu);
  const int64_t r = weight.size(2);
  const std::vector<int64_t> out{x.size(0), weight.size(0), (x.size(2) + 2 * padding - r) / stride + 1,
                                 (x.size(3) + 2 * padding - r) / stride + 1};
  TORCH_CHECK(y.sizes() == at::IntArrayRef(out) && y.scalar_type() == x.scalar_type() && y.device() == x.device(),
              "norm_conv_backward: expected the forward's output y of shape ", at::IntArrayRef(out), " (",
              x.scalar_type(), ", on ", x.device(), "), got ", y.sizes(), " (", y.scalar_type(), ", on ", y.device(),
              ")");
  if (grad_y.has_value()) {
    TORCH_CHECK(grad_y->sizes() == y.sizes() && grad_y->scalar_type() == x.scalar_type() &&
                    grad_y->device() == x.device(),
                "norm_conv_backward: expected grad_y like y, ", y.sizes(), " (", x.scalar_type(), "), got ",
                grad_y->sizes(), " (", grad_y->scalar_type(), ", on ", grad_y->device(), ")");
  }
  for (const auto* t : {&grad_mean, &grad_var}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->numel() == weight.size(0) && (*t)->device() == x.device(),
                "norm_conv_backward: expected grad_mean and grad_var of shape (", weight.size(0), ") on ",
                x.device(), ", got ", (*t)->sizes(), " on ", (*t)->device());
  }
  TORCH_CHECK(mean.dim() == 1 && mean.numel() == weight.size(0) && mean.device() == x.device(),
              "norm_conv_backward: expected the forward's mean of shape (", weight.size(0), "), got ", mean.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CompositeExplicitAutograd, m) {
  m.impl("check_zero_pad_shortcut", &check_zero_pad_shortcut);
  m.impl("check_zero_pad_shortcut_backward", &check_zero_pad_shortcut_backward);
  m.impl("check_batch_norm_act", &check_batch_norm_act);
  m.impl("check_batch_norm_act_backward", &check_batch_norm_act_backward);
  m.impl("check_bias_act", &check_bias_act);
  m.impl("check_norm_conv", &check_norm_conv);
  m.impl("check_norm_conv_backward", &check_norm_conv_backward);
}

}  // namespace resnet_fast
