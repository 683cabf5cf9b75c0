// conv3x3_train, the 3x3 convolution of the residual nets (padding 1, no bias, stride 1 or 2) in
// training, as the caller's plan says (resnet_fast._routing.conv3x3_train_plan): the forward and
// the input gradient ATen's (oneDNN runs them at 170-200 GFLOP/s here) or, on wide stride-1 maps,
// Winograd F(2x2, 3x3)'s (winograd.cpp, its 16 products by our register tiles or at::bmm as the plan
// says; the input gradient is the convolution with the flipped, transposed weight,
// csrc/autograd.cpp); the weight gradient our AVX2 kernel below (oneDNN ran
// ResNet-20's at 125-140 GFLOP/s, about two thirds of this CPU's peak), Winograd F(2x2, 3x3)'s
// at stride 1 on AVX-512 CPUs (winograd_weight_grad in winograd.cpp), or ATen's.
// Formula: resnet_fast.ops.reference.conv3x3_weight_grad.
//
//   dW[k, c, r, s] = sum over n, h, w of dy[n, k, h, w] * x[n, c, h*stride + r - 1, w*stride + s - 1]
//
// (terms outside the input are zero padding). In channels_last, dW's memory order is k, r, s, c,
// and for a tap row r the 3*C values dW[k, :, r, :] (s, then c) are multiplied by 3*C consecutive
// floats of x: the pixels w*stride - 1, w*stride, w*stride + 1 of input row h*stride + r - 1. So one
// register tile of 4 output channels k by 24 columns of (s, c) sweeps the output pixels of a few
// rows, accumulating 12 AVX2 vectors with one broadcast of dy and three loads of x per pixel: a
// rank-1 update, FMA-bound. Only a row's first and last pixels can reach outside the input
// (columns -1 and W); their out-of-map vectors are zeros, not loads, so nothing outside the
// tensors is read and nothing is corrected afterwards.
//
// Work is split over images (each thread accumulates its images into its own copy of dW, summed
// at the end; a batch smaller than the thread count splits the output channels instead), and each
// image into chunks of rows whose dy (16 KB) and x stay in L1/L2 while all the tiles sweep them.
//
// With a BatchNorm prologue, x is the input of the BatchNorm whose output relu(x * scale + shift)
// the convolution read (the caller's backward keeps that input, not the output): each chunk's
// input rows go through the BatchNorm's own apply loop (ReluAffineRows, bit for bit the forward's)
// into a per-thread buffer, which the tiles then sweep; the recomputation costs one pass over x in
// cache, against a whole activation not kept from the forward to the backward.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/batch_norm_act.h"
#include "cpu/conv3x3_direct.h"
#include "cpu/isa.h"
#include "cpu/winograd.h"

#ifdef RESNET_FAST_AVX2
#include <immintrin.h>
#endif

