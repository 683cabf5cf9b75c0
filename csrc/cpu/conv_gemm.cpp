// Convolutions as one matrix product (an implicit GEMM, no im2col buffer), with a bias, an
// optional residual and ReLU as their epilogue: the inference op conv_bias_act (formula:
// resnet_fast.ops.reference.conv_bias_act), square kernels of any size, stride and zero padding,
// with the BatchNorm-folded weight packed once by resnet_fast.ops.pack_conv_weight and cached.
// Where it runs is decided by the caller (resnet_fast._routing.conv_bn_inference_plan): the 1x1
// convolutions on AVX2 CPUs, those of small maps on AVX-512 ones (GEMM_AVX512_MAX_PIXELS). (Its 3x3s, tested here, are not routed: see _routing.GEMM_APPLIES.
// They are where the training fusion of issue 18 can put a BatchNorm's statistics in the epilogue
// and the previous one's scale, shift and ReLU in the row loads.)
//
// On a channels_last input a convolution is a matrix product: output pixel p's row of the left
// operand is, for each tap (i, j) of the kernel, the C channels of the input pixel that tap reads
// (contiguous; a row of zeros where the tap falls in the padding), and the right operand is the
// (R*S*C x K) weight. The weight comes packed in panels of 16 output channels,
// (ceil(K / 16), R*S*C, 16), zero-padded, so that a register tile (6 pixels x 16 channels,
// conv_gemm_kernels.inc) reads one panel row of 64 bytes per input channel. The tile runs over a
// slice of one tap's channels with its accumulators in registers; after the last slice it adds the
// bias and the residual, applies ReLU and stores: the output is written once, the epilogue costs
// no pass over memory.
//
// Blocking (as in BLIS and MLAS): threads take (pixel block, panel group) items; a map too small
// for a block per thread (layer4 at batch 1: 49 pixels) is split between threads by panel groups.
// Within an item the (tap, channel) depth goes in slices of one tap's channels, at most KC: each
// panel's slice (16 KB) stays in L1 while it runs down the block's tiles, whose input rows of the
// slice (192 KB) stay in L2, and a tile's partial sums wait in y between slices. Inside ResNet-50
// at batch 1 on the Zen 3 (2 cores, interleaved) this order took 0.77-0.91x the time of the other
// (each tile meeting the group's panels in turn) on 11 of its 16 1x1 shapes, 0.95-0.98x on 2,
// 1.06-1.32x on 3; without slices, layer4's 4 MB weights went through L2 once per tile.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#ifdef __x86_64__
#include <immintrin.h>
#endif

#include "cpu/conv_gemm.h"
#include "cpu/isa.h"

