// The 3x3 convolution (padding 1, no bias, stride 1 or 2) by a direct AVX-512 kernel of ours, for
// training's forward and input gradient where oneDNN's is slow: ResNet-20's 16-channel stage and
// its two stride-2 convolutions, whose maps oneDNN runs at 170-240 GFLOP/s (stride 1) and far less
// (the stride-2 input gradient) on a 2-core Zen 5.
// Formula: resnet_fast.ops.reference.conv3x3_train.
//
//   y[n, h, w, k] = sum over r, s, c of xp[n, S*h + r, S*w + s, c] * weight[k, c, r, s]
//
// where xp is x with one zero row and column around the map and S the stride. In channels_last,
// an output pixel's 16 output channels are one AVX-512 vector; a register tile holds T such vectors
// (T consecutive pixels of an output row; two blocks of output channels, 2 x 8, where rows are
// narrower than 16). For a tap row r and input channel c it loads the three weight vectors
// weight[k..k+15, c, r, 0..2] and broadcasts each input column the tile reads once, adding it
// times the weight of every tap s that reads it to that pixel's sum: at stride 1, T + 2
// broadcasts make 3T FMAs; at stride 2, 2T + 1 make 3T.
//
// Work items are bands of output rows of one image (whole images where the batch gives every
// thread several). An item copies its input rows, halo included, into a zero-bordered per-thread
// buffer, one plane per block of 16 input channels (C padded with zeros to a multiple of 16), so
// that a tile's loads are at constant offsets and read no bounds: nothing outside x is read, and
// padding contributes exact zeros (a NaN next to the map stays out); rows outside the map are
// skipped. (Reading a 16-channel x in place instead, skipping its edges, ran 0.89-0.95x the copy
// at stride 1 and the same at stride 2: the copy stays.) Each sum runs over the channel blocks, r,
// c and s in that order, in float32.
//
// The input gradient at stride 1 is this convolution of grad_out with the flipped, transposed
// weight (csrc/autograd.cpp). At stride 2 it is the transposed convolution
//
//   dx[n, i, j, c] = sum over r, s, k of dy[n, (i + 1 - r) / 2, (j + 1 - s) / 2, k] * weight[k, c, r, s]
//
// over the terms whose quotients are whole and inside dy: an even row i takes tap row r = 1 (dy row
// i / 2), an odd one r = 0 and 2 (dy rows (i + 1) / 2 and (i - 1) / 2); an even column j = 2t the
// tap s = 1 at dy column t, an odd one j = 2t + 1 the taps s = 2 and 0 at dy columns t and t + 1.
// So a tile of T even (or odd) columns of a dx row is the same kernel over dy at stride 1 with one
// (two) taps per row: 9 multiply-adds per output channel and pixel on average, as the forward does.
// A weight gradient by the same tiling (24 accumulators: 3 taps x 8 output channels of 16
// input-channel vectors) ran 0.83-0.90x oneDNN's on (128, 16, 32, 32), and was not kept
// (CHANGELOG, 2026-12-07).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <utility>
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

// The taps of one output row: for each of `n` tap rows, its input row (at the tile's reference
// column, block 0 of 16 input channels; nullptr: a row outside the map, zeros) and, for each tap u
// of that row, its packed weight (block 0 of the input channels; the blocks follow every
// kBlockWeights floats).
struct RowTaps {
  int n = 0;
  const float* in[3];
  const float* w[3][3];
};

constexpr int64_t kBlockWeights = 9 * 256;  // one block of 16 input channels' taps in the packing