namespace resnet_fast {
namespace {

struct Geometry {
  int64_t N, C, H, W;  // input
  int64_t K, OH, OW;   // output (the gradient's)
  int64_t stride;
};

#ifdef RESNET_FAST_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// acc[i][v] += dy[i] * x[v] for the tile's 4 output channels i and 3 vectors v of 8 columns.
#define RF_TILE_FMA(d, x0, x1, x2)                                                                     \
  do {                                                                                                \
    __m256 b_ = _mm256_broadcast_ss((d));                                                             \
    a00 = _mm256_fmadd_ps(b_, x0, a00), a01 = _mm256_fmadd_ps(b_, x1, a01), a02 = _mm256_fmadd_ps(b_, x2, a02); \
    b_ = _mm256_broadcast_ss((d) + 1);                                                                \
    a10 = _mm256_fmadd_ps(b_, x0, a10), a11 = _mm256_fmadd_ps(b_, x1, a11), a12 = _mm256_fmadd_ps(b_, x2, a12); \
    b_ = _mm256_broadcast_ss((d) + 2);                                                                \
    a20 = _mm256_fmadd_ps(b_, x0, a20), a21 = _mm256_fmadd_ps(b_, x1, a21), a22 = _mm256_fmadd_ps(b_, x2, a22); \
    b_ = _mm256_broadcast_ss((d) + 3);                                                                \
    a30 = _mm256_fmadd_ps(b_, x0, a30), a31 = _mm256_fmadd_ps(b_, x1, a31), a32 = _mm256_fmadd_ps(b_, x2, a32); \
  } while (0)

inline __m256 load_or_zero(const float* p, bool in_map) { return in_map ? _mm256_loadu_ps(p) : _mm256_setzero_ps(); }

// One tile (output channels k..k+3, columns j..j+23 of tap row r) over output rows [h0, h1) of one
// image; every row's input row h*ST + r - 1 is inside the map. `first`/`last`: which of the three
// vectors are inside the map at a row's first and last pixel (bit v for vector v). The 12
// accumulators are plain locals so that they stay in registers across the whole sweep.
// x holds the image's input rows from row0 on.
template <int ST>
void sweep_tile(const float* dy, const float* x, int64_t row0, const Geometry& g, int64_t h0, int64_t h1, int r,
                int64_t k, int64_t j, int first, int last, float* out, int64_t ld) {
  const int64_t C = g.C, K = g.K, OW = g.OW;
  __m256 a00 = _mm256_loadu_ps(out), a01 = _mm256_loadu_ps(out + 8), a02 = _mm256_loadu_ps(out + 16);
  __m256 a10 = _mm256_loadu_ps(out + ld), a11 = _mm256_loadu_ps(out + ld + 8), a12 = _mm256_loadu_ps(out + ld + 16);
  __m256 a20 = _mm256_loadu_ps(out + 2 * ld), a21 = _mm256_loadu_ps(out + 2 * ld + 8),
         a22 = _mm256_loadu_ps(out + 2 * ld + 16);
  __m256 a30 = _mm256_loadu_ps(out + 3 * ld), a31 = _mm256_loadu_ps(out + 3 * ld + 8),
         a32 = _mm256_loadu_ps(out + 3 * ld + 16);
  for (int64_t h = h0; h < h1; ++h) {
    // x of output pixel w, column j: input pixel w*ST - 1 of input row h*ST + r - 1, plus j floats.
    const float* xrow = x + ((h * ST + r - 1 - row0) * g.W - 1) * C + j;
    const float* drow = dy + h * OW * K + k;
    {
      __m256 x0 = load_or_zero(xrow, first & 1), x1 = load_or_zero(xrow + 8, first & 2),
             x2 = load_or_zero(xrow + 16, first & 4);
      RF_TILE_FMA(drow, x0, x1, x2);
    }
    int64_t w = 1;
    for (; w < OW - 1; ++w) {
      const float* xp = xrow + w * ST * C;
      __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8), x2 = _mm256_loadu_ps(xp + 16);
      RF_TILE_FMA(drow + w * K, x0, x1, x2);
    }
    if (OW > 1) {
      const float* xp = xrow + w * ST * C;
      __m256 x0 = load_or_zero(xp, last & 1), x1 = load_or_zero(xp + 8, last & 2), x2 = load_or_zero(xp + 16, last & 4);
      RF_TILE_FMA(drow + w * K, x0, x1, x2);
    }
  }
  _mm256_storeu_ps(out, a00), _mm256_storeu_ps(out + 8, a01), _mm256_storeu_ps(out + 16, a02);
  _mm256_storeu_ps(out + ld, a10), _mm256_storeu_ps(out + ld + 8, a11), _mm256_storeu_ps(out + ld + 16, a12);
  _mm256_storeu_ps(out + 2 * ld, a20), _mm256_storeu_ps(out + 2 * ld + 8, a21), _mm256_storeu_ps(out + 2 * ld + 16, a22);
  _mm256_storeu_ps(out + 3 * ld, a30), _mm256_storeu_ps(out + 3 * ld + 8, a31), _mm256_storeu_ps(out + 3 * ld + 16, a32);
}
#undef RF_TILE_FMA

// Output rows a chunk: their dy is about 16 KB.
int64_t chunk_rows(const Geometry& g) { return std::max<int64_t>(1, 16384 / (g.OW * g.K * int64_t(sizeof(float)))); }

// Adds image n's contribution for output channel blocks [kb0, kb1) (of 4) to acc (K x 9C, dW's
// channels_last order). With a prologue, each chunk's input rows are first recomputed into buf.
void accumulate_image(const float* dy, const float* x, const Geometry& g, int64_t n, int64_t kb0, int64_t kb1,
                      float* acc, const ReluAffineRows* prologue, float* buf) {
  const int64_t C = g.C, K = g.K, ld = 9 * C;
  const float* xi = x + n * g.H * g.W * C;
  const float* di = dy + n * g.OH * g.OW * K;
  const int64_t rows = chunk_rows(g);
  for (int64_t c0 = 0; c0 < g.OH; c0 += rows) {
    const int64_t c1 = std::min(g.OH, c0 + rows);
    const float* xs = xi;  // the input rows the tiles read, from row0 on
    int64_t row0 = 0;
    if (prologue != nullptr) {
      row0 = std::max<int64_t>(0, c0 * g.stride - 1);
      const int64_t row1 = std::min<int64_t>(g.H, (c1 - 1) * g.stride + 2);
      (*prologue)(xi + row0 * g.W * C, buf, (row1 - row0) * g.W);
      xs = buf;
    }
    for (int r = 0; r < 3; ++r) {
      int64_t h0 = c0, h1 = c1;  // the rows whose input row h*stride + r - 1 is inside the map
      while (h0 < h1 && h0 * g.stride + r - 1 < 0) ++h0;
      while (h1 > h0 && (h1 - 1) * g.stride + r - 1 >= g.H) --h1;
      if (h0 >= h1) continue;
      for (int64_t j = 0; j < 3 * C; j += 24) {
        int first = 0, last = 0;
        for (int v = 0; v < 3; ++v) {
          const int64_t s = (j + 8 * v) / C;  // C % 8 == 0: a vector lies within one tap s
          if (s >= 1) first |= 1 << v;        // input column s - 1 of output pixel 0
          if ((g.OW - 1) * g.stride + s - 1 < g.W) last |= 1 << v;
        }
        if (g.OW == 1) first &= last;
        for (int64_t kb = kb0; kb < kb1; ++kb) {
          float* out = acc + kb * 4 * ld + r * 3 * C + j;
          if (g.stride == 1)
            sweep_tile<1>(di, xs, row0, g, h0, h1, r, kb * 4, j, first, last, out, ld);
          else
            sweep_tile<2>(di, xs, row0, g, h0, h1, r, kb * 4, j, first, last, out, ld);
        }
      }
    }
  }
}

void weight_grad_avx2(const float* dy, const float* x, const Geometry& g, float* out, const ReluAffineRows* prologue) {
  const int64_t KB = g.K / 4, size = g.K * 9 * g.C;
  const int threads = at::get_num_threads();
  std::vector<float> partial(size_t(threads) * size, 0.f);
  // A chunk's input rows, halo included, per thread (the prologue's output).
  const int64_t buf_size = prologue == nullptr ? 0 : (chunk_rows(g) * g.stride + 2) * g.W * g.C;
  std::vector<float> bufs(size_t(threads) * buf_size);
  // Work items are (image, block of 4 output channels), image-major: a thread's contiguous range
  // is whole images unless the batch is smaller than the thread count.
  at::parallel_for(0, g.N * KB, 1, [&](int64_t i0, int64_t i1) {
    float* acc = partial.data() + size_t(at::get_thread_num()) * size;
    float* buf = bufs.data() + size_t(at::get_thread_num()) * buf_size;
    for (int64_t i = i0; i < i1;) {
      const int64_t n = i / KB, kb0 = i % KB, kb1 = std::min(KB, kb0 + (i1 - i));
      accumulate_image(dy, x, g, n, kb0, kb1, acc, prologue, buf);
      i += kb1 - kb0;
    }
  });
  at::parallel_for(0, size, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      float s = 0.f;
      for (int t = 0; t < threads; ++t) s += partial[size_t(t) * size + e];
      out[e] = s;
    }
  });
}

