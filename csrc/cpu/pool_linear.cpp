// The classifier head of inference: global average pooling, then the linear layer, as one op,
// pool_linear (formula: resnet_fast.ops.reference.pool_linear): y[n, k] = bias[k] +
// sum_c weight[k, c] * mean_hw x[n, c, h, w], the weight given packed by
// resnet_fast.ops.pack_conv_weight (as a (K, C, 1, 1) convolution's) and cached by the caller.
// Where it runs is decided by resnet_fast._routing.pool_linear_applies.
//
// Why not PyTorch's two ops: in a ResNet-50 forward at batch 1 on the 2-core Zen 4,
// adaptive_avg_pool2d took 0.13-0.15 ms for its 400 KB (one thread: a batch-1 map is one
// item of its loop) and linear (MKL's sgemv) 0.50-0.59 ms for a weight of 8 MB; here the
// pooling runs on every thread (items of 64 channels of one image) and the product is
// conv_bias_act's GEMM on the pooled rows, its output channels padded to whole panels so that
// its depth can run in slices (slice_depth). In the planned forward at batch 1: ResNet-50's head
// 0.64-0.74 -> 0.28-0.41 ms, ResNet-18's 0.41-0.46 -> 0.15-0.17.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/conv_gemm.h"
#include "cpu/isa.h"

namespace resnet_fast {

#define RF_KERNELS "cpu/pool_linear_kernels.inc"
#include "cpu/isa_kernels.h"

namespace {

constexpr int64_t PANEL = GEMM_PANEL;
constexpr int64_t POOL_CHUNK = 64;   // channels per pooling item
// The product's depth per slice (blocked sums: each slice's sums start from zero, the slices' sums
// are added in turn, so the error grows with about kc + C / kc rather than C). Against float64, as
// a multiple of PyTorch's (pooling + MKL's linear) error, worst of 6 draws on post-ReLU features,
// Zen 4: kc 256 (conv_bias_act's): 0.96x at (N, C, K) (1, 2048, 1000), 1.59x (8, 2048, 1000), 1.69x
// (8, 512, 1000), 2.06x (128, 64, 10); kc 64: 0.51x, 0.95x, 0.70x, 2.06x; kc 32: 0.67x, 1.01x,
// 0.57x, 1.31x; kc 16 at C 64: 1.15x. Inside ResNet-50's planned forward at batch 1 the head took
// 0.28-0.33 ms with kc 256, 0.32 with kc 64, 0.32-0.40 with kc 32 (the weight's stream in shorter runs).
int64_t slice_depth(int64_t C) { return C <= 256 ? 16 : 64; }

at::Tensor pool_linear_cpu(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& bias, bool wide) {
  TORCH_CHECK(x.dim() == 4, "pool_linear: expected a 4-D (N, C, H, W) input, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight_packed.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "pool_linear: expected float32 tensors, got x ", x.scalar_type(), ", weight ",
              weight_packed.scalar_type(), ", bias ", bias.scalar_type());
  TORCH_CHECK(bias.dim() == 1, "pool_linear: expected a 1-D bias (K,), got ", bias.sizes());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), K = bias.size(0);
  const int64_t panels = (K + PANEL - 1) / PANEL;
  TORCH_CHECK(weight_packed.dim() == 3 && weight_packed.size(0) == panels && weight_packed.size(1) == C &&
                  weight_packed.size(2) == PANEL,
              "pool_linear: expected a packed weight of shape (", panels, ", ", C, ", ", PANEL,
              ") (pack_conv_weight of a (", K, ", ", C, ", 1, 1) weight), got ", weight_packed.sizes());
  TORCH_CHECK(HW > 0 || N == 0, "pool_linear: cannot average over an empty ", x.size(2), "x", x.size(3), " map");
  at::Tensor pooled = at::empty({N, C, 1, 1}, x.options());
  if (N > 0 && C > 0) {
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    const float* xp = xc.const_data_ptr<float>();
    float* pp = pooled.mutable_data_ptr<float>();
    const int64_t chunks = (C + POOL_CHUNK - 1) / POOL_CHUNK;
    at::parallel_for(0, N * chunks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / chunks, c0 = i % chunks * POOL_CHUNK, c1 = std::min(C, c0 + POOL_CHUNK);
        // Blocks of 8 rows in float32, their sums in float64 (the logits follow the pooled values'
        // error: at 8x8 maps, one float32 sum per channel was 2.2x ATen's error against float64,
        // these 0.56-0.79x).
        RF_ISA(mean_rows)(xp + n * HW * C, HW, C, c0, c1, pp + n * C + c0);
      }
    });
  }
  // The output channels padded to whole panels (zero weight and bias beyond K), so that the GEMM
  // slices its depth; the padding is cut off after.
  at::Tensor b = bias.contiguous();
  if (K % PANEL != 0) {
    b = at::zeros({panels * PANEL}, bias.options());
    b.narrow(0, 0, K).copy_(bias);
  }
  const at::Tensor y = conv_bias_act_sliced(pooled, weight_packed, b, std::nullopt, false, 1, 1, 0, wide, slice_depth(C))
                           .view({N, panels * PANEL});
  return K % PANEL != 0 ? y.narrow(1, 0, K).contiguous() : y;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) { m.impl("pool_linear", &pool_linear_cpu); }

}  // namespace resnet_fast