// Output pixels t = 0..T-1 of one row, NK blocks of 16 output channels. Pixel t reads, for each
// tap row and its tap u, the buffer column S*t + u - P (relative to the row's pointer, at the
// tile's first pixel; the buffer's zero border is column -1); each column is broadcast once and
// feeds every (block, t, u) that reads it. `plane`: the distance between two blocks of 16 input
// channels; `kstride`: between two output blocks' packed weights; out: block b of pixel t at
// out + t * ostride + 16 * b.
template <int T, int NK, int S, int U, int P>
inline void tile(const RowTaps& taps, int64_t plane, int64_t CB, int64_t kstride, float* __restrict__ out,
                 int64_t ostride) {
  constexpr int J = S * (T - 1) + U;  // columns read
  __m512 acc[NK][T];
#pragma GCC unroll 32
  for (int b = 0; b < NK; ++b)
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) acc[b][t] = _mm512_setzero_ps();
  for (int64_t cb = 0; cb < CB; ++cb) {
    for (int i = 0; i < taps.n; ++i) {
      if (taps.in[i] == nullptr) continue;
      const float* __restrict__ x = taps.in[i] + cb * plane;
      const float* wu[U];
#pragma GCC unroll 3
      for (int u = 0; u < U; ++u) wu[u] = taps.w[i][u] + cb * kBlockWeights;
#pragma GCC unroll 1
      for (int c = 0; c < 16; ++c) {
        __m512 wv[NK][U];
#pragma GCC unroll 4
        for (int b = 0; b < NK; ++b)
#pragma GCC unroll 3
          for (int u = 0; u < U; ++u) wv[b][u] = _mm512_loadu_ps(wu[u] + b * kstride + c * 16);
#pragma GCC unroll 40
        for (int j = 0; j < J; ++j) {
          const __m512 v = _mm512_set1_ps(x[(j - P) * 16 + c]);
#pragma GCC unroll 3
          for (int u = 0; u < U; ++u) {
            if ((j - u) % S != 0) continue;
            const int t = (j - u) / S;
            if (t >= 0 && t < T)
#pragma GCC unroll 4
              for (int b = 0; b < NK; ++b) acc[b][t] = _mm512_fmadd_ps(wv[b][u], v, acc[b][t]);
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < NK; ++b)
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + t * ostride + 16 * b, acc[b][t]);
}

// A row's `count` pixels by tiles of 16 / NK, then 8 / NK, 4 and 1 pixels (NK output blocks at a
// time: at most 16 accumulators), the row's input pointers moved to each tile's first pixel.
template <int NK, int S, int U, int P>
void row_tiles(const RowTaps& row, int64_t count, int64_t plane, int64_t CB, int64_t kstride, float* out,
               int64_t ostride) {
  int64_t t = 0;
  auto run = [&](auto tsize) {
    constexpr int T = decltype(tsize)::value;
    for (; t + T <= count; t += T) {
      RowTaps taps = row;
      for (int i = 0; i < taps.n; ++i)
        if (taps.in[i] != nullptr) taps.in[i] += S * t * 16;
      tile<T, NK, S, U, P>(taps, plane, CB, kstride, out + t * ostride, ostride);
    }
  };
  run(std::integral_constant<int, 16 / NK>());
  if constexpr (NK == 1) run(std::integral_constant<int, 8>());
  run(std::integral_constant<int, 4>());
  run(std::integral_constant<int, 1>());
}

// The input of a convolution (x for the forward, dy for the stride-2 input gradient): (N, H, W, C)
// in memory; its blocks of 16 channels (the last padded with zeros in the buffer).
struct Input {
  const float* data;
  int64_t N, C, H, W;
  int64_t blocks() const { return ceil_div(C, 16); }
  int64_t row_floats() const { return (W + 2) * 16 * blocks(); }  // one buffer row, all blocks
};

// Rows first .. first + count - 1 of image n into buf: per block of 16 channels a plane of `count`
// rows of W + 2 pixels (columns -1 .. W), zero-bordered; rows outside the map and channels past C
// are zeros.
void fill_rows(const Input& x, int64_t n, int64_t first, int64_t count, float* buf) {
  const int64_t C = x.C, W = x.W, CB = x.blocks(), pw = (W + 2) * 16, plane = count * pw;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t h = first + i;
    const bool inside = h >= 0 && h < x.H;
    const float* src = inside ? x.data + ((n * x.H + h) * W) * C : nullptr;
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

// A band's input rows, rows first .. first + count - 1 of image n in buf (fill_rows).
struct Rows {
  const Input& x;
  int64_t n, first, count;
  const float* buf;
  int64_t plane() const { return count * (x.W + 2) * 16; }
  // Input row h at column 0 (block 0), nullptr where h is outside the map (a zero row: skipped).
  const float* row(int64_t h) const {
    return h < 0 || h >= x.H ? nullptr : buf + (h - first) * (x.W + 2) * 16 + 16;
  }
};

// The forward: output rows [h0, h1) of image n, stride S. wp: the packed weight (K / 16, CB, r, s,
// 16, 16).
template <int S>
void forward_band(const Rows& in, const float* wp, float* y, int64_t K, int64_t OH, int64_t OW, int64_t h0,
                  int64_t h1) {
  const int64_t CB = in.x.blocks();
  for (int64_t h = h0; h < h1; ++h) {
    float* out = y + ((in.n * OH + h) * OW) * K;
    // Rows narrower than 16 pixels: two output blocks a tile (16 accumulators, each broadcast
    // feeding both; 32 -> 64 channels at stride 2: 1.13x one block a tile, Zen 5).
    const bool pairs = K % 32 == 0 && OW < 16;
    for (int64_t kb = 0; kb < K / 16; kb += pairs ? 2 : 1) {
      const float* wk = wp + kb * CB * kBlockWeights;
      RowTaps row;
      row.n = 3;
      for (int r = 0; r < 3; ++r) {
        row.in[r] = in.row(S * h - 1 + r);
        for (int s = 0; s < 3; ++s) row.w[r][s] = wk + (r * 3 + s) * 256;
      }
      if (pairs)
        row_tiles<2, S, 3, 1>(row, OW, in.plane(), CB, CB * kBlockWeights, out + kb * 16, K);
      else
        row_tiles<1, S, 3, 1>(row, OW, in.plane(), CB, CB * kBlockWeights, out + kb * 16, K);
    }
  }
}

// The stride-2 input gradient: dx rows [i0, i1) of image n from dy (`in`), dx (N, H, W, C). wp: the
// transposed weight packed as the forward's, (C / 16, KB, r, s, 16, 16).
void input_grad_band(const Rows& in, const float* wp, float* dx, int64_t C, int64_t H, int64_t W, int64_t i0,
                     int64_t i1) {
  const int64_t KB = in.x.blocks();
  // Rows of fewer than 16 even (odd) pixels: two blocks of dx's channels a tile (as the forward's;
  // 32 <- 64 channels: 1.19x one block a tile, Zen 5).
  const bool pairs = C % 32 == 0 && W / 2 < 16;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t cb = 0; cb < C / 16; cb += pairs ? 2 : 1) {
      const float* wk = wp + cb * KB * kBlockWeights;
      // (tap row r, dy row) pairs: an even row r = 1 at i / 2; an odd one r = 0 at (i + 1) / 2, r = 2 at (i - 1) / 2.
      int rs[2], n = 0;
      int64_t ohs[2];
      if (i % 2 == 0) {
        rs[n] = 1, ohs[n++] = i / 2;
      } else {
        rs[n] = 0, ohs[n++] = (i + 1) / 2;
        rs[n] = 2, ohs[n++] = (i - 1) / 2;
      }
      float* out = dx + ((in.n * H + i) * W) * C + cb * 16;
      RowTaps even, odd;  // even columns 2t: s = 1 at dy column t; odd 2t + 1: s = 2 at t, s = 0 at t + 1
      even.n = odd.n = n;
      for (int k = 0; k < n; ++k) {
        even.in[k] = odd.in[k] = in.row(ohs[k]);
        even.w[k][0] = wk + (rs[k] * 3 + 1) * 256;
        odd.w[k][0] = wk + (rs[k] * 3 + 2) * 256;
        odd.w[k][1] = wk + (rs[k] * 3 + 0) * 256;
      }
      // (The odd columns' last tap reads dy column W / 2: where W is even, the buffer's zero border.)
      if (pairs) {
        row_tiles<2, 1, 1, 0>(even, (W + 1) / 2, in.plane(), KB, KB * kBlockWeights, out, 2 * C);
        row_tiles<2, 1, 2, 0>(odd, W / 2, in.plane(), KB, KB * kBlockWeights, out + C, 2 * C);
      } else {
        row_tiles<1, 1, 1, 0>(even, (W + 1) / 2, in.plane(), KB, 0, out, 2 * C);
        row_tiles<1, 1, 2, 0>(odd, W / 2, in.plane(), KB, 0, out + C, 2 * C);
      }
    }
  }
}

// Work items: bands of `rows` output rows of one image; whole images where there are 4 or more per
// thread, else enough bands for 4 items per thread, each band's buffer about 256 KB at most.
int64_t band_rows(int64_t N, int64_t OH, int64_t in_rows_per_row, const Input& x) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_image = std::min(OH, std::max<int64_t>(1, ceil_div(4 * threads, N)));
  const int64_t budget = std::max<int64_t>(1, (65536 / x.row_floats() - 3) / in_rows_per_row);
  return std::max<int64_t>(1, std::min(ceil_div(OH, per_image), budget));
}

