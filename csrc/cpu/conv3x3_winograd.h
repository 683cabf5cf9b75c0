#pragma once
// Winograd F(2x2, 3x3) for 3x3, stride-1, padding-1 convolutions on CPU float32 tensors (see
// conv3x3_winograd.cpp): the inference op conv3x3_bias_act, and training's conv3x3 forward and
// input gradient.
#include <ATen/core/Tensor.h>

#include <optional>

namespace resnet_fast {

// relu(conv3x3(x, weight) + bias + residual) from the transformed weight (16, C, K); channels_last output.
at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight_winograd, const at::Tensor& bias,
                            const std::optional<at::Tensor>& residual, bool relu);

// U[4i + j, c, k] = (G weight[k, c] G^T)[i, j] for a (K, C, 3, 3) float32 weight, in float32.
at::Tensor winograd_weight(const at::Tensor& weight);

// Whether training's conv3x3 runs this convolution by Winograd: float32, stride 1, 64 or more
// channels in and out, both multiples of 8 (ResNet-50's 3x3s: 1.25-1.7x; with 16 channels oneDNN
// is faster), and C * K at most 256 * 256: training transforms the weight at every call, and at
// 512 x 512 that transform (16 MB, plus 9 MB of reordered taps) raised ResNet-50's peak memory
// above eager's.
bool winograd_applies(const at::Tensor& x, const at::Tensor& weight, int64_t stride);

}  // namespace resnet_fast
