#pragma once
// Host-side helpers and argument checks shared by the CPU and CUDA implementations of each op, so both reject
// bad input with the same message.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/macros.h"

namespace resnet_fast {

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

}  // namespace resnet_fast
