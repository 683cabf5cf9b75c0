// The stride-1 3x3 convolution (padding 1, no bias) by a direct AVX-512 kernel of ours, for
// training's forward and input gradient where oneDNN's is slow: ResNet-20's 16-channel stage,
// whose (128, 16, 32, 32) maps oneDNN runs at about 170-240 GFLOP/s on a 2-core Zen 5.
// Formula: resnet_fast.ops.reference.conv3x3_train (stride 1).
//
//   y[n, h, w, k] = sum over r, s, c of xp[n, h + r, w + s, c] * weight[k, c, r, s]
//
// where xp is x with one zero row and column around the map. In channels_last, an output pixel's
// 16 output channels are one AVX-512 vector; a register tile holds T such vectors (T consecutive
// pixels of an output row) and, for each tap (r, s) and input channel c, loads the weight's vector
// weight[k..k+15, c, r, s] once and adds it times xp[n, h + r, w + t + s, c] to pixel t's sum (one
// FMA with its broadcast from memory per pixel): 9 * C rank-1 updates per tile, FMA-bound.
//
// Work items are bands of output rows of one image (whole images where the batch gives every
// thread several). An item copies its input rows, halo included, into a zero-bordered per-thread
// buffer, one plane per block of 16 input channels (C padded with zeros to a multiple of 16), so
// that a tile's loads are at constant offsets and read no bounds: nothing outside x is read, and
// padding contributes exact zeros (a NaN next to the map stays out). Each sum runs over the
// channel blocks, r, s and c in that order, in float32.
//
// The input gradient at stride 1 is this convolution of grad_out with the flipped, transposed
// weight (csrc/autograd.cpp). A weight gradient by the same tiling (24 accumulators: 3 taps x 8
// output channels of 16 input-channel vectors) ran 0.83-0.90x oneDNN's on (128, 16, 32, 32), and
// was not kept (CHANGELOG, 2026-12-07).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "cpu/conv3x3_direct.h"
#include "cpu/isa.h"

#ifdef RESNET_FAST_AVX2
#include <immintrin.h>
#endif

namespace resnet_fast {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifdef RESNET_FAST_AVX2
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

// Output pixels t = 0..T-1 of one output row, output channels k..k+15: `in` is the buffer at the
// output row's top tap row, column w, of its first block of 16 input channels; `plane` the
// distance between two blocks' planes, `pw` a buffer row's length in floats (both for each block
// alike); `wk` the packed weight of this block of 16 output channels, (C / 16, r, s, 16, 16). Every
// pixel's 16 channels of a block are consecutive: offsets within a tile are constants.
template <int T>
inline void tile(const float* __restrict__ in, int64_t plane, int64_t pw, int64_t CB, const float* __restrict__ wk,
                 float* __restrict__ out, int64_t K) {
  __m512 acc[T];
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t cb = 0; cb < CB; ++cb) {
    for (int r = 0; r < 3; ++r) {
      for (int s = 0; s < 3; ++s) {
        const float* x = in + cb * plane + r * pw + s * 16;
        const float* w = wk + ((cb * 3 + r) * 3 + s) * 256;
#pragma GCC unroll 1
        for (int c = 0; c < 16; ++c) {
          const __m512 wv = _mm512_loadu_ps(w + c * 16);
#pragma GCC unroll 32
          for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[t * 16 + c]), acc[t]);
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + t * K, acc[t]);
}

struct Geometry {
  int64_t N, C, H, W, K;
};

// Input rows h0 - 1 .. h1 of image n into buf: per block of 16 input channels a plane of `rows`
// rows of W + 2 pixels, zero-bordered; channels past C are zeros.
void fill_band(const float* x, const Geometry& g, int64_t n, int64_t h0, int64_t h1, int64_t rows, float* buf) {
  const int64_t C = g.C, W = g.W, CB = ceil_div(C, 16), pw = (W + 2) * 16, plane = rows * pw;
  for (int64_t i = 0; i < h1 - h0 + 2; ++i) {
    const int64_t h = h0 - 1 + i;
    const bool inside = h >= 0 && h < g.H;
    const float* src = inside ? x + ((n * g.H + h) * W) * C : nullptr;
    for (int64_t cb = 0; cb < CB; ++cb) {
      float* row = buf + cb * plane + i * pw;
      if (!inside) {
        std::fill(row, row + pw, 0.f);
        continue;
      }
      const int64_t c0 = cb * 16, nc = std::min<int64_t>(16, C - c0);
      _mm512_storeu_ps(row, _mm512_setzero_ps());
      _mm512_storeu_ps(row + (W + 1) * 16, _mm512_setzero_ps());
      if (nc == 16) {  // (a masked load here took a quarter of the kernel's time on a Zen 5)
        for (int64_t w = 0; w < W; ++w) _mm512_storeu_ps(row + (w + 1) * 16, _mm512_loadu_ps(src + w * C + c0));
      } else {
        const __mmask16 m = __mmask16((1u << nc) - 1);
        for (int64_t w = 0; w < W; ++w) _mm512_storeu_ps(row + (w + 1) * 16, _mm512_maskz_loadu_ps(m, src + w * C + c0));
      }
    }
  }
}

// Output rows [h0, h1) of image n: their input rows into buf (fill_band), then the tiles, 16 pixels
// at a time and the rest by 8, 4 and 1.
void band(const float* x, const float* wp, float* y, const Geometry& g, int64_t n, int64_t h0, int64_t h1,
          float* buf) {
  const int64_t C = g.C, W = g.W, K = g.K, CB = ceil_div(C, 16), pw = (W + 2) * 16, rows = h1 - h0 + 2;
  const int64_t plane = rows * pw;
  fill_band(x, g, n, h0, h1, rows, buf);
  for (int64_t h = h0; h < h1; ++h) {
    const float* in = buf + (h - h0) * pw;
    float* out = y + ((n * g.H + h) * W) * K;
    for (int64_t kb = 0; kb < K / 16; ++kb) {
      const float* wk = wp + kb * CB * 9 * 256;
      int64_t w = 0;
      for (; w + 16 <= W; w += 16) tile<16>(in + w * 16, plane, pw, CB, wk, out + w * K + kb * 16, K);
      for (; w + 8 <= W; w += 8) tile<8>(in + w * 16, plane, pw, CB, wk, out + w * K + kb * 16, K);
      for (; w + 4 <= W; w += 4) tile<4>(in + w * 16, plane, pw, CB, wk, out + w * K + kb * 16, K);
      for (; w < W; ++w) tile<1>(in + w * 16, plane, pw, CB, wk, out + w * K + kb * 16, K);
    }
  }
}

// Bands of output rows: whole images where there are 4 or more per thread, else enough bands for 4
// items per thread; at most 256 KB of buffer. Returns the rows of a band.
int64_t band_rows(const Geometry& g) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_image = std::min(g.H, std::max<int64_t>(1, ceil_div(4 * threads, g.N)));
  const int64_t row_floats = (g.W + 2) * 16 * ceil_div(g.C, 16);
  return std::max<int64_t>(1, std::min(ceil_div(g.H, per_image), (65536 / row_floats) - 2));
}

