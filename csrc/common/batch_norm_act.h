#pragma once
// BatchNorm (+ residual add) (+ ReLU), per element, shared by the CPU and CUDA kernels.
//
// Forward, with per-channel scale = weight * invstd and shift = bias - mean * scale:
//   y = act(x * scale + shift + r),   act = ReLU or identity,  r = residual or 0
// Backward, with dz = dL/d(pre-activation) and xmu = x - mean:
//   dz       = dy * (y > 0)                       (dy without ReLU)
//   training: dx = (dz - sum(dz) / M - xmu * invstd^2 * sum(dz * xmu) / M) * invstd * weight
//   eval:     dx = dz * invstd * weight
//   dweight  = sum(dz * xmu) * invstd,  dbias = sum(dz),  dresidual = dz
// where the sums run over the M = N * H * W values of a channel.
#include "common/macros.h"

namespace resnet_fast {

// ReLU that lets NaN through, like torch.relu (clamp_min).
template <typename T>
RF_HOST_DEVICE T relu_value(T v) {
  return v < T(0) ? T(0) : v;
}

template <typename T>
RF_HOST_DEVICE T bn_act_value(T x, T scale, T shift, T r, bool relu) {
  const T v = x * scale + shift + r;
  return relu ? relu_value(v) : v;
}

// The gradient reaching the pre-activation: ReLU's backward reads its output, as
// torch.threshold_backward does.
template <typename T>
RF_HOST_DEVICE T bn_act_pre_grad(T dy, T y, bool relu) {
  return (!relu || y > T(0)) ? dy : T(0);
}

// dx from dz; eval passes mean_dz = k = 0. scale = invstd * weight, k = invstd^2 * sum(dz * xmu) / M.
template <typename T>
RF_HOST_DEVICE T bn_grad_input(T dz, T xmu, T mean_dz, T k, T scale) {
  return (dz - mean_dz - xmu * k) * scale;
}

// Chan et al.'s merge of two sets' (count, mean, sum of squared deviations): the running set
// (n, mean, m2) absorbs (nb, mb, m2b). Exact in exact arithmetic, and stable: no large sums cancel.
RF_HOST_DEVICE void chan_merge(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb <= 0) return;
  const double total = n + nb;
  const double delta = mb - mean;
  mean += delta * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

// (mean, m2) of a set from sums taken relative to a shift K close to its values:
// s1 = sum(x - K), s2 = sum((x - K)^2) over n values.
RF_HOST_DEVICE void shifted_moments(double n, double K, double s1, double s2, double& mean, double& m2) {
  mean = K + s1 / n;
  const double v = s2 - s1 * s1 / n;
  m2 = v > 0 ? v : 0;
}

}  // namespace resnet_fast