#pragma GCC pop_options
#endif  // RESNET_FAST_AVX2

int64_t conv_out_size(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }  // 3x3, padding 1

// What our kernel can do: float32 with C % 8 == 0 (a vector of 8 lies within one tap) and K % 4 ==
// 0 (the tile's 4 output channels), on a CPU with AVX2 and FMA. Where it runs is the caller's
// choice (resnet_fast._routing.weight_grad_kernel_applies, which also stops at 128 input channels,
// beyond which oneDNN's is faster); a CPU without AVX2 hands the request to ATen's.
bool kernel_can_run(const at::Tensor& grad_out, const at::Tensor& x) {
  return use_avx2() && x.scalar_type() == at::kFloat && grad_out.scalar_type() == at::kFloat && x.size(1) % 8 == 0 &&
         grad_out.size(1) % 4 == 0;
}

at::Tensor conv3x3_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input, int64_t stride, bool kernel,
                                   const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                                   const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
                                   double bn_eps, bool winograd) {
  TORCH_CHECK(input.dim() == 4 && grad_out.dim() == 4,
              "conv3x3_weight_grad: expected 4-D (N, C, H, W) tensors, got x of ", input.dim(), "-D and grad_out of ",
              grad_out.dim(), "-D");
  const bool prologue = bn_weight.has_value() || bn_bias.has_value() || bn_mean.has_value() || bn_var.has_value();
  at::Tensor scale, shift;
  if (prologue) {
    const int64_t C = input.size(1);
    for (const auto* t : {&bn_weight, &bn_bias, &bn_mean, &bn_var})
      TORCH_CHECK(t->has_value() && (*t)->dim() == 1 && (*t)->size(0) == C && (*t)->scalar_type() == at::kFloat &&
                      input.scalar_type() == at::kFloat,
                  "conv3x3_weight_grad: a BatchNorm prologue takes a float32 x and bn_weight, bn_bias, bn_mean and "
                  "bn_var, float32 vectors of its ", C, " channels");
    std::tie(scale, shift) = bn_forward_affine(*bn_weight, *bn_bias, *bn_mean, *bn_var, bn_eps);
  }
  TORCH_CHECK(stride == 1 || stride == 2, "conv3x3_weight_grad: expected stride 1 or 2, got ", stride);
  TORCH_CHECK(input.scalar_type() == grad_out.scalar_type(), "conv3x3_weight_grad: x is ", input.scalar_type(),
              " but grad_out is ", grad_out.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == N && grad_out.size(2) == conv_out_size(H, stride) &&
                  grad_out.size(3) == conv_out_size(W, stride),
              "conv3x3_weight_grad: grad_out of shape ", grad_out.sizes(), " does not fit an input of shape ", input.sizes(),
              " (3x3, padding 1, stride ", stride, ": expected (", N, ", K, ", conv_out_size(H, stride), ", ",
              conv_out_size(W, stride), "))");
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (winograd) {
    TORCH_CHECK(stride == 1, "conv3x3_weight_grad: the Winograd weight gradient runs stride 1 only, got stride ",
                stride, " (pass winograd=False)");
    // Without AVX-512 the request goes to ATen's, as our direct kernel's does without AVX2.
    if (use_avx512()) {
      std::optional<ReluAffineRows> rows;
      if (prologue) rows.emplace(scale.const_data_ptr<float>(), shift.const_data_ptr<float>(), C);
      return winograd_weight_grad(grad_out, input, rows.has_value() ? &*rows : nullptr);
    }
    kernel = false;
  }
  // The prologue runs inside our kernel on a channels_last x; anywhere else x is recomputed whole,
  // by the same apply pass in x's layout (the forward's, bit for bit).
  const bool in_kernel =
      prologue && kernel && kernel_can_run(grad_out, input) && input.is_contiguous(cl) && input.numel() > 0;
  at::Tensor x = input;
  if (prologue && !in_kernel) {
    const at::Tensor src = input.contiguous(input.suggest_memory_format());
    x = at::empty_like(src);
    channel_affine_act(src, x, scale, shift, std::nullopt, 1, true);
  }
#ifdef RESNET_FAST_AVX2
  TORCH_CHECK(!kernel || !use_avx2() || kernel_can_run(grad_out, x),
              "conv3x3_weight_grad: our kernel takes float32 with input channels a multiple of 8 and output channels a "
              "multiple of 4, got ", x.scalar_type(), " with ", C, " and ", K, " (pass kernel=False for ATen's)");
  if (kernel && kernel_can_run(grad_out, x) && N > 0 && H > 0 && W > 0) {
    const at::Tensor xc = x.contiguous(cl), gc = grad_out.contiguous(cl);
    at::Tensor out = at::empty({K, C, 3, 3}, x.options().memory_format(cl));
    const Geometry g{N, C, H, W, K, gc.size(2), gc.size(3), stride};
    std::optional<ReluAffineRows> rows;
    if (in_kernel) rows.emplace(scale.const_data_ptr<float>(), shift.const_data_ptr<float>(), C);
    weight_grad_avx2(gc.const_data_ptr<float>(), xc.const_data_ptr<float>(), g, out.mutable_data_ptr<float>(),
                     rows.has_value() ? &*rows : nullptr);
    return out;
  }
#endif
  // Anything else: ATen's (oneDNN's) weight gradient, in the same layout. The weight gradient reads
  // only the weight's shape: an uninitialised one (zeros of 512 x 512 x 3 x 3, 9.4 MB written and
  // faulted in at each call, took ResNet-50 layer4's weight gradient from 18.3 to 25.9 ms).
  const at::Tensor weight = at::empty({K, C, 3, 3}, x.options().memory_format(cl));
  auto grads = at::convolution_backward(grad_out, x, weight, std::nullopt, {stride, stride}, {1, 1}, {1, 1}, false,
                                        {0, 0}, 1, {false, true, false});
  return std::get<1>(grads).contiguous(cl);
}