// Over the bands of all images: band(rows, h0, h1) with the band's input rows, input_rows(h0, h1)
// = (first, count), in the thread's buffer.
template <typename InputRows, typename Band>
void for_bands(const Input& x, int64_t OH, int64_t rows, InputRows input_rows, Band band) {
  const int64_t bands = ceil_div(OH, rows);
  // (+1: a band of the input gradient that starts at an odd row reads one dy row more than the first)
  const int64_t buf_floats = (input_rows(0, rows).second + 1) * x.row_floats();
  at::parallel_for(0, x.N * bands, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(buf_floats);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = item / bands, h0 = item % bands * rows, h1 = std::min(OH, h0 + rows);
      const auto [first, count] = input_rows(h0, h1);
      fill_rows(x, n, first, count, buf.data());
      band(Rows{x, n, first, count, buf.data()}, h0, h1);
    }
  });
}

void forward_avx512(const Input& x, const float* wp, float* y, int64_t K, int64_t stride) {
  const int64_t OH = (x.H - 1) / stride + 1, OW = (x.W - 1) / stride + 1;
  const int64_t rows = band_rows(x.N, OH, stride, x);
  auto input_rows = [&](int64_t h0, int64_t h1) { return std::pair<int64_t, int64_t>(stride * h0 - 1, stride * (h1 - h0 - 1) + 3); };
  if (stride == 1)
    for_bands(x, OH, rows, input_rows, [&](const Rows& in, int64_t h0, int64_t h1) { forward_band<1>(in, wp, y, K, OH, OW, h0, h1); });
  else
    for_bands(x, OH, rows, input_rows, [&](const Rows& in, int64_t h0, int64_t h1) { forward_band<2>(in, wp, y, K, OH, OW, h0, h1); });
}

