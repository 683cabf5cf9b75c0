// CPU implementation of batch_norm_act and its backward (formula: common/batch_norm_act.h), and
// of the running statistics' update. Training runs two passes over memory forward (statistics,
// then normalise + residual + ReLU) and two backward (per-channel sums, then dx); the loops of each
// pass, for channels_last and NCHW, are in cpu/batch_norm_act/<pass>.inc, compiled twice (AVX2+FMA
// and the baseline ISA) and chosen at run time. This file holds one dispatcher per pass and the ops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/batch_norm_act.h"
#include "common/checks.h"
#include "cpu/batch_norm_act.h"
#include "cpu/isa.h"

namespace resnet_fast {

#define RF_KERNELS "cpu/batch_norm_act/kernels.inc"
#include "cpu/isa_kernels.h"

namespace {

// Calls f with the mask mode (kNoRelu / kMaskOutput / kMaskInput) as a compile-time constant.
template <typename F>
void with_mask(int mode, F&& f) {
  if (mode == cpu_generic::kMaskInput)
    f(std::integral_constant<int, cpu_generic::kMaskInput>{});
  else if (mode == cpu_generic::kMaskOutput)
    f(std::integral_constant<int, cpu_generic::kMaskOutput>{});
  else
    f(std::integral_constant<int, cpu_generic::kNoRelu>{});
}

bool is_channels_last(at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::ChannelsLast;
}

// y = act(x * scale + shift + r) over a dense x and y of x's layout: the forward's second pass
// and the inference epilogue (scale 1).
template <typename scalar_t, typename acc_t>
void run_apply(const at::Tensor& x, at::Tensor& y, bool channels_last, const acc_t* scale, const acc_t* shift,
               const std::optional<at::Tensor>& residual, int64_t residual_stride, bool relu) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  ResidualView<scalar_t> r;
  if (residual.has_value()) {
    const at::Tensor& t = *residual;
    r = {t.const_data_ptr<scalar_t>(), t.size(1), t.stride(0), t.stride(1), t.stride(2), t.stride(3), residual_stride};
  }
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  with_flag(relu, [&](auto kRelu) {
    if (channels_last)
      RF_ISA(apply_channels_last<kRelu, scalar_t, acc_t>)(xp, yp, N, C, H, W, scale, shift, r);
    else
      RF_ISA(apply_nchw<kRelu, scalar_t, acc_t>)(xp, yp, N, C, H, W, scale, shift, r);
  });
}

// The forward's per-channel affine: y = act(x * scale + shift + r). The backward recomputes it
// (same function, same acc_t arithmetic) when it derives the ReLU mask from x.
template <typename acc_t>
void forward_scale_shift(const at::Tensor& weight, const at::Tensor& bias, const acc_t* mean, const acc_t* var,
                         double eps, std::vector<acc_t>& scale, std::vector<acc_t>& shift) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const int64_t C = w.numel();
  scale.resize(C);
  shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t invstd = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
    scale[c] = w.const_data_ptr<acc_t>()[c] * invstd;
    shift[c] = b.const_data_ptr<acc_t>()[c] - mean[c] * scale[c];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, int64_t residual_stride, bool training, double eps, bool relu) {
  check_batch_norm_act_args(input, weight, bias, running_mean, running_var, residual, residual_stride, training);
  const auto fmt = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc = acc_dtype(x);
  at::Tensor mean, var;
  if (training) {
    mean = at::zeros({C}, x.options().dtype(acc));
    var = at::zeros({C}, x.options().dtype(acc));
  } else {
    mean = running_mean->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    var = running_var->to(acc, false, true).contiguous();
  }
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return {y, mean, var};

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "batch_norm_act_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    if (training) {
      if (is_channels_last(fmt))
        RF_ISA(stats_channels_last<scalar_t, acc_t>)(xp, N * H * W, C, mp, vp);
      else
        RF_ISA(stats_nchw<scalar_t, acc_t>)(xp, N, C, H * W, mp, vp);
    }
    std::vector<acc_t> scale, shift;
    forward_scale_shift(weight, bias, mp, vp, eps, scale, shift);
    run_apply<scalar_t>(x, y, is_channels_last(fmt), scale.data(), shift.data(), residual, residual_stride, relu);
  });
  return {y, mean, var};
}

