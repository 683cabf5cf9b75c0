#pragma once
// What the batch_norm_act CPU kernels share with other ops (bias_act.cpp).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace resnet_fast {

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

}  // namespace resnet_fast