namespace resnet_fast {

// Pixels per register tile: AVX2's 16 registers hold 6 x 2 accumulators, the panel row's two
// vectors and one broadcast input value.
constexpr int MAX_ROWS = 6;

#define RF_KERNELS "cpu/conv_gemm_kernels.inc"
#define RF_KERNELS_AVX512
#include "cpu/isa_kernels.h"

namespace {

constexpr int PANEL = GEMM_PANEL;              // output channels per packed panel
constexpr int64_t WIDE_PANELS = 4;             // panels of an AVX-512 tile
constexpr int64_t KC = 256;                    // input channels per slice: a panel's slice (16 KB) stays in L1
constexpr int64_t BLOCK_BYTES = 192 * 1024;    // a pixel block's input rows of one slice, to stay in L2
constexpr int64_t MAX_BLOCK = 40 * MAX_ROWS;   // pixels per block at most
constexpr int64_t MAX_TAPS = 16;               // taps of a slice at most
// gemm_rows' depth per slice. Winograd's products in float32 sum C terms whose rounding the output
// transform amplifies: with one 256-deep slice their error against float64 was 2.0-2.5x the direct
// convolution's at 256-512 channels (MKL's sgemm: 1.5x); with slices of 64 (blocked sums) 0.99-1.17x
// (Zen 4, 2026-12-03; tests/ops/test_conv3x3_bias_act.py holds it within 1.5x).
constexpr int64_t ROWS_KC = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The op, its output either fresh or (into_residual) the residual's own storage: each output is
// then written where its residual was read, by the same tile, after reading it.
at::Tensor conv_gemm(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& bias,
                     const std::optional<at::Tensor>& residual, bool relu, int64_t kernel, int64_t stride,
                     int64_t padding, bool wide, int64_t kc, bool into_residual) {
  TORCH_INTERNAL_ASSERT(kc >= 1);
  TORCH_CHECK(x.dim() == 4, "conv_bias_act: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight_packed.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "conv_bias_act: expected float32 tensors, got x ", x.scalar_type(), ", weight ",
              weight_packed.scalar_type(), ", bias ", bias.scalar_type());
  TORCH_CHECK(kernel >= 1 && stride >= 1 && padding >= 0 && padding < kernel,
              "conv_bias_act: expected a kernel size and a stride of 1 or more and a padding in [0, kernel), got "
              "kernel ", kernel, ", stride ", stride, ", padding ", padding);
  TORCH_CHECK(bias.dim() == 1, "conv_bias_act: expected a 1-D bias (K,), got ", bias.sizes());
  TORCH_CHECK(!wide || use_avx512(), "conv_bias_act: wide (AVX-512) tiles were asked for on a CPU without AVX-512F");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = bias.size(0);
  const int64_t panels = ceil_div(K, PANEL), taps = kernel * kernel;
  TORCH_CHECK(weight_packed.dim() == 3 && weight_packed.size(0) == panels && weight_packed.size(1) == taps * C &&
                  weight_packed.size(2) == PANEL,
              "conv_bias_act: expected a packed weight of shape (", panels, ", ", taps * C, ", ", PANEL,
              ") (pack_conv_weight of a (", K, ", ", C, ", ", kernel, ", ", kernel, ") weight), got ",
              weight_packed.sizes());
  TORCH_CHECK(taps == 1 || K % PANEL == 0, "conv_bias_act: a ", kernel, "x", kernel,
              " kernel needs a multiple of ", PANEL, " output channels, got ", K);
  const int64_t OH = (H + 2 * padding - kernel) / stride + 1, OW = (W + 2 * padding - kernel) / stride + 1;
  TORCH_CHECK(H + 2 * padding >= kernel && W + 2 * padding >= kernel, "conv_bias_act: the ", H, "x", W,
              " input with padding ", padding, " is smaller than the ", kernel, "x", kernel, " kernel");
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({N, K, OH, OW}) && residual->scalar_type() == at::kFloat,
                "conv_bias_act: expected a float32 residual of shape (", N, ", ", K, ", ", OH, ", ", OW,
                "), got ", residual->scalar_type(), " ", residual->sizes());
    res = residual->contiguous(cl);
  }
  at::Tensor y = into_residual ? res : at::empty({N, K, OH, OW}, x.options().memory_format(cl));
  const int64_t P = N * OH * OW;
  if (P == 0 || K == 0) return y;
  const at::Tensor xc = x.contiguous(cl), B = weight_packed.contiguous(), b = bias.contiguous();
  at::Tensor zeros;  // the padding's pixel
  if (padding > 0) zeros = at::zeros({C}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const float* zp = zeros.defined() ? zeros.const_data_ptr<float>() : nullptr;
  const float* wp = B.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  const float* rp = res.defined() ? res.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();

  // The (tap, channel) depth in slices of about KC: several whole taps where C is small, else each
  // tap's channels in parts; partial sums go through y between slices. Where the last panel is
  // partial there is one slice (1x1 only: no residual model has such K).
  const bool sliced = K % PANEL == 0;
  const int64_t per_tap = sliced ? ceil_div(C, kc) : 1;                      // slices of one tap
  const int64_t depth = std::max<int64_t>(ceil_div(C, per_tap), 1);          // channels of a segment
  const int64_t seg_taps =  // taps of a slice
      per_tap == 1 && sliced ? std::clamp<int64_t>(kc / depth, 1, std::min<int64_t>(MAX_TAPS, taps)) : 1;
  const int64_t slice = depth * seg_taps;
  // Pixel blocks of equal size (a multiple of the tile's rows), as few as L2 allows.
  const int64_t max_block = std::clamp<int64_t>(BLOCK_BYTES / (4 * slice) / MAX_ROWS * MAX_ROWS, MAX_ROWS, MAX_BLOCK);
  const int64_t blocks = ceil_div(P, max_block);
  const int64_t block = ceil_div(ceil_div(P, blocks), MAX_ROWS) * MAX_ROWS;
  // Enough items for every thread: a few blocks each, else the panels split into groups.
  // A tile spans `step` panels: 4 with AVX-512 (6 x 64 channels), else 1 (6 x 16).
  const int64_t step = wide ? WIDE_PANELS : 1, units = ceil_div(panels, step);
  const int64_t threads = at::get_num_threads();
  int64_t groups = std::clamp<int64_t>(ceil_div(4 * threads, blocks), 1, units);
  while (groups < units && (blocks * groups) % threads != 0) ++groups;  // no thread idle at the end
  const auto row = [&](int64_t p, int64_t tap) {  // the input row that output pixel p's tap reads
    const int64_t n = p / (OH * OW), ih = (p / OW) % OH * stride - padding + tap / kernel,
                  iw = p % OW * stride - padding + tap % kernel;
    return ih >= 0 && ih < H && iw >= 0 && iw < W ? xp + ((n * H + ih) * W + iw) * C : zp;
  };
  const int64_t tile_ptrs = seg_taps * MAX_ROWS;  // a tile's row pointers: segment-major
  at::parallel_for(0, blocks * groups, 1, [&](int64_t i0, int64_t i1) {
    // The row pointers of a block's tiles for one slice, found once and read by every panel.
    std::vector<const float*> a(ceil_div(block, MAX_ROWS) * tile_ptrs);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t blk = item / groups, grp = item % groups;
      const int64_t m0 = blk * block, m1 = std::min(P, m0 + block);
      const int64_t j0 = grp * units / groups * step, j1 = std::min(panels, (grp + 1) * units / groups * step);
      for (int64_t tap = 0; tap < taps; tap += seg_taps)
        for (int64_t c0 = 0; c0 < C || c0 == 0; c0 += depth) {
          const int segs = static_cast<int>(std::min(seg_taps, taps - tap));
          const int64_t d = std::min(depth, C - c0);
          const bool first = tap == 0 && c0 == 0, last = tap + segs == taps && c0 + depth >= C;
          for (int64_t m = m0; m < m1; ++m)
            for (int sg = 0; sg < segs; ++sg)
              a[(m - m0) / MAX_ROWS * tile_ptrs + sg * MAX_ROWS + (m - m0) % MAX_ROWS] = row(m, tap + sg) + c0;
          for (int64_t j = j0; j < j1; j += step) {
            const int np = static_cast<int>(std::min(step, j1 - j));
            const int n = static_cast<int>(std::min<int64_t>(PANEL, K - (j + np - 1) * PANEL));  // in the last panel
            const float* panel = wp + (j * taps * C + tap * C + c0) * PANEL;
            for (int64_t m = m0; m < m1; m += MAX_ROWS) {
              const int rows = static_cast<int>(std::min<int64_t>(MAX_ROWS, m1 - m));
              const float* r[MAX_ROWS];
              float* o[MAX_ROWS];
              for (int i = 0; i < rows; ++i) {
                r[i] = rp ? rp + (m + i) * K + j * PANEL : nullptr;
                o[i] = yp + (m + i) * K + j * PANEL;
              }
              const float* const* ap = a.data() + (m - m0) / MAX_ROWS * tile_ptrs;
#ifdef RESNET_FAST_AVX2
              if (wide) {
                cpu_avx512::any_tile_wide(rows, np, ap, segs, panel, taps * C * PANEL, PANEL, d, bp + j * PANEL,
                                          rp ? r : nullptr, o, n, relu, first, last);
                continue;
              }
#endif
              RF_ISA(any_tile)(rows, ap, segs, panel, PANEL, d, bp + j * PANEL, rp ? r : nullptr, o, n, relu, first,
                               last);
            }
          }
        }
    }
  });
  return y;
}

