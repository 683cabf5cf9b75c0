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

bool dense_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// Output rows: a channels_last output is written pixel by pixel (C contiguous values), an NCHW
// one row by row (W contiguous values). The shared helpers give each row's source; the inner
// loops copy with a fixed step.

at::Tensor zero_pad_shortcut_cpu(const at::Tensor& x, int64_t out_channels, int64_t stride) {
  check_zero_pad_shortcut_args(x, out_channels, stride);
  const int64_t N = x.size(0), Cin = x.size(1);
  const int64_t Ho = zero_pad_shortcut_out_size(x.size(2), stride), Wo = zero_pad_shortcut_out_size(x.size(3), stride);
  at::Tensor out = at::empty({N, out_channels, Ho, Wo}, x.options().memory_format(x.suggest_memory_format()));
  if (out.numel() == 0) return out;
  const Strides4 xs = strides_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "zero_pad_shortcut_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t zero = static_cast<scalar_t>(0.0f);
    if (dense_channels_last(out)) {
      at::parallel_for(0, N * Ho * Wo, std::max<int64_t>(1, kGrainSize / out_channels), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t w = p % Wo, h = (p / Wo) % Ho, n = p / (Wo * Ho);
          const scalar_t* s = src + zero_pad_shortcut_source(xs, Cin, stride, n, 0, h, w);
          scalar_t* d = dst + p * out_channels;
          for (int64_t c = 0; c < Cin; ++c) d[c] = s[c * xs.c];
          std::fill(d + Cin, d + out_channels, zero);
        }
      });
    } else {
      const int64_t step = stride * xs.w;
      at::parallel_for(0, N * out_channels * Ho, std::max<int64_t>(1, kGrainSize / Wo), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t h = r % Ho, c = (r / Ho) % out_channels, n = r / (Ho * out_channels);
          const int64_t off = zero_pad_shortcut_source(xs, Cin, stride, n, c, h, 0);
          scalar_t* d = dst + r * Wo;
          if (off < 0) {
            std::fill(d, d + Wo, zero);
          } else {
            const scalar_t* s = src + off;
            for (int64_t w = 0; w < Wo; ++w) d[w] = s[w * step];
          }
        }
      });
    }
  });
  return out;
}

at::Tensor zero_pad_shortcut_backward_cpu(const at::Tensor& grad_out, at::IntArrayRef input_size, int64_t stride) {
  check_zero_pad_shortcut_backward_args(grad_out, input_size, stride);
  at::Tensor grad_x = at::empty(input_size, grad_out.options().memory_format(grad_out.suggest_memory_format()));
  if (grad_x.numel() == 0) return grad_x;
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3];
  const Strides4 gs = strides_of(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "zero_pad_shortcut_backward_cpu", [&] {
    const scalar_t* src = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_x.mutable_data_ptr<scalar_t>();
    const scalar_t zero = static_cast<scalar_t>(0.0f);
    if (dense_channels_last(grad_x)) {
      at::parallel_for(0, N * H * W, std::max<int64_t>(1, kGrainSize / C), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t w = p % W, h = (p / W) % H, n = p / (W * H);
          const int64_t off = zero_pad_shortcut_grad_source(gs, stride, n, 0, h, w);
          scalar_t* d = dst + p * C;
          if (off < 0) {
            std::fill(d, d + C, zero);
          } else {
            for (int64_t c = 0; c < C; ++c) d[c] = src[off + c * gs.c];
          }
        }
      });
    } else {
      at::parallel_for(0, N * C * H, std::max<int64_t>(1, kGrainSize / W), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t h = r % H, c = (r / H) % C, n = r / (H * C);
          const int64_t off = zero_pad_shortcut_grad_source(gs, stride, n, c, h, 0);
          scalar_t* d = dst + r * W;
          std::fill(d, d + W, zero);
          if (off >= 0) {
            for (int64_t k = 0; k * stride < W; ++k) d[k * stride] = src[off + k * gs.w];
          }
        }
      });
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("zero_pad_shortcut", &zero_pad_shortcut_cpu);
  m.impl("zero_pad_shortcut_backward", &zero_pad_shortcut_backward_cpu);
}

}  // namespace resnet_fast
