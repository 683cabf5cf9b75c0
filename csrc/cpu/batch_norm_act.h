#pragma once
// What the batch_norm_act CPU kernels share with other ops (bias_act.cpp).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace resnet_fast {

// batch_norm_act's CPU kernel (the op's arguments and results), for the CPU ops built on it
// (conv_bn_act_train.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, int64_t residual_stride, bool training, double eps, bool relu);

// A residual read in place: r(n, c, h, w) = c < C ? data[n*sN + c*sC + h*s*sH + w*s*sW] : 0,
// which covers the identity, a projection's output and the option-A zero-padding shortcut.
template <typename scalar_t>
struct ResidualView {
  const scalar_t* data = nullptr;
  int64_t C = 0, sN = 0, sC = 0, sH = 0, sW = 0, stride = 1;
};

// y = act(x * scale[c] + shift[c] + r) over x (dense in its suggested memory format) into y of the
// same layout: the forward's second pass of batch_norm_act, and bias_act with a scale of 1.
// scale, shift: contiguous, C elements, in the accumulation dtype (float; double for double x).
void channel_affine_act(const at::Tensor& x, at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& residual, int64_t residual_stride, bool relu);

// The forward's affine of batch_norm_act for a float32 input, as its kernels compute it from the
// parameters and the statistics it normalised with: scale = weight / sqrt(var + eps), shift = bias -
// mean * scale (C float32 values each, contiguous).
std::pair<at::Tensor, at::Tensor> bn_forward_affine(const at::Tensor& weight, const at::Tensor& bias,
                                                    const at::Tensor& mean, const at::Tensor& var, double eps);

// relu(x * scale[c] + shift[c]) over consecutive rows of C float32 channels (a channels_last span):
// the apply pass of batch_norm_act's forward without a residual, bit for bit, for a kernel that
// recomputes that output from the BatchNorm's input rather than keeping it (conv3x3_train).
class ReluAffineRows {
 public:
  ReluAffineRows(const float* scale, const float* shift, int64_t channels);
  void operator()(const float* x, float* y, int64_t rows) const;

 private:
  int64_t C_, R_;                     // channels; rows of a period (the apply pass's span)
  std::vector<float> scale_, shift_;  // replicated over R_ rows
};

}  // namespace resnet_fast
