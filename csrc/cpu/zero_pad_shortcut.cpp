// CPU kernels of the option-A shortcut. Output element order follows the output's memory
// format, so both NCHW and channels_last write memory sequentially.
#include <cstring>

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

// Both kernels walk their output in memory order, one parallel task per range of output rows
// (channels_last: an image row of W pixels x C channels; NCHW: one channel's plane), with the
// source addressed through the input's strides. The zero parts are memset, the copied parts
// are contiguous runs where the source allows (memcpy) and strided loops otherwise.

template <typename T>
void copy_strided(T* __restrict__ d, const T* __restrict__ s, int64_t n, int64_t step) {
  if (step == 1) {
    std::memcpy(d, s, n * sizeof(T));
  } else if (step == 2) {  // the option-A subsampling of an NCHW row: a constant step vectorises
    for (int64_t i = 0; i < n; ++i) d[i] = s[2 * i];
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i * step];
  }
}

template <typename T>
void zero(T* d, int64_t n) {
  std::memset(static_cast<void*>(d), 0, n * sizeof(T));  // +0.0 in every floating type
}

// grad_x's row of W values (stride > 1): src[k * step] at w = k * stride, zeros between.
template <typename T>
void spread_row(T* __restrict__ d, const T* __restrict__ s, int64_t W, int64_t stride, int64_t step) {
  if (stride == 2 && step == 1) {
    int64_t k = 0;
    for (; 2 * k + 1 < W; ++k) {
      d[2 * k] = s[k];
      d[2 * k + 1] = T(0.0f);
    }
    if (2 * k < W) d[2 * k] = s[k];
    return;
  }
  zero(d, W);
  for (int64_t k = 0; k * stride < W; ++k) d[k * stride] = s[k * step];
}

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
    if (dense_channels_last(out)) {
      const int64_t row = Wo * out_channels;  // one output image row
      at::parallel_for(0, N * Ho, std::max<int64_t>(1, kGrainSize / row), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / Ho, h = r % Ho;
          scalar_t* d = dst + r * row;
          for (int64_t w = 0; w < Wo; ++w, d += out_channels) {
            copy_strided(d, src + zero_pad_shortcut_source(xs, Cin, stride, n, 0, h, w), Cin, xs.c);
            zero(d + Cin, out_channels - Cin);
          }
        }
      });
    } else {
      const int64_t plane = Ho * Wo, step = stride * xs.w;
      at::parallel_for(0, N * out_channels, std::max<int64_t>(1, kGrainSize / plane), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = p / out_channels, c = p % out_channels;
          scalar_t* d = dst + p * plane;
          if (c >= Cin) {
            zero(d, plane);
            continue;
          }
          for (int64_t h = 0; h < Ho; ++h, d += Wo)
            copy_strided(d, src + zero_pad_shortcut_source(xs, Cin, stride, n, c, h, 0), Wo, step);
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
    if (dense_channels_last(grad_x)) {
      const int64_t row = W * C;
      at::parallel_for(0, N * H, std::max<int64_t>(1, kGrainSize / row), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / H, h = r % H;
          scalar_t* d = dst + r * row;
          if (h % stride != 0) {
            zero(d, row);
            continue;
          }
          for (int64_t w = 0; w < W; ++w, d += C) {
            if (w % stride != 0) {
              zero(d, C);
            } else {
              copy_strided(d, src + zero_pad_shortcut_grad_source(gs, stride, n, 0, h, w), C, gs.c);
            }
          }
        }
      });
    } else {
      const int64_t plane = H * W;
      at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainSize / plane), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = p / C, c = p % C;
          scalar_t* d = dst + p * plane;
          for (int64_t h = 0; h < H; ++h, d += W) {
            if (h % stride != 0) {
              zero(d, W);
            } else {
              spread_row(d, src + zero_pad_shortcut_grad_source(gs, stride, n, c, h, 0), W, stride, gs.w);
            }
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
