#pragma once
// conv_gemm.cpp's op, and its register tiles as a plain row-major matrix product, for the other
// kernels that need one inside their own loops (Winograd's 16 products, winograd.cpp).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace resnet_fast {

// Output channels per panel of a weight packed for conv_bias_act (resnet_fast.ops.pack_conv_weight:
// (ceil(K / 16), R*R*C, 16)).
constexpr int64_t GEMM_PANEL = 16;

// The op conv_bias_act (conv_gemm.cpp), for the ops built on it (pool_linear.cpp).
at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, bool relu, int64_t kernel, int64_t stride,
                         int64_t padding, bool wide);
// The same with the depth's slices at most kc channels deep (conv_bias_act: 256): each slice's
// sums start from zero, so the rounding error grows with kc, not with the whole depth.
at::Tensor conv_bias_act_sliced(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& bias,
                                const std::optional<at::Tensor>& residual, bool relu, int64_t kernel, int64_t stride,
                                int64_t padding, bool wide, int64_t kc);

// c[m][k] = sum_d a[m][d] * b[d][k] for m < rows, k < K, d < depth: row-major, rows lda, ldb and
// ldc floats apart, on the calling thread (the caller parallelises). K must be a multiple of 16
// (the tiles read 16 columns at a time); zeros: K zeros (the tiles' bias). wide: the AVX-512 tiles
// (6 x 64), only where the CPU has AVX-512F; else AVX2's (6 x 16) or the generic ones.
void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
               int64_t depth, int64_t K, const float* zeros, bool wide);

}  // namespace resnet_fast