// The bn_* arguments are the backward's (csrc/autograd.cpp): how x was made, checked here.
at::Tensor conv3x3_train_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t stride, bool winograd,
                             bool /*weight_grad_kernel*/, const std::optional<at::Tensor>& bn_input,
                             const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                             const std::optional<at::Tensor>& bn_mean, const std::optional<at::Tensor>& bn_var,
                             double /*bn_eps*/, bool /*bn_training*/, const std::optional<at::Tensor>& bn_conv_weight,
                             int64_t bn_conv_stride, int64_t bn_conv_padding, bool winograd_tiles,
                             bool /*weight_grad_winograd*/, bool direct) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
              "conv3x3_train: expected a (K, C, 3, 3) weight, got shape ", weight.sizes());
  TORCH_CHECK(!bn_conv_weight.has_value() || bn_input.has_value(),
              "conv3x3_train: bn_conv_weight (the stem's convolution that made bn_input's BatchNorm input) needs bn_input");
  if (bn_input.has_value() && bn_conv_weight.has_value()) {
    // bn_input is the stem's input: its convolution must give x's shape.
    const at::Tensor& w = *bn_conv_weight;
    const int64_t s = bn_conv_stride, p = bn_conv_padding;
    TORCH_CHECK(bn_input->dim() == 4 && w.dim() == 4 && w.size(1) == bn_input->size(1) && w.size(0) == x.size(1) &&
                    w.size(2) == w.size(3) && s >= 1 && p >= 0 && bn_input->scalar_type() == at::kFloat &&
                    w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
                    bn_input->size(0) == x.size(0) && (bn_input->size(2) + 2 * p - w.size(2)) / s + 1 == x.size(2) &&
                    (bn_input->size(3) + 2 * p - w.size(3)) / s + 1 == x.size(3),
                "conv3x3_train: bn_input and bn_conv_weight (the stem's input and weight) must be float32 and their "
                "convolution (stride ", s, ", padding ", p, ") must give x's shape ", x.sizes(), ", got bn_input ",
                bn_input->scalar_type(), " ", bn_input->sizes(), " and bn_conv_weight ", w.scalar_type(), " ",
                w.sizes());
  } else if (bn_input.has_value()) {
    TORCH_CHECK(bn_input->sizes() == x.sizes() && bn_input->scalar_type() == at::kFloat &&
                    x.scalar_type() == at::kFloat,
                "conv3x3_train: bn_input (the BatchNorm input x was made from) must be float32 of x's shape, got ",
                bn_input->scalar_type(), " ", bn_input->sizes(), " for x ", x.scalar_type(), " ", x.sizes());
  }
  if (bn_input.has_value()) {
    const int64_t C = x.size(1);
    for (const auto* t : {&bn_weight, &bn_bias, &bn_mean, &bn_var})
      TORCH_CHECK(t->has_value() && (*t)->dim() == 1 && (*t)->size(0) == C,
                  "conv3x3_train: with bn_input, bn_weight, bn_bias, bn_mean and bn_var must be vectors of x's ", C,
                  " channels");
  }
  TORCH_CHECK(stride == 1 || stride == 2, "conv3x3_train: expected stride 1 or 2, got ", stride);
  TORCH_CHECK(!(winograd && direct), "conv3x3_train: winograd and direct are two ways to run the forward; pass one");
  if (direct) {  // our direct kernel where it can run (AVX-512, K % 16 == 0), else ATen's
    if (conv3x3_direct_can_run(x, weight)) return conv3x3_direct(x, weight, stride);
    // Elsewhere ATen's, in the kernel's output layout (the op's fake kernel promises channels_last).
    return at::convolution(x, weight, std::nullopt, {stride, stride}, {1, 1}, {1, 1}, false, {0, 0}, 1)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  if (winograd) {  // the weight transformed at each call: it changes at every step
    TORCH_CHECK(stride == 1, "conv3x3_train: Winograd F(2x2, 3x3) runs stride 1 only, got stride ", stride);
    return winograd_conv3x3(x, winograd_weight(weight), at::zeros({weight.size(0)}, x.options()), std::nullopt, false,
                            winograd_tiles);
  }
  return at::convolution(x, weight, std::nullopt, {stride, stride}, {1, 1}, {1, 1}, false, {0, 0}, 1);
}

