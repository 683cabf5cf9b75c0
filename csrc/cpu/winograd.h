#pragma once
// Winograd F(2x2, 3x3) for 3x3, stride-1, padding-1 convolutions on CPU float32 tensors (see
// winograd.cpp): the inference op conv3x3_bias_act, and training's conv3x3_train forward and
// input gradient.
#include <ATen/core/Tensor.h>

#include <optional>

namespace resnet_fast {

// relu(conv3x3(x, weight) + bias + residual) from the transformed weight (16, C, K); channels_last output.
// tiles: the 16 products by our register tiles (conv_gemm.cpp), else by at::bmm.
at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight_winograd, const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual, bool relu, bool tiles);

// U[4i + j, c, k] = (G weight[k, c] G^T)[i, j] for a (K, C, 3, 3) weight: float32, computed in
// float64 and rounded once (the op resnet_fast::winograd_weight; inference caches it).
at::Tensor winograd_weight(const at::Tensor& weight);

class ReluAffineRows;

// The weight gradient dW (K, C, 3, 3, channels_last) of the stride-1 convolution by Winograd
// F(2x2, 3x3) (16 multiplies per 2x2 outputs and channel pair, against the direct one's 36), from
// grad_out (N, K, H, W) and x (N, C, H, W), or x = relu(x * scale + shift) recomputed from the
// BatchNorm's input by `prologue`; on AVX-512 CPUs, C and K multiples of 16 (else a clear error).
at::Tensor winograd_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const ReluAffineRows* prologue);

}  // namespace resnet_fast
