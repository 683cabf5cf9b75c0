// CPU max pooling for inference: the value of each window's maximum, without the argmax indices
// that ATen's CPU max_pool2d always computes (it runs max_pool2d_with_indices). Formula:
// resnet_fast.ops.reference.max_pool2d (= F.max_pool2d with dilation 1, floor mode).
// And for training, max_pool2d_train: the maxima with each one's position in its window in one
// byte (ATen keeps an int64 flat index, and its backward keeps the input too: after ResNet-50's
// stem at batch 16, 25.7 MB of indices and the 51 MB input; ours keeps 3.2 MB), and
// max_pool2d_train_backward, which gathers each input's gradient through them. Formula:
// resnet_fast.ops.reference.max_pool2d_train; autograd: csrc/autograd.cpp.
// channels_last walks each output row's pixels with the channels innermost (contiguous, so the
// compiler vectorises the max over channels); NCHW walks each plane's output rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"

namespace resnet_fast {

struct Window {
  int64_t kh, kw, sh, sw, ph, pw;
};

#define RF_KERNELS "cpu/max_pool2d_kernels.inc"
#include "cpu/isa_kernels.h"

namespace {

int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad) {
  return (size + 2 * pad - kernel) / stride + 1;
}

// The window, checked; `op` names the caller in the messages.
Window checked_window(const char* op, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": expected kernel_size, stride and padding of two values each, got ", kernel_size, ", ", stride, ", ",
              padding);
  const Window k{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(k.kh > 0 && k.kw > 0, op, ": expected a positive kernel_size, got ", kernel_size);
  TORCH_CHECK(k.sh > 0 && k.sw > 0, op, ": expected a positive stride, got ", stride);
  TORCH_CHECK(k.ph >= 0 && k.pw >= 0 && 2 * k.ph <= k.kh && 2 * k.pw <= k.kw, op,
              ": padding should be non-negative and at most half of kernel_size, got padding ", padding,
              " for kernel_size ", kernel_size);
  return k;
}

// The pooled map's (OH, OW), checked.
std::pair<int64_t, int64_t> pooled_map(const char* op, int64_t H, int64_t W, const Window& k, at::IntArrayRef padding) {
  const int64_t OH = pooled_size(H, k.kh, k.sh, k.ph), OW = pooled_size(W, k.kw, k.sw, k.pw);
  TORCH_CHECK(OH >= 1 && OW >= 1, op, ": the input's ", H, "x", W, " map is smaller than the ", k.kh, "x", k.kw,
              " window (padding ", padding, ")");
  return {OH, OW};
}

at::Tensor max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, "max_pool2d: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D");
  const Window k = checked_window("max_pool2d", kernel_size, stride, padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto [OH, OW] = pooled_map("max_pool2d", H, W, k, padding);
  const auto fmt = x.suggest_memory_format();
  const at::Tensor in = x.contiguous(fmt);
  at::Tensor y = at::empty({N, C, OH, OW}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "max_pool2d_cpu", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast)
      RF_ISA(pool_channels_last<scalar_t>)(in.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, C, H, W, OH, OW, k);
    else
      RF_ISA(pool_planes<scalar_t>)(in.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N * C, H, W, OH, OW, k);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_train_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                        at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, "max_pool2d_train: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "max_pool2d_train: expected a float32 or float64 input, got ", x.scalar_type());
  const Window k = checked_window("max_pool2d_train", kernel_size, stride, padding);
  TORCH_CHECK(k.kh * k.kw <= 256, "max_pool2d_train: a window's position is kept in one byte: expected at most 256 "
              "values a window, got kernel_size ", kernel_size);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto [OH, OW] = pooled_map("max_pool2d_train", H, W, k, padding);
  const auto fmt = x.suggest_memory_format();
  const at::Tensor in = x.contiguous(fmt);
  at::Tensor y = at::empty({N, C, OH, OW}, x.options().memory_format(fmt));
  at::Tensor index = at::empty({N, C, OH, OW}, x.options().dtype(at::kByte).memory_format(fmt));
  if (y.numel() == 0) return {y, index};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2d_train_cpu", [&] {
    uint8_t* ip = index.mutable_data_ptr<uint8_t>();
    if (fmt == at::MemoryFormat::ChannelsLast)
      RF_ISA(pool_index_channels_last<scalar_t>)(in.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), ip, N,
                                                 C, H, W, OH, OW, k);
    else
      RF_ISA(pool_index_planes<scalar_t>)(in.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), ip, N * C, H,
                                          W, OH, OW, k);
  });
  return {y, index};
}

at::Tensor max_pool2d_train_backward_cpu(const at::Tensor& grad_y, const at::Tensor& window_index,
                                         at::IntArrayRef input_size, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding) {
  TORCH_CHECK(grad_y.dim() == 4 && input_size.size() == 2,
              "max_pool2d_train_backward: expected a 4-D grad_y and the input's (H, W), got ", grad_y.dim(),
              "-D and ", input_size);
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat || grad_y.scalar_type() == at::kDouble,
              "max_pool2d_train_backward: expected a float32 or float64 grad_y, got ", grad_y.scalar_type());
  const Window k = checked_window("max_pool2d_train_backward", kernel_size, stride, padding);
  const int64_t N = grad_y.size(0), C = grad_y.size(1), H = input_size[0], W = input_size[1];
  const auto [OH, OW] = pooled_map("max_pool2d_train_backward", H, W, k, padding);
  TORCH_CHECK(grad_y.size(2) == OH && grad_y.size(3) == OW && window_index.sizes() == grad_y.sizes() &&
                  window_index.scalar_type() == at::kByte,
              "max_pool2d_train_backward: expected grad_y and a uint8 window_index of shape (", N, ", ", C, ", ", OH,
              ", ", OW, "), got ", grad_y.sizes(), " and ", window_index.scalar_type(), " ", window_index.sizes());
  // The layout of the forward's input, which the index shares.
  const auto fmt = window_index.suggest_memory_format();
  const at::Tensor g = grad_y.contiguous(fmt), ix = window_index.contiguous(fmt);
  at::Tensor grad_x = at::empty({N, C, H, W}, grad_y.options().memory_format(fmt));
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "max_pool2d_train_backward_cpu", [&] {
    const uint8_t* ip = ix.const_data_ptr<uint8_t>();
    if (fmt == at::MemoryFormat::ChannelsLast)
      RF_ISA(unpool_channels_last<scalar_t>)(g.const_data_ptr<scalar_t>(), ip, grad_x.mutable_data_ptr<scalar_t>(), N,
                                             C, H, W, OH, OW, k);
    else
      RF_ISA(unpool_planes<scalar_t>)(g.const_data_ptr<scalar_t>(), ip, grad_x.mutable_data_ptr<scalar_t>(), N * C, H,
                                      W, OH, OW, k);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("max_pool2d_train", &max_pool2d_train_cpu);
  m.impl("max_pool2d_train_backward", &max_pool2d_train_backward_cpu);
}

}  // namespace resnet_fast