// The stride-2 input gradient (conv3x3_train's backward where its plan says `direct`): our direct
// kernel where it runs (AVX-512, C % 16 == 0), else ATen's (oneDNN's backward-data), channels_last
// either way.
at::Tensor conv3x3_input_grad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, int64_t stride,
                                  at::IntArrayRef input_size) {
  TORCH_CHECK(stride == 2, "conv3x3_input_grad: expected stride 2 (at stride 1 the input gradient is conv3x3_train "
              "itself, on the flipped, transposed weight), got ", stride);
  TORCH_CHECK(grad_out.dim() == 4 && weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 &&
                  input_size.size() == 4 && weight.size(0) == grad_out.size(1) && weight.size(1) == input_size[1] &&
                  input_size[0] == grad_out.size(0) && (input_size[2] - 1) / 2 + 1 == grad_out.size(2) &&
                  (input_size[3] - 1) / 2 + 1 == grad_out.size(3),
              "conv3x3_input_grad: expected grad_out (N, K, OH, OW), weight (K, C, 3, 3) and the input size (N, C, H, "
              "W) of a stride-2 convolution giving grad_out's map, got grad_out ", grad_out.sizes(), ", weight ",
              weight.sizes(), " and input size ", input_size);
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), "conv3x3_input_grad: grad_out is ",
              grad_out.scalar_type(), " but weight is ", weight.scalar_type());
  if (conv3x3_direct_input_grad_can_run(grad_out, weight)) return conv3x3_direct_input_grad(grad_out, weight, input_size);
  const at::Tensor shaped = at::empty(input_size, grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
  return std::get<0>(at::convolution_backward(grad_out, shaped, weight, std::nullopt, {2, 2}, {1, 1}, {1, 1}, false,
                                              {0, 0}, 1, {true, false, false}))
      .contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv3x3_input_grad", &conv3x3_input_grad_cpu);
  m.impl("conv3x3_train", &conv3x3_train_cpu);
  m.impl("conv3x3_weight_grad", &conv3x3_weight_grad_cpu);
}

}  // namespace resnet_fast
