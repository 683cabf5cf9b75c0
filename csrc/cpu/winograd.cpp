// 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3), with a bias,
// an optional residual and ReLU as its epilogue: the inference op conv3x3_bias_act (formula:
// resnet_fast.ops.reference.conv3x3_bias_act; the BatchNorm-folded weight transformed once by
// the op winograd_weight below and cached), and training's conv3x3_train forward and input
// gradient (conv3x3_train.cpp; the weight transformed at each call by the same winograd_weight),
// and training's stride-1 weight gradient (winograd_weight_grad, at the end of this file).
// Where Winograd runs is decided by the caller (resnet_fast._routing.winograd_applies,
// weight_grad_winograd_applies).
//
// Each 2x2 output tile t comes from a 4x4 input tile d: Y = A^T [ (G g G^T) . (B^T d B) ] A,
// so a convolution becomes, per tile block, an input transform V[xi][t][c] (xi: the 16 positions
// of the 4x4 transform), 16 matrix products M[xi] = V[xi] U[xi] (tiles x C times C x K: our
// register tiles, gemm_rows of conv_gemm.cpp, where the caller asks (`tiles`), else at::bmm,
// MKL's sgemm) and an output transform with the epilogue. 2.25x fewer multiplications
// than the direct convolution; the transforms are a few additions per value. On this 2-core AVX2
// machine (no oneDNN Winograd without AVX-512) ResNet-50's stride-1 3x3 convolutions at batch 8
// took 6.3-7.3 ms against oneDNN's 9.3-9.5 (1.3-1.7x), as accurate or more (float32, against float64).
//
// Narrow maps (C < 256) run tile blocks in parallel, each thread through its own V and M that stay
// in cache; wide ones (C >= 256, few tiles) run chunks of tiles one after another, with the
// transforms and the products each parallel (V and M at most 8 MB).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/batch_norm_act.h"
#include "cpu/conv_gemm.h"
#include "cpu/isa.h"
#include "cpu/winograd.h"

#ifdef RESNET_FAST_AVX2
#include <immintrin.h>
#endif

namespace resnet_fast {

#define RF_KERNELS "cpu/winograd_kernels.inc"
#define RF_KERNELS_AVX512
#include "cpu/isa_kernels.h"

namespace {

// Winograd F(2x2, 3x3)'s filter transform G (exact in binary): U = G g G^T per (k, c).
constexpr double kG[4][3] = {{1., 0., 0.}, {.5, .5, .5}, {.5, -.5, .5}, {0., 0., 1.}};

// V's 16 planes one tile row further apart than `rows` tiles need: at a power-of-two distance the
// 16 streams of input_tile's stores meet in the same L1 sets. Its planes lie V.stride(0) apart.
at::Tensor input_scratch(int64_t rows, int64_t C, const at::TensorOptions& options) {
  return at::empty({16, rows + 1, C}, options);
}

struct Plan {
  int64_t N, C, H, W, K, TH, TW;  // TH x TW tiles per image
  const float* x;
  const float* bias;
  const float* residual;  // nullptr: none
  float* y;
  const float* zeros;  // max(C, K) zeros: the padding's pixels and an absent residual
  bool relu;
};

// The 4x4 input pixels of tile (ty, tx) of an H x W map of C channels whose rows from row0 on
// start at `rows`: a zero row where the tile overhangs the map (padding 1).
void tile_pixels(const float* rows, int64_t row0, int64_t H, int64_t W, int64_t C, int64_t ty, int64_t tx,
                 const float* zeros, const float* (&px)[4][4]) {
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t h = 2 * ty - 1 + i, w = 2 * tx - 1 + j;
      px[i][j] = (h >= 0 && h < H && w >= 0 && w < W) ? rows + ((h - row0) * W + w) * C : zeros;
    }
}

// Input tiles [t0, t0 + cnt) into V (16 x vs floats apart, tile q at q * C).
void input_tiles(const Plan& p, int64_t t0, int64_t cnt, float* V, int64_t vs) {
  for (int64_t q = 0; q < cnt; ++q) {
    const int64_t t = t0 + q, n = t / (p.TH * p.TW), ty = (t / p.TW) % p.TH, tx = t % p.TW;
    const float* px[4][4];
    tile_pixels(p.x + n * p.H * p.W * p.C, 0, p.H, p.W, p.C, ty, tx, p.zeros, px);
    RF_ISA(input_tile)(px, V + q * p.C, vs, p.C);
  }
}

void output_tiles(const Plan& p, int64_t t0, int64_t cnt, const float* M, int64_t ms, float* scratch) {
  for (int64_t q = 0; q < cnt; ++q) {
    const int64_t t = t0 + q, n = t / (p.TH * p.TW), ty = (t / p.TW) % p.TH, tx = t % p.TW;
    const float* r[2][2];
    float* y[2][2];
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        const int64_t h = 2 * ty + i, w = 2 * tx + j;
        const bool in_map = h < p.H && w < p.W;
        const int64_t off = ((n * p.H + h) * p.W + w) * p.K;
        y[i][j] = in_map ? p.y + off : scratch;
        r[i][j] = in_map && p.residual ? p.residual + off : p.zeros;
      }
    RF_ISA(output_tile)(M + q * p.K, ms, p.bias, r, y, p.K, p.relu);
  }
}