void input_grad_avx512(const Input& dy, const float* wp, float* dx, int64_t C, int64_t H, int64_t W) {
  // dx rows [i0, i1) read dy rows i0 / 2 .. (i1 - 1) / 2 + 1 (the last maybe outside dy, zeros).
  auto input_rows = [](int64_t i0, int64_t i1) { return std::pair<int64_t, int64_t>(i0 / 2, (i1 - 1) / 2 + 2 - i0 / 2); };
  const int64_t rows = band_rows(dy.N, H, 1, dy);
  for_bands(dy, H, rows, input_rows, [&](const Rows& in, int64_t i0, int64_t i1) { input_grad_band(in, wp, dx, C, H, W, i0, i1); });
}

#pragma GCC pop_options
#endif  // RESNET_FAST_AVX2

// weight (K, C, 3, 3) -> (K / 16, CP / 16, r, s, 16 c, 16 k), C padded with zeros to CP, a multiple
// of 16: a tile's weight vectors in the order it reads them.
at::Tensor pack_weight(const at::Tensor& weight) {
  const int64_t K = weight.size(0), C = weight.size(1), CP = (C + 15) / 16 * 16;
  const at::Tensor wpad = CP == C ? weight : at::constant_pad_nd(weight, {0, 0, 0, 0, 0, CP - C});
  return wpad.reshape({K / 16, 16, CP / 16, 16, 3, 3}).permute({0, 2, 4, 5, 3, 1}).contiguous();
}

}  // namespace

