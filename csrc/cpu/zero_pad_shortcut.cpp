// CPU kernels of the option-A shortcut. Output element order follows the output's memory
// format, so both NCHW and channels_last write memory sequentially.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/zero_pad_shortcut.h"

namespace resnet_fast {
namespace {

// Elements per parallel task: large enough that a task outweighs its scheduling.
constexpr int64_t kGrainSize = 32768;

// Calls f(n, c, h, w, offset) for every element of `out` (freshly allocated, dense in its
// memory format), in parallel over rows of the innermost dimension.
template <typename F>
void for_each_element(const at::Tensor& out, F f) {
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  if (out.numel() == 0) return;
  if (out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous()) {
    at::parallel_for(0, N * H * W, std::max<int64_t>(1, kGrainSize / C), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t w = p % W, h = (p / W) % H, n = p / (W * H);
        for (int64_t c = 0; c < C; ++c) f(n, c, h, w, p * C + c);
      }
    });
  } else {
    TORCH_INTERNAL_ASSERT(out.is_contiguous());
    at::parallel_for(0, N * C * H, std::max<int64_t>(1, kGrainSize / W), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t h = r % H, c = (r / H) % C, n = r / (H * C);
        for (int64_t w = 0; w < W; ++w) f(n, c, h, w, r * W + w);
      }
    });
  }
}

at::Tensor zero_pad_shortcut_cpu(const at::Tensor& x, int64_t out_channels, int64_t stride) {
  check_zero_pad_shortcut_args(x, out_channels, stride);
  const int64_t in_channels = x.size(1);
  at::Tensor out = at::empty({x.size(0), out_channels, zero_pad_shortcut_out_size(x.size(2), stride),
                              zero_pad_shortcut_out_size(x.size(3), stride)},
                             x.options().memory_format(x.suggest_memory_format()));
  const Strides4 xs = strides_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "zero_pad_shortcut_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_element(out, [&](int64_t n, int64_t c, int64_t h, int64_t w, int64_t i) {
      dst[i] = zero_pad_shortcut_at(src, xs, in_channels, stride, n, c, h, w);
    });
  });
  return out;
}

at::Tensor zero_pad_shortcut_backward_cpu(const at::Tensor& grad_out, at::IntArrayRef input_size, int64_t stride) {
  check_zero_pad_shortcut_backward_args(grad_out, input_size, stride);
  at::Tensor grad_x = at::empty(input_size, grad_out.options().memory_format(grad_out.suggest_memory_format()));
  const Strides4 gs = strides_of(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "zero_pad_shortcut_backward_cpu", [&] {
    const scalar_t* src = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_x.mutable_data_ptr<scalar_t>();
    for_each_element(grad_x, [&](int64_t n, int64_t c, int64_t h, int64_t w, int64_t i) {
      dst[i] = zero_pad_shortcut_grad_at(src, gs, stride, n, c, h, w);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("zero_pad_shortcut", &zero_pad_shortcut_cpu);
  m.impl("zero_pad_shortcut_backward", &zero_pad_shortcut_backward_cpu);
}

}  // namespace resnet_fast