// The backward's inputs, dense in x's layout, shared by its two passes: pass 1 (`backward_sums`)
// reads dy and the ReLU mask and sums dz = mask * dy and dz * (x - mean) per channel, writing dz
// when asked; pass 2 (`backward_input`) computes dx from dz (or from dy and the mask again).
struct BackwardArgs {
  at::Tensor x, y;  // y: the forward output, for the mask; undefined when the mask comes from x
  at::Tensor weight, mean, var;
  at::Tensor fscale, fshift;  // the forward's affine in acc_t, for the mask recomputed from x (else undefined)
  double eps = 0;
  int mode = cpu_generic::kNoRelu;  // kNoRelu, kMaskOutput or kMaskInput
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
};

BackwardArgs backward_args(const char* name, const at::Tensor& grad, const at::Tensor& input,
                           const std::optional<at::Tensor>& output, const at::Tensor& weight, const at::Tensor& mean,
                           const at::Tensor& var, double eps, bool relu, const std::optional<at::Tensor>& bias) {
  check_batch_norm_act_backward_args(name, grad, input, output, weight, mean, var, relu, bias, /*mask_from_input=*/true);
  const int64_t C = input.size(1);
  BackwardArgs a;
  a.fmt = input.suggest_memory_format();
  a.x = input.contiguous(a.fmt);
  // Without the output, the mask is recomputed from x: (x * scale + shift > 0) with the forward's
  // scale and shift, the forward's own pre-activation bit for bit.
  const bool mask_from_input = relu && !(output.has_value() && output->sizes() == input.sizes());
  if (relu && !mask_from_input) a.y = output->contiguous(a.fmt);
  a.mode = !relu ? cpu_generic::kNoRelu : mask_from_input ? cpu_generic::kMaskInput : cpu_generic::kMaskOutput;
  const auto acc = acc_dtype(input);
  a.weight = weight.to(acc).contiguous();
  a.mean = mean.to(acc).contiguous();
  a.var = var.to(acc).contiguous();
  a.eps = eps;
  if (mask_from_input) {  // once, for both passes
    a.fscale = at::empty({C}, a.weight.options());
    a.fshift = at::empty({C}, a.weight.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "batch_norm_act_backward", [&] {
      std::vector<scalar_t> scale, shift;
      forward_scale_shift(a.weight, *bias, a.mean.const_data_ptr<scalar_t>(), a.var.const_data_ptr<scalar_t>(), eps,
                          scale, shift);
      std::copy(scale.begin(), scale.end(), a.fscale.mutable_data_ptr<scalar_t>());
      std::copy(shift.begin(), shift.end(), a.fshift.mutable_data_ptr<scalar_t>());
    });
  }
  return a;
}

at::Tensor dense_grad(const at::Tensor& grad, const BackwardArgs& a) { return grad.contiguous(a.fmt); }

// Pass 1: sum_dz[c] = sum(dz), sum_dzxmu[c] = sum(dz * (x - mean)) with dz = mask * dy, written to
// dz when it is defined.
template <typename scalar_t>
void backward_sums(const BackwardArgs& a, const at::Tensor& dy, at::Tensor& dz, double* sum_dz, double* sum_dzxmu) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = a.x.size(0), C = a.x.size(1), HW = a.x.size(2) * a.x.size(3);
  const acc_t* mp = a.mean.const_data_ptr<acc_t>();
  const scalar_t *dyp = dy.const_data_ptr<scalar_t>(), *xp = a.x.const_data_ptr<scalar_t>();
  const scalar_t* yp = a.y.defined() ? a.y.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dzp = dz.defined() ? dz.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* fs = a.fscale.defined() ? a.fscale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* fh = a.fshift.defined() ? a.fshift.const_data_ptr<acc_t>() : nullptr;
  with_mask(a.mode, [&](auto kMask) {
    if (is_channels_last(a.fmt))
      RF_ISA(grad_sums_channels_last<kMask, scalar_t, acc_t>)(dyp, yp, xp, mp, fs, fh, N * HW, C, dzp, sum_dz,
                                                              sum_dzxmu);
    else
      RF_ISA(grad_sums_nchw<kMask, scalar_t, acc_t>)(dyp, yp, xp, mp, fs, fh, N, C, HW, dzp, sum_dz, sum_dzxmu);
  });
}