// conv_bias_act_: the same, written into the residual. Only where the depth is one slice
// (kernel^2 * C <= KC): with more, a slice's partial sums would overwrite the residual before the
// last slice adds it.
void conv_bias_act_(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight_packed,
                    const at::Tensor& bias, bool relu, int64_t kernel, int64_t stride, int64_t padding, bool wide) {
  TORCH_CHECK(x.dim() == 4 && kernel * kernel * x.size(1) <= KC, "conv_bias_act_: writes into its residual only "
              "where kernel^2 * C <= ", KC, " (one slice of the depth), got kernel ", kernel, " and ",
              x.dim() == 4 ? x.size(1) : -1, " input channels: use conv_bias_act");
  TORCH_CHECK(residual.is_contiguous(at::MemoryFormat::ChannelsLast),
              "conv_bias_act_: expected a channels_last contiguous residual (it is written in place), got strides ",
              residual.strides());
  at::assert_no_overlap(residual, x);
  conv_gemm(x, weight_packed, bias, residual, relu, kernel, stride, padding, wide, KC, true);
}

}  // namespace

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, bool relu, int64_t kernel, int64_t stride,
                         int64_t padding, bool wide) {
  return conv_gemm(x, weight_packed, bias, residual, relu, kernel, stride, padding, wide, KC, false);
}