// The op, its output either fresh or (into_residual) the residual's own storage: the output
// transform reads each tile's residual and then writes its outputs in the same place.
at::Tensor winograd(const at::Tensor& x, const at::Tensor& weight_winograd, const at::Tensor& bias,
                    const std::optional<at::Tensor>& residual, bool relu, bool tiles, bool into_residual) {
  TORCH_CHECK(x.dim() == 4, "conv3x3_bias_act: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight_winograd.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "conv3x3_bias_act: expected float32 tensors, got x ", x.scalar_type(), ", weight ",
              weight_winograd.scalar_type(), ", bias ", bias.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight_winograd.dim() == 3 && weight_winograd.size(0) == 16 && weight_winograd.size(1) == C,
              "conv3x3_bias_act: expected a Winograd weight of shape (16, ", C, ", K) (winograd_weight of a (K, ", C,
              ", 3, 3) weight), got ", weight_winograd.sizes());
  const int64_t K = weight_winograd.size(2);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == K, "conv3x3_bias_act: expected a bias of shape (", K, "), got ",
              bias.sizes());
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({N, K, H, W}) && residual->scalar_type() == at::kFloat,
                "conv3x3_bias_act: expected a float32 residual of shape (", N, ", ", K, ", ", H, ", ", W, "), got ",
                residual->scalar_type(), " ", residual->sizes());
    res = residual->contiguous(cl);
  }
  at::Tensor y = into_residual ? res : at::empty({N, K, H, W}, x.options().memory_format(cl));
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(cl), U = weight_winograd.contiguous(), b = bias.contiguous();
  const at::Tensor zeros = at::zeros({std::max(C, K)}, x.options());
  // The products by our register tiles (conv_gemm.cpp) where asked, the widest this CPU has, on
  // U's (C, K) planes as they are; else at::bmm (MKL's sgemm).
  const bool ours = tiles && K % 16 == 0;
  const bool wide = use_avx512();
  const float* u = U.const_data_ptr<float>();
  const float* zp = zeros.const_data_ptr<float>();
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, T = N * TH * TW;
  const Plan p{N, C, H, W, K, TH, TW, xc.const_data_ptr<float>(), b.const_data_ptr<float>(),
               res.defined() ? res.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(),
               zeros.const_data_ptr<float>(), relu};
  if (C >= 256) {
    // Few tiles, wide products: chunks of tiles one after another, each with the transforms and
    // the products parallel; V and M of a chunk (16 x tiles x (C + K) floats) at most 8 MB.
    const int64_t chunk = std::max<int64_t>(32, (int64_t(8) << 20) / (64 * (C + K)));
    const int64_t rows = std::min(chunk, T);
    at::Tensor V = input_scratch(rows, C, x.options()), M = at::empty({16, rows, K}, x.options());
    float* v = V.mutable_data_ptr<float>();
    const float* m = M.const_data_ptr<float>();
    for (int64_t c0 = 0; c0 < T; c0 += rows) {
      const int64_t cnt = std::min(rows, T - c0);
      at::parallel_for(0, cnt, 16, [&](int64_t q0, int64_t q1) {
        input_tiles(p, c0 + q0, q1 - q0, v + q0 * C, V.stride(0));
      });
      if (ours) {  // items of (plane, 64 output channels), the tiles' widest
        const int64_t groups = (K + 63) / 64;
        float* mp = M.mutable_data_ptr<float>();
        at::parallel_for(0, 16 * groups, 1, [&](int64_t i0, int64_t i1) {
          for (int64_t item = i0; item < i1; ++item) {
            const int64_t xi = item / groups, k0 = item % groups * 64, kn = std::min<int64_t>(64, K - k0);
            gemm_rows(v + xi * V.stride(0), C, u + xi * C * K + k0, K, mp + xi * rows * K + k0, K, cnt, C, kn, zp,
                      wide);
          }
        });
      } else {
        at::Tensor Mv = M.narrow(1, 0, cnt);
        at::bmm_out(Mv, V.narrow(1, 0, cnt), U);
      }
      at::parallel_for(0, cnt, 16, [&](int64_t q0, int64_t q1) {
        std::vector<float> scratch(K);
        output_tiles(p, c0 + q0, q1 - q0, m + q0 * K, rows * K, scratch.data());
      });
    }
    return y;
  }
  // Narrow maps: blocks of tiles in parallel, V and M of a block about 1 MB (in cache).
  // (The block count a multiple of the threads: 784 tiles in blocks of 128 left one thread of two
  // idle for a seventh of the time.)
  const int64_t threads = at::get_num_threads();
  const int64_t target = std::max<int64_t>(16, 8192 / std::max<int64_t>(C, 8));
  const int64_t blocks = (T + target * threads - 1) / (target * threads) * threads;
  const int64_t block = (T + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor V = input_scratch(block, C, x.options()), M = at::empty({16, block, K}, x.options());
    std::vector<float> scratch(K);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * block, cnt = std::min(block, T - t0);
      input_tiles(p, t0, cnt, V.mutable_data_ptr<float>(), V.stride(0));
      if (ours) {
        for (int64_t xi = 0; xi < 16; ++xi)
          gemm_rows(V.const_data_ptr<float>() + xi * V.stride(0), C, u + xi * C * K, K,
                    M.mutable_data_ptr<float>() + xi * block * K, K, cnt, C, K, zp, wide);
      } else {
        at::Tensor Mv = M.narrow(1, 0, cnt);
        at::bmm_out(Mv, V.narrow(1, 0, cnt), U);  // single-threaded inside a parallel region
      }
      output_tiles(p, t0, cnt, M.const_data_ptr<float>(), block * K, scratch.data());
    }
  });
  return y;
}