bool conv3x3_direct_can_run(const at::Tensor& x, const at::Tensor& weight) {
  return use_avx512() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.dim() == 4 &&
         weight.dim() == 4 && weight.size(0) % 16 == 0 && weight.size(1) == x.size(1) && weight.size(2) == 3 &&
         weight.size(3) == 3;
}

at::Tensor conv3x3_direct(const at::Tensor& input, const at::Tensor& weight, int64_t stride) {
  TORCH_CHECK(conv3x3_direct_can_run(input, weight) && (stride == 1 || stride == 2),
              "conv3x3_direct: expected float32 x (N, C, H, W) and weight (K, C, 3, 3) with K a multiple of 16, "
              "stride 1 or 2, on a CPU with AVX-512, got x ", input.scalar_type(), " ", input.sizes(), ", weight ",
              weight.scalar_type(), " ", weight.sizes(), " and stride ", stride);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = weight.size(0);
  at::Tensor y = at::empty({N, K, (H - 1) / stride + 1, (W - 1) / stride + 1}, input.options().memory_format(cl));
  if (y.numel() == 0) return y;
  if (C == 0) return y.zero_();
  const at::Tensor x = input.contiguous(cl);
  const at::Tensor wp = pack_weight(weight);
#ifdef RESNET_FAST_AVX2
  forward_avx512(Input{x.const_data_ptr<float>(), N, C, H, W}, wp.const_data_ptr<float>(),
                 y.mutable_data_ptr<float>(), K, stride);
#endif
  return y;
}

bool conv3x3_direct_input_grad_can_run(const at::Tensor& grad_out, const at::Tensor& weight) {
  return use_avx512() && grad_out.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         grad_out.dim() == 4 && weight.dim() == 4 && weight.size(1) % 16 == 0 && weight.size(0) == grad_out.size(1) &&
         weight.size(2) == 3 && weight.size(3) == 3;
}

at::Tensor conv3x3_direct_input_grad(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size) {
  TORCH_CHECK(conv3x3_direct_input_grad_can_run(grad_out, weight) && input_size.size() == 4 &&
                  input_size[0] == grad_out.size(0) && input_size[1] == weight.size(1) &&
                  (input_size[2] - 1) / 2 + 1 == grad_out.size(2) && (input_size[3] - 1) / 2 + 1 == grad_out.size(3),
              "conv3x3_direct_input_grad: expected float32 grad_out (N, K, OH, OW) and weight (K, C, 3, 3) with C a "
              "multiple of 16, on a CPU with AVX-512, and the input size (N, C, H, W) of a stride-2 convolution "
              "giving grad_out's map, got grad_out ", grad_out.scalar_type(), " ", grad_out.sizes(), ", weight ",
              weight.scalar_type(), " ", weight.sizes(), " and input size ", input_size);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3], K = weight.size(0);
  at::Tensor dx = at::empty(input_size, grad_out.options().memory_format(cl));
  if (dx.numel() == 0) return dx;
  if (K == 0) return dx.zero_();
  const at::Tensor dy = grad_out.contiguous(cl);
  const at::Tensor wp = pack_weight(weight.transpose(0, 1));
#ifdef RESNET_FAST_AVX2
  input_grad_avx512(Input{dy.const_data_ptr<float>(), N, K, dy.size(2), dy.size(3)}, wp.const_data_ptr<float>(),
                    dx.mutable_data_ptr<float>(), C, H, W);
#endif
  return dx;
}

}  // namespace resnet_fast
