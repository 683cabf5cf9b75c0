// CPU implementation of batch_norm_act and its backward (formula: common/batch_norm_act.h).
// Training runs two passes over memory forward (statistics, then normalise + residual + ReLU)
// and two backward (per-channel sums, then dx); channels_last and NCHW each get their loops.
// The kernels are compiled twice, for AVX2+FMA and for the baseline ISA, and chosen at run time.
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
#include "cpu/isa.h"

namespace resnet_fast {

// A residual read in place: r(n, c, h, w) = c < C ? data[n*sN + c*sC + h*s*sH + w*s*sW] : 0,
// which covers the identity, a projection's output and the option-A zero-padding shortcut.
template <typename scalar_t>
struct ResidualView {
  const scalar_t* data = nullptr;
  int64_t C = 0, sN = 0, sC = 0, sH = 0, sW = 0, stride = 1;
};

#define RF_KERNELS "cpu/batch_norm_act_kernels.inc"
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& input, const std::optional<at::Tensor>& output,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool relu,
    bool residual_grad, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 4 && grad_y.sizes() == input.sizes(), "batch_norm_act_backward: expected grad_y of shape ",
              input.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(!relu || (output.has_value() && output->sizes() == input.sizes()) ||
                  (bias.has_value() && bias->numel() == input.size(1)),
              "batch_norm_act_backward: with relu=True the forward output is needed, of shape ", input.sizes(),
              " (or the bias, of ", input.size(1), " elements, to recompute the ReLU mask from x)");
  // Without the output, the mask is recomputed from x: (x * scale + shift > 0) with the forward's
  // scale and shift, the forward's own pre-activation bit for bit.
  const bool mask_from_input = relu && !(output.has_value() && output->sizes() == input.sizes());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK(weight.numel() == C && mean.numel() == C && var.numel() == C,
              "batch_norm_act_backward: expected weight, mean and var of ", C, " elements");
  TORCH_CHECK(grad_y.scalar_type() == input.scalar_type(), "batch_norm_act_backward: grad_y has dtype ",
              grad_y.scalar_type(), ", the input ", input.scalar_type());
  const auto fmt = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(fmt), dy = grad_y.contiguous(fmt);
  const at::Tensor y = relu && !mask_from_input ? output->contiguous(fmt) : at::Tensor();
  at::Tensor dz = residual_grad ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto acc = acc_dtype(x);
  at::Tensor grad_weight = at::zeros({C}, weight.options().dtype(acc));
  at::Tensor grad_bias = at::zeros({C}, weight.options().dtype(acc));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "batch_norm_act_backward_cpu", [&] {
      using acc_t = acc_type<scalar_t>;
      const at::Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous(), w = weight.to(acc).contiguous();
      const acc_t* mp = m.const_data_ptr<acc_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
      std::vector<acc_t> fscale, fshift;  // the forward's, for a mask recomputed from x
      if (mask_from_input) forward_scale_shift(weight, *bias, mp, v.const_data_ptr<acc_t>(), eps, fscale, fshift);
      const acc_t *fs = fscale.data(), *fh = fshift.data();
      const int mode = !relu ? cpu_generic::kNoRelu : mask_from_input ? cpu_generic::kMaskInput : cpu_generic::kMaskOutput;
      scalar_t* dzp = residual_grad ? dz.mutable_data_ptr<scalar_t>() : nullptr;
      std::vector<double> sum_dz(C), sum_dzxmu(C);
      const bool cl = is_channels_last(fmt);
      const int64_t M = N * H * W;
      double* sdz = sum_dz.data();
      double* sdx = sum_dzxmu.data();
      with_mask(mode, [&](auto kMask) {
        if (cl)
          RF_ISA(grad_sums_channels_last<kMask, scalar_t, acc_t>)(dyp, yp, xp, mp, fs, fh, M, C, dzp, sdz, sdx);
        else
          RF_ISA(grad_sums_nchw<kMask, scalar_t, acc_t>)(dyp, yp, xp, mp, fs, fh, N, C, H * W, dzp, sdz, sdx);
      });
      std::vector<acc_t> mean_dz(C, acc_t(0)), k(C, acc_t(0)), scale(C);
      acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
      acc_t* gb = grad_bias.mutable_data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        const double invstd = 1.0 / std::sqrt(static_cast<double>(v.const_data_ptr<acc_t>()[c]) + eps);
        scale[c] = static_cast<acc_t>(invstd * w.const_data_ptr<acc_t>()[c]);
        if (training) {
          mean_dz[c] = static_cast<acc_t>(sum_dz[c] / static_cast<double>(M));
          k[c] = static_cast<acc_t>(sum_dzxmu[c] / static_cast<double>(M) * invstd * invstd);
        }
        gw[c] = static_cast<acc_t>(sum_dzxmu[c] * invstd);
        gb[c] = static_cast<acc_t>(sum_dz[c]);
      }
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      // With dz written by pass 1, pass 2 reads it in place of dy and the mask.
      const scalar_t* g = dzp != nullptr ? dzp : dyp;
      const acc_t *md = mean_dz.data(), *kk = k.data(), *sc = scale.data();
      with_mask(dzp != nullptr ? cpu_generic::kNoRelu : mode, [&](auto kMask) {
        if (cl)
          RF_ISA(grad_input_channels_last<kMask, scalar_t, acc_t>)(g, yp, xp, mp, md, kk, sc, fs, fh, M, C, dxp);
        else
          RF_ISA(grad_input_nchw<kMask, scalar_t, acc_t>)(g, yp, xp, mp, md, kk, sc, fs, fh, N, C, H * W, dxp);
      });
    });
  }
  return {dx, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type()), dz};
}

// The inference epilogue y = act(x + bias + r): the apply loops with a scale of 1.
at::Tensor bias_act_cpu(const at::Tensor& input, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                        int64_t residual_stride, bool relu) {
  check_bias_act_args(input, bias, residual, residual_stride);
  const auto fmt = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(fmt);
  const int64_t C = x.size(1);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor b = bias.to(acc_dtype(x)).contiguous();
    const std::vector<acc_t> ones(C, acc_t(1));
    run_apply<scalar_t>(x, y, is_channels_last(fmt), ones.data(), b.const_data_ptr<acc_t>(), residual, residual_stride, relu);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("batch_norm_act", &batch_norm_act_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("bias_act", &bias_act_cpu);
}

}  // namespace resnet_fast