// conv3x3_bias_act_: the same, written into the residual.
void winograd_conv3x3_(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight_winograd,
                       const at::Tensor& bias, bool relu, bool tiles) {
  TORCH_CHECK(residual.is_contiguous(at::MemoryFormat::ChannelsLast),
              "conv3x3_bias_act_: expected a channels_last contiguous residual (it is written in place), got "
              "strides ", residual.strides());
  at::assert_no_overlap(residual, x);
  winograd(x, weight_winograd, bias, residual, relu, tiles, true);
}

}  // namespace

at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight_winograd, const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual, bool relu, bool tiles) {
  return winograd(x, weight_winograd, bias, residual, relu, tiles, false);
}

at::Tensor winograd_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.is_floating_point(),
              "winograd_weight: expected a floating-point (K, C, 3, 3) weight, got ", weight.scalar_type(), " ",
              weight.sizes());
  // U = G g G^T per (k, c) (kG), summed in double and rounded once to float32: inference's cached
  // transform and training's per-call one are the same bits. Written straight into U's (16, C, K)
  // layout, with no intermediate tensors (training transforms 256 x 256 weights at every call; a
  // matmul in double took 20 MB more).
  const int64_t K = weight.size(0), C = weight.size(1);
  at::Tensor U = at::empty({16, C, K}, weight.options().dtype(at::kFloat));
  float* u = U.mutable_data_ptr<float>();
  const int64_t sK = weight.stride(0), sC = weight.stride(1), sR = weight.stride(2), sS = weight.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "winograd_weight", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* g = w + k * sK + c * sC;
          double t[4][3];  // G g
          for (int i = 0; i < 4; ++i)
            for (int s = 0; s < 3; ++s) {
              double v = 0;
              for (int r = 0; r < 3; ++r) v += kG[i][r] * static_cast<double>(g[r * sR + s * sS]);
              t[i][s] = v;
            }
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) {
              double v = 0;
              for (int s = 0; s < 3; ++s) v += t[i][s] * kG[j][s];
              u[((4 * i + j) * C + c) * K + k] = static_cast<float>(v);
            }
        }
    });
  });
  return U;
}