// Pass 2: dx from g and the sums, where g is dz (`g_is_dz`) or dy with the mask applied again;
// grad_weight and grad_bias (in the accumulation dtype) from the sums.
template <typename scalar_t>
void backward_input(const BackwardArgs& a, const at::Tensor& g, bool g_is_dz, const double* sum_dz,
                    const double* sum_dzxmu, bool training, at::Tensor& dx, at::Tensor& grad_weight,
                    at::Tensor& grad_bias) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = a.x.size(0), C = a.x.size(1), HW = a.x.size(2) * a.x.size(3), M = N * HW;
  const acc_t *mp = a.mean.const_data_ptr<acc_t>(), *vp = a.var.const_data_ptr<acc_t>();
  const acc_t* wp = a.weight.const_data_ptr<acc_t>();
  std::vector<acc_t> mean_dz(C, acc_t(0)), k(C, acc_t(0)), scale(C);
  acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
  acc_t* gb = grad_bias.mutable_data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(vp[c]) + a.eps);
    scale[c] = static_cast<acc_t>(invstd * wp[c]);
    if (training) {
      mean_dz[c] = static_cast<acc_t>(sum_dz[c] / static_cast<double>(M));
      k[c] = static_cast<acc_t>(sum_dzxmu[c] / static_cast<double>(M) * invstd * invstd);
    }
    gw[c] = static_cast<acc_t>(sum_dzxmu[c] * invstd);
    gb[c] = static_cast<acc_t>(sum_dz[c]);
  }
  if (M == 0) return;
  const int mode = g_is_dz ? cpu_generic::kNoRelu : a.mode;
  const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = a.x.const_data_ptr<scalar_t>();
  const scalar_t* yp = a.y.defined() ? a.y.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const acc_t *md = mean_dz.data(), *kk = k.data(), *sc = scale.data();
  const acc_t* fs = a.fscale.defined() ? a.fscale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* fh = a.fshift.defined() ? a.fshift.const_data_ptr<acc_t>() : nullptr;
  with_mask(mode, [&](auto kMask) {
    if (is_channels_last(a.fmt))
      RF_ISA(grad_input_channels_last<kMask, scalar_t, acc_t>)(gp, yp, xp, mp, md, kk, sc, fs, fh, M, C, dxp);
    else
      RF_ISA(grad_input_nchw<kMask, scalar_t, acc_t>)(gp, yp, xp, mp, md, kk, sc, fs, fh, N, C, HW, dxp);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& input, const std::optional<at::Tensor>& output,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool relu,
    bool residual_grad, const std::optional<at::Tensor>& bias) {
  constexpr const char* name = "batch_norm_act_backward";
  const BackwardArgs a = backward_args(name, grad_y, input, output, weight, mean, var, eps, relu, bias);
  const at::Tensor dy = dense_grad(grad_y, a);
  const int64_t C = a.x.size(1);
  const auto options = a.x.options().memory_format(a.fmt);
  at::Tensor dz = residual_grad ? at::empty(a.x.sizes(), options) : at::Tensor();
  at::Tensor dx = at::empty(a.x.sizes(), options);
  at::Tensor grad_weight = at::empty({C}, a.weight.options()), grad_bias = at::empty({C}, a.weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.x.scalar_type(), name, [&] {
    std::vector<double> sum_dz(C), sum_dzxmu(C);
    if (a.x.numel() > 0) backward_sums<scalar_t>(a, dy, dz, sum_dz.data(), sum_dzxmu.data());
    // With dz written by pass 1, pass 2 reads it in place of dy and the mask.
    backward_input<scalar_t>(a, dz.defined() ? dz : dy, dz.defined(), sum_dz.data(), sum_dzxmu.data(), training, dx,
                             grad_weight, grad_bias);
  });
  if (!dz.defined()) dz = at::empty({0}, a.x.options());
  return {dx, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type()), dz};
}

