// CPU max pooling for inference: the value of each window's maximum, without the argmax indices
// that ATen's CPU max_pool2d always computes (it runs max_pool2d_with_indices). Formula:
// resnet_fast.ops.reference.max_pool2d (= F.max_pool2d with dilation 1, floor mode).
// channels_last walks each output row's pixels with the channels innermost (contiguous, so the
// compiler vectorises the max over channels); NCHW walks each plane's output rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
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

at::Tensor max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, "max_pool2d: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "max_pool2d: expected kernel_size, stride and padding of two values each, got ", kernel_size, ", ",
              stride, ", ", padding);
  const Window k{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(k.kh > 0 && k.kw > 0, "max_pool2d: expected a positive kernel_size, got ", kernel_size);
  TORCH_CHECK(k.sh > 0 && k.sw > 0, "max_pool2d: expected a positive stride, got ", stride);
  TORCH_CHECK(k.ph >= 0 && k.pw >= 0 && 2 * k.ph <= k.kh && 2 * k.pw <= k.kw,
              "max_pool2d: padding should be non-negative and at most half of kernel_size, got padding ", padding,
              " for kernel_size ", kernel_size);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = pooled_size(H, k.kh, k.sh, k.ph), OW = pooled_size(W, k.kw, k.sw, k.pw);
  TORCH_CHECK(OH >= 1 && OW >= 1, "max_pool2d: the input's ", H, "x", W, " map is smaller than the ", k.kh, "x",
              k.kw, " window (padding ", padding, ")");
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

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_cpu);
}

}  // namespace resnet_fast