// -- the weight gradient -----------------------------------------------------------------------
// dW = G^T [ sum over tiles t of (A dY_t A^T) . (B^T d_t B) ] G, the forward's Y = A^T [U . V] A
// differentiated through U = G g G^T: per block of tiles, the input transform V (input_tile, as
// the forward's) and the output gradient's Ud (grad_tile), then for each of the 16 positions xi
// M[xi] (K x C) += Ud[xi]^T V[xi] (weight_grad_products: 16 multiplies per tile and channel pair
// where the direct weight gradient does 36), and at the end the 3x3 taps G^T M G per (k, c), in
// float64, rounded once.
//
// Work items are (image, band of tile rows); each thread sums its items into its own M (16 x K x C
// floats), the threads' M are added at the end. With a BatchNorm prologue, x is that BatchNorm's
// input: a band's input rows (its 2 halo rows included) go through the BatchNorm's own apply loop
// (ReluAffineRows, bit for bit the forward's) into a per-thread buffer that the input transform reads.

namespace {

struct GradPlan {
  int64_t C, H, W, K, TW;
  int64_t band;  // tile rows per work item
  const float* x;
  const float* dy;
  const float* zeros;  // max(C, K) zeros
  const ReluAffineRows* prologue;
};

// Tile rows [ty0, ty1) of image n into thread-local M (16 x K x C), through V and Ud (16 planes of
// the band's tiles x C, resp. K, floats, as the forward's V) and, with a prologue, buf (the band's
// input rows). (Tile-major V and Ud, a tile's 16 rows one after another, ran the 16-channel
// (128, 16, 32, 32) in 0.78x the time but the 32- to 256-channel shapes in 1.11-1.39x.)
void weight_grad_band(const GradPlan& p, int64_t n, int64_t ty0, int64_t ty1, float* M, float* V, float* Ud,
                      float* buf) {
  const int64_t C = p.C, K = p.K, W = p.W;
  const int64_t row0 = std::max<int64_t>(0, 2 * ty0 - 1), row1 = std::min<int64_t>(p.H, 2 * ty1 + 1);
  const float* rows = p.x + (n * p.H + row0) * W * C;  // input row row0's first pixel
  if (p.prologue != nullptr) {
    (*p.prologue)(rows, buf, (row1 - row0) * W);
    rows = buf;
  }
  const int64_t cnt = (ty1 - ty0) * p.TW;
  // V's and Ud's planes a band's tiles apart (plus one: see input_scratch), a tile's row within one.
  const int64_t vp = (p.band * p.TW + 1) * C, up = (p.band * p.TW + 1) * K;
  for (int64_t q = 0; q < cnt; ++q) {
    const int64_t ty = ty0 + q / p.TW, tx = q % p.TW;
    const float* px[4][4];
    tile_pixels(rows, row0, p.H, W, C, ty, tx, p.zeros, px);
    RF_ISA(input_tile)(px, V + q * C, vp, C);
    const float* g[2][2];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b) {
        const int64_t h = 2 * ty + a, w = 2 * tx + b;
        g[a][b] = (h < p.H && w < W) ? p.dy + ((n * p.H + h) * W + w) * K : p.zeros;
      }
    RF_ISA(grad_tile)(g, Ud + q * K, up, K);
  }
#ifdef RESNET_FAST_AVX2
  for (int64_t xi = 0; xi < 16; ++xi)
    cpu_avx512::weight_grad_products(Ud + xi * up, K, V + xi * vp, C, cnt, M + xi * K * C, C, K, C);
#endif
}