// The same backward as two ops, so that the caller can drop grad_y between the passes (csrc/
// autograd.cpp: the end of a residual block, where dz is the residual's gradient anyway).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_reduce_cpu(
    const at::Tensor& grad_y, const at::Tensor& input, const std::optional<at::Tensor>& output,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
    const std::optional<at::Tensor>& bias) {
  constexpr const char* name = "batch_norm_act_backward_reduce";
  const BackwardArgs a = backward_args(name, grad_y, input, output, weight, mean, var, eps, relu, bias);
  const at::Tensor dy = dense_grad(grad_y, a);
  const int64_t C = a.x.size(1);
  at::Tensor dz = at::empty(a.x.sizes(), a.x.options().memory_format(a.fmt));
  const auto f64 = a.x.options().dtype(at::kDouble);
  at::Tensor sum_dz = at::zeros({C}, f64), sum_dzxmu = at::zeros({C}, f64);
  if (a.x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.x.scalar_type(), name, [&] {
      backward_sums<scalar_t>(a, dy, dz, sum_dz.mutable_data_ptr<double>(), sum_dzxmu.mutable_data_ptr<double>());
    });
  }
  return {dz, sum_dz, sum_dzxmu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_input_cpu(
    const at::Tensor& grad_z, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& sum_dz, const at::Tensor& sum_dzxmu, bool training, double eps) {
  constexpr const char* name = "batch_norm_act_backward_input";
  const BackwardArgs a = backward_args(name, grad_z, input, std::nullopt, weight, mean, var, eps, false, std::nullopt);
  const at::Tensor dz = dense_grad(grad_z, a);
  const int64_t C = a.x.size(1);
  TORCH_CHECK(sum_dz.scalar_type() == at::kDouble && sum_dzxmu.scalar_type() == at::kDouble &&
                  sum_dz.numel() == C && sum_dzxmu.numel() == C,
              name, ": expected sum_dz and sum_dzxmu as float64 tensors of ", C,
              " elements (from batch_norm_act_backward_reduce), got ", sum_dz.scalar_type(), " ", sum_dz.sizes(),
              " and ", sum_dzxmu.scalar_type(), " ", sum_dzxmu.sizes());
  const at::Tensor s1 = sum_dz.contiguous(), s2 = sum_dzxmu.contiguous();
  at::Tensor dx = at::empty(a.x.sizes(), a.x.options().memory_format(a.fmt));
  at::Tensor grad_weight = at::empty({C}, a.weight.options()), grad_bias = at::empty({C}, a.weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.x.scalar_type(), name, [&] {
    backward_input<scalar_t>(a, dz, true, s1.const_data_ptr<double>(), s2.const_data_ptr<double>(), training, dx,
                             grad_weight, grad_bias);
  });
  return {dx, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type())};
}

