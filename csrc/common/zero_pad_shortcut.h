#pragma once
// The paper's option-A shortcut (He et al. 2015, section 3.3): an identity that subsamples by
// `stride` and pads the extra output channels with zeros.
//
//   out[n, c, h, w] = x[n, c, h * stride, w * stride]   if c < C_in
//                   = 0                                 otherwise
//   out: (N, C_out, ceil(H / stride), ceil(W / stride)), C_out >= C_in
//
// Its gradient gathers instead of scattering, so every element of grad_x is written once:
//   grad_x[n, c, h, w] = grad_out[n, c, h / stride, w / stride]  if h % stride == 0 and w % stride == 0
//                      = 0                                       otherwise
#include "common/macros.h"

namespace resnet_fast {

RF_HOST_DEVICE int64_t zero_pad_shortcut_out_size(int64_t in_size, int64_t stride) {
  return (in_size + stride - 1) / stride;
}

// Offset in x of the source of out[n, c, h, w], or -1 where out holds a padded zero.
RF_HOST_DEVICE int64_t zero_pad_shortcut_source(Strides4 xs, int64_t in_channels, int64_t stride, int64_t n,
                                                int64_t c, int64_t h, int64_t w) {
  return c < in_channels ? n * xs.n + c * xs.c + h * stride * xs.h + w * stride * xs.w : -1;
}

// Offset in grad_out of the source of grad_x[n, c, h, w], or -1 where grad_x is zero.
RF_HOST_DEVICE int64_t zero_pad_shortcut_grad_source(Strides4 gs, int64_t stride, int64_t n, int64_t c, int64_t h,
                                                     int64_t w) {
  return (h % stride == 0 && w % stride == 0) ? n * gs.n + c * gs.c + (h / stride) * gs.h + (w / stride) * gs.w : -1;
}

template <typename T>
RF_HOST_DEVICE T zero_pad_shortcut_at(const T* x, Strides4 xs, int64_t in_channels, int64_t stride,
                                      int64_t n, int64_t c, int64_t h, int64_t w) {
  const int64_t off = zero_pad_shortcut_source(xs, in_channels, stride, n, c, h, w);
  return off >= 0 ? x[off] : static_cast<T>(0.0f);
}

template <typename T>
RF_HOST_DEVICE T zero_pad_shortcut_grad_at(const T* grad_out, Strides4 gs, int64_t stride,
                                           int64_t n, int64_t c, int64_t h, int64_t w) {
  const int64_t off = zero_pad_shortcut_grad_source(gs, stride, n, c, h, w);
  return off >= 0 ? grad_out[off] : static_cast<T>(0.0f);
}

}  // namespace resnet_fast