bool winograd_weight_grad_can_run(int64_t C, int64_t K) { return use_avx512() && C % 16 == 0 && K % 16 == 0; }

}  // namespace

at::Tensor winograd_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const ReluAffineRows* prologue) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = grad_out.size(1);
  TORCH_CHECK(winograd_weight_grad_can_run(C, K) && x.scalar_type() == at::kFloat &&
                  grad_out.scalar_type() == at::kFloat,
              "conv3x3_weight_grad: the Winograd weight gradient takes float32 with input and output channels "
              "multiples of 16 on a CPU with AVX-512, got ", x.scalar_type(), " with ", C, " and ", K,
              " (pass winograd=False)");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({N, K, H, W}),
              "conv3x3_weight_grad: the Winograd weight gradient is stride 1's: expected grad_out of shape (", N,
              ", ", K, ", ", H, ", ", W, "), got ", grad_out.sizes());
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty({K, C, 3, 3}, x.options().memory_format(cl));
  if (N == 0 || H == 0 || W == 0) return out.zero_();
  const at::Tensor xc = x.contiguous(cl), gc = grad_out.contiguous(cl);
  const at::Tensor zeros = at::zeros({std::max(C, K)}, x.options());
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2;
  // A band's V and Ud (16 x tiles x (C + K) floats) about 512 KB: in L2 while the products sweep them.
  const int64_t target = std::max<int64_t>(1, 8192 / (C + K));
  const int64_t band = std::clamp<int64_t>(target / TW, 1, TH);
  const GradPlan p{C, H, W, K, TW, band, xc.const_data_ptr<float>(), gc.const_data_ptr<float>(),
                   zeros.const_data_ptr<float>(), prologue};
  const int64_t bands = (TH + band - 1) / band, threads = at::get_num_threads(), size = 16 * K * C;
  std::vector<float> acc(size_t(threads) * size, 0.f);
  at::parallel_for(0, N * bands, 1, [&](int64_t i0, int64_t i1) {
    const int64_t tiles = band * TW;
    std::vector<float> V(size_t(tiles + 1) * 16 * C), Ud(size_t(tiles + 1) * 16 * K);
    std::vector<float> buf(prologue == nullptr ? 0 : size_t(2 * band + 2) * W * C);
    float* M = acc.data() + size_t(at::get_thread_num()) * size;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / bands, ty0 = i % bands * band;
      weight_grad_band(p, n, ty0, std::min(TH, ty0 + band), M, V.data(), Ud.data(), buf.data());
    }
  });
  // dW[k, c, r, s] = sum over i, j of G[i][r] M[4i + j][k][c] G[j][s], in channels_last order.
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t c = 0; c < C; ++c) {
        double m[16];
        for (int xi = 0; xi < 16; ++xi) {
          double s = 0;
          for (int64_t t = 0; t < threads; ++t) s += acc[size_t(t) * size + (xi * K + k) * C + c];
          m[xi] = s;
        }
        for (int r = 0; r < 3; ++r)
          for (int s = 0; s < 3; ++s) {
            double v = 0;
            for (int i = 0; i < 4; ++i)
              for (int j = 0; j < 4; ++j) v += kG[i][r] * m[4 * i + j] * kG[j][s];
            o[(k * 9 + r * 3 + s) * C + c] = static_cast<float>(v);
          }
      }
  });
  return out;
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv3x3_bias_act", &winograd_conv3x3);
  m.impl("conv3x3_bias_act_", &winograd_conv3x3_);
  m.impl("winograd_weight", &winograd_weight);
}

}  // namespace resnet_fast