at::Tensor conv_bias_act_sliced(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& bias,
                                const std::optional<at::Tensor>& residual, bool relu, int64_t kernel, int64_t stride,
                                int64_t padding, bool wide, int64_t kc) {
  return conv_gemm(x, weight_packed, bias, residual, relu, kernel, stride, padding, wide, kc, false);
}

void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
               int64_t depth, int64_t K, const float* zeros, bool wide) {
  TORCH_INTERNAL_ASSERT(K % PANEL == 0 && (!wide || use_avx512()));
  // Depth in slices of ROWS_KC (b's slice of a panel group stays in L1 while it runs down the
  // rows; the sums are blocked by slice), each slice over the panel groups, each group over the
  // rows' tiles; partial sums wait in c.
  const int64_t panels = K / PANEL, step = wide ? WIDE_PANELS : 1;
  for (int64_t d0 = 0; d0 < depth || d0 == 0; d0 += ROWS_KC) {
    const int64_t d = std::min(ROWS_KC, depth - d0);
    const bool first = d0 == 0, last = d0 + ROWS_KC >= depth;
    for (int64_t j = 0; j < panels; j += step) {
      const int np = static_cast<int>(std::min(step, panels - j));
      const float* panel = b + d0 * ldb + j * PANEL;
      for (int64_t m = 0; m < rows; m += MAX_ROWS) {
        const int n = static_cast<int>(std::min<int64_t>(MAX_ROWS, rows - m));
        const float* ap[MAX_ROWS];
        float* o[MAX_ROWS];
        for (int i = 0; i < n; ++i) {
          ap[i] = a + (m + i) * lda + d0;
          o[i] = c + (m + i) * ldc + j * PANEL;
        }
#ifdef RESNET_FAST_AVX2
        if (wide) {
          cpu_avx512::any_tile_wide(n, np, ap, 1, panel, PANEL, ldb, d, zeros, nullptr, o, PANEL, false, first, last);
          continue;
        }
#endif
        RF_ISA(any_tile)(n, ap, 1, panel, ldb, d, zeros, nullptr, o, PANEL, false, first, last);
      }
    }
  }
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("conv_bias_act", &conv_bias_act);
  m.impl("conv_bias_act_", &conv_bias_act_);
}

}  // namespace resnet_fast