// The running statistics' update, as ATen's batch_norm computes it: in double, then rounded once
// to the buffers' dtype. One op in place of the seven small ATen ops the formula takes in Python.
void batch_norm_update_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, double momentum, int64_t count) {
  constexpr const char* name = "batch_norm_update_stats_";
  const int64_t C = mean.numel();
  TORCH_CHECK(var.numel() == C && running_mean.numel() == C && running_var.numel() == C, name,
              ": expected running_mean, running_var, mean and var of one size, got ", running_mean.sizes(), ", ",
              running_var.sizes(), ", ", mean.sizes(), " and ", var.sizes());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), name,
              ": expected contiguous running statistics (updated in place)");
  TORCH_CHECK(mean.scalar_type() == var.scalar_type() && running_mean.scalar_type() == running_var.scalar_type(),
              name, ": expected mean and var of one dtype and running statistics of one dtype");
  TORCH_CHECK(count > 0, name, ": expected a positive count of values per channel, got ", count);
  const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), name, [&] {
    using stat_t = scalar_t;
    const stat_t *mp = m.const_data_ptr<stat_t>(), *vp = v.const_data_ptr<stat_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), name, [&] {
      scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
      scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = static_cast<scalar_t>(momentum * static_cast<double>(mp[c]) +
                                      (1 - momentum) * static_cast<double>(rm[c]));
        rv[c] = static_cast<scalar_t>(momentum * static_cast<double>(vp[c]) * unbias +
                                      (1 - momentum) * static_cast<double>(rv[c]));
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, int64_t residual_stride, bool training, double eps, bool relu) {
  return batch_norm_act_cpu(x, weight, bias, running_mean, running_var, residual, residual_stride, training, eps, relu);
}

void channel_affine_act(const at::Tensor& x, at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& residual, int64_t residual_stride, bool relu) {
  TORCH_INTERNAL_ASSERT(y.sizes() == x.sizes() && scale.scalar_type() == acc_dtype(x) &&
                        shift.scalar_type() == acc_dtype(x) && scale.is_contiguous() && shift.is_contiguous());
  if (x.numel() == 0) return;
  const bool cl = is_channels_last(x.suggest_memory_format());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "channel_affine_act", [&] {
    using acc_t = acc_type<scalar_t>;
    run_apply<scalar_t>(x, y, cl, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), residual,
                        residual_stride, relu);
  });
}

std::pair<at::Tensor, at::Tensor> bn_forward_affine(const at::Tensor& weight, const at::Tensor& bias,
                                                    const at::Tensor& mean, const at::Tensor& var, double eps) {
  TORCH_INTERNAL_ASSERT(mean.scalar_type() == at::kFloat && var.scalar_type() == at::kFloat);
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  std::vector<float> scale, shift;
  forward_scale_shift(weight, bias, m.const_data_ptr<float>(), v.const_data_ptr<float>(), eps, scale, shift);
  const auto opts = mean.options().dtype(at::kFloat);
  at::Tensor s = at::empty({int64_t(scale.size())}, opts), h = at::empty({int64_t(shift.size())}, opts);
  std::copy(scale.begin(), scale.end(), s.mutable_data_ptr<float>());
  std::copy(shift.begin(), shift.end(), h.mutable_data_ptr<float>());
  return {s, h};
}

ReluAffineRows::ReluAffineRows(const float* scale, const float* shift, int64_t channels)
    : C_(channels),
      R_(cpu_generic::period_rows(channels)),
      scale_(cpu_generic::replicate(scale, channels, R_)),
      shift_(cpu_generic::replicate(shift, channels, R_)) {}

void ReluAffineRows::operator()(const float* x, float* y, int64_t rows) const {
  // Period by period, as apply_channels_last walks a tensor without a residual.
  for (int64_t m = 0; m < rows; m += R_) {
    const int64_t len = std::min(R_, rows - m) * C_;
    RF_ISA(apply_span<true, float, float>)(x + m * C_, scale_.data(), shift_.data(), nullptr, y + m * C_, len);
  }
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("batch_norm_act", &batch_norm_act_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("batch_norm_act_backward_reduce", &batch_norm_act_backward_reduce_cpu);
  m.impl("batch_norm_act_backward_input", &batch_norm_act_backward_input_cpu);
  m.impl("batch_norm_update_stats_", &batch_norm_update_stats_cpu);
}

}  // namespace resnet_fast