void conv3x3_direct_avx512(const float* x, const float* wp, float* y, const Geometry& g) {
  const int64_t rows = band_rows(g), bands = ceil_div(g.H, rows);
  const int64_t row_floats = (g.W + 2) * 16 * ceil_div(g.C, 16);
  at::parallel_for(0, g.N * bands, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf((rows + 2) * row_floats);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / bands, h0 = i % bands * rows;
      band(x, wp, y, g, n, h0, std::min(g.H, h0 + rows), buf.data());
    }
  });
}

#pragma GCC pop_options
#endif  // RESNET_FAST_AVX2

}  // namespace

bool conv3x3_direct_can_run(const at::Tensor& x, const at::Tensor& weight) {
  return use_avx512() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() == 4 &&
         weight.dim() == 4 && weight.size(0) % 16 == 0 && weight.size(1) == x.size(1) && weight.size(2) == 3 &&
         weight.size(3) == 3;
}

at::Tensor conv3x3_direct(const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK(conv3x3_direct_can_run(input, weight),
              "conv3x3_direct: expected float32 x (N, C, H, W) and weight (K, C, 3, 3) with K a multiple of 16 on a "
              "CPU with AVX-512, got x ", input.scalar_type(), " ", input.sizes(), " and weight ",
              weight.scalar_type(), " ", weight.sizes());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = weight.size(0);
  at::Tensor y = at::empty({N, K, H, W}, input.options().memory_format(cl));
  if (y.numel() == 0) return y;
  if (C == 0) return y.zero_();
  const at::Tensor x = input.contiguous(cl);
  // (K / 16, C / 16, r, s, 16, 16), C padded with zeros to a multiple of 16: a tile's weight
  // vectors in the order it reads them.
  const int64_t CP = (C + 15) / 16 * 16;
  const at::Tensor wpad = CP == C ? weight : at::constant_pad_nd(weight, {0, 0, 0, 0, 0, CP - C});
  const at::Tensor wp = wpad.reshape({K / 16, 16, CP / 16, 16, 3, 3}).permute({0, 2, 4, 5, 3, 1}).contiguous();
#ifdef RESNET_FAST_AVX2
  conv3x3_direct_avx512(x.const_data_ptr<float>(), wp.const_data_ptr<float>(), y.mutable_data_ptr<float>(),
                        Geometry{N, C, H, W, K});
#endif
  return y;
}

}  // namespace resnet_fast
