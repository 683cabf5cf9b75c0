// CUDA kernels of batch_norm_act, its backward, and bias_act (formulas: common/batch_norm_act.h,
// shared with the CPU kernels).
//
// Reductions over the M = N*H*W rows of a channel run in two kernels, deterministically: P blocks
// each reduce a range of rows for 32 (channels_last) or 8 (NCHW) channels and write one partial
// per channel, in double; a second kernel merges the P partials of each channel in order. The
// 256 threads of a reduction block are 32 x 8 lanes: in channels_last the 32 fast lanes walk
// channels, in NCHW they walk rows, so that loads coalesce in both layouts. Element-wise passes
// use one thread per element in memory order. Everything runs on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/batch_norm_act.h"
#include "common/checks.h"
#include "common/zero_pad_shortcut.h"
#include "cuda/launch.cuh"

namespace resnet_fast {
namespace {

using cuda::blocks_for;
using cuda::decompose;
using cuda::Index4;
using cuda::kThreads;

constexpr int kFast = 32, kSlow = 8;  // a reduction block is kFast x kSlow threads

// Which lanes of a reduction block walk channels and which walk rows.
template <bool CL>
struct Lanes {
  static constexpr int kChannels = CL ? kFast : kSlow;
  static constexpr int kRows = CL ? kSlow : kFast;
  __device__ static int channel() { return CL ? threadIdx.x : threadIdx.y; }
  __device__ static int row() { return CL ? threadIdx.y : threadIdx.x; }
};

// Offset of (row m, channel c) of a dense tensor: NCHW rows are n * C * HW + hw, channels_last rows m * C.
template <bool CL>
__device__ __forceinline__ int64_t dense_offset(int64_t m, int64_t c, int64_t C, int64_t HW) {
  if (CL) return m * C + c;
  const int64_t n = m / HW;
  return (n * C + c) * HW + (m - n * HW);
}

// Merges the kRows (n, mean, m2) triples of each channel of a block in row order (deterministic).
template <bool CL>
__device__ void merge_lanes(double n, double mean, double m2, double* out_mean, double* out_m2, int64_t C, int64_t c) {
  using L = Lanes<CL>;
  __shared__ double sn[kSlow][kFast], smean[kSlow][kFast], sm2[kSlow][kFast];
  sn[threadIdx.y][threadIdx.x] = n;
  smean[threadIdx.y][threadIdx.x] = mean;
  sm2[threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (L::row() == 0 && c < C) {
    double tn = 0, tmean = 0, tm2 = 0;
    for (int r = 0; r < L::kRows; ++r) {
      const int ty = CL ? r : threadIdx.y, tx = CL ? threadIdx.x : r;
      chan_merge(tn, tmean, tm2, sn[ty][tx], smean[ty][tx], sm2[ty][tx]);
    }
    out_mean[c] = tmean;
    out_m2[c] = tm2;
  }
}

// Adds the kRows pairs (a, b) of each channel of a block in row order (deterministic).
template <bool CL>
__device__ void sum_lanes(double a, double b, double* out_a, double* out_b, int64_t C, int64_t c) {
  using L = Lanes<CL>;
  __shared__ double sa[kSlow][kFast], sb[kSlow][kFast];
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (L::row() == 0 && c < C) {
    double ta = 0, tb = 0;
    for (int r = 0; r < L::kRows; ++r) {
      const int ty = CL ? r : threadIdx.y, tx = CL ? threadIdx.x : r;
      ta += sa[ty][tx];
      tb += sb[ty][tx];
    }
    out_a[c] = ta;
    out_b[c] = tb;
  }
}

// ---- forward -------------------------------------------------------------------------------

// Block (p, j): rows [p * rows, (p + 1) * rows) of channels j * kChannels + lane. Each thread sums
// its values shifted by its first value (in acc_t), then the lanes merge in double.
template <typename scalar_t, bool CL>
__global__ void stats_partial_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C, int64_t HW, int64_t rows,
                                     double* __restrict__ pmean, double* __restrict__ pm2) {
  using acc_t = acc_type<scalar_t>;
  using L = Lanes<CL>;
  const int64_t c = blockIdx.y * static_cast<int64_t>(L::kChannels) + L::channel();
  const int64_t first = blockIdx.x * rows;
  const int64_t last = first + rows < M ? first + rows : M;
  acc_t shift = 0, s1 = 0, s2 = 0;
  int64_t count = 0;
  if (c < C) {
    for (int64_t m = first + L::row(); m < last; m += L::kRows) {
      const acc_t v = static_cast<acc_t>(x[dense_offset<CL>(m, c, C, HW)]);
      if (count == 0) shift = v;
      const acc_t d = v - shift;
      s1 += d;
      s2 += d * d;
      ++count;
    }
  }
  double mean = 0, m2 = 0;
  if (count > 0) shifted_moments(static_cast<double>(count), shift, s1, s2, mean, m2);
  merge_lanes<CL>(static_cast<double>(count), mean, m2, pmean + blockIdx.x * C, pm2 + blockIdx.x * C, C, c);
}

template <typename acc_t, typename param_t>
__global__ void stats_finalize_kernel(const double* __restrict__ pmean, const double* __restrict__ pm2, int64_t P,
                                      int64_t rows, int64_t M, int64_t C, const param_t* __restrict__ weight,
                                      const param_t* __restrict__ bias, double eps, acc_t* __restrict__ mean_out,
                                      acc_t* __restrict__ var_out, acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double n = 0, mean = 0, m2 = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t nb = M - p * rows < rows ? M - p * rows : rows;
    chan_merge(n, mean, m2, static_cast<double>(nb), pmean[p * C + c], pm2[p * C + c]);
  }
  const double var = m2 / n;
  mean_out[c] = static_cast<acc_t>(mean);
  var_out[c] = static_cast<acc_t>(var);
  const double s = static_cast<double>(weight[c]) / sqrt(var + eps);
  scale[c] = static_cast<acc_t>(s);
  shift[c] = static_cast<acc_t>(static_cast<double>(bias[c]) - mean * s);
}

// Eval: scale and shift from the running statistics.
template <typename acc_t, typename param_t>
__global__ void affine_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                              const param_t* __restrict__ weight, const param_t* __restrict__ bias, double eps, int64_t C,
                              acc_t* __restrict__ scale, acc_t* __restrict__ shift) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  const double s = static_cast<double>(weight[c]) / sqrt(static_cast<double>(var[c]) + eps);
  scale[c] = static_cast<acc_t>(s);
  shift[c] = static_cast<acc_t>(static_cast<double>(bias[c]) - static_cast<double>(mean[c]) * s);
}

// Channel of the element at memory offset i of a dense tensor (one division, not four).
template <bool CL>
__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t HW) {
  return CL ? i % C : (i / HW) % C;
}

// y = act(x * scale + shift + r); without a scale (nullptr) it is 1: the bias_act epilogue. A
// residual laid out like y (r_flat) is read at the same offset; any other (a strided view, the
// option-A shortcut) through its strides.
template <typename scalar_t, bool CL, bool kRelu>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t numel, int64_t C,
                             int64_t H, int64_t W, const acc_type<scalar_t>* __restrict__ scale,
                             const acc_type<scalar_t>* __restrict__ shift, const scalar_t* __restrict__ r, Strides4 rs,
                             int64_t r_channels, int64_t r_stride, bool r_flat) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t c;
    acc_t res = 0;
    if (r != nullptr && !r_flat) {
      const Index4 p = decompose<CL>(i, C, H, W);
      c = p.c;
      res = static_cast<acc_t>(zero_pad_shortcut_at(r, rs, r_channels, r_stride, p.n, p.c, p.h, p.w));
    } else {
      c = channel_of<CL>(i, C, H * W);
      if (r != nullptr) res = static_cast<acc_t>(r[i]);
    }
    const acc_t s = scale != nullptr ? scale[c] : acc_t(1);
    y[i] = static_cast<scalar_t>(bn_act_value<acc_t>(static_cast<acc_t>(x[i]), s, shift[c], res, kRelu));
  }
}

// ---- backward ------------------------------------------------------------------------------

// Per block: sum(dz) and sum(dz * (x - mean)) of its rows and channels, dz = dy masked by ReLU;
// dz is stored when the residual needs its gradient.
template <typename scalar_t, bool CL, bool kRelu>
__global__ void grad_sums_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                                 const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ mean,
                                 scalar_t* __restrict__ dz_out, int64_t M, int64_t C, int64_t HW, int64_t rows,
                                 double* __restrict__ psum, double* __restrict__ pdot) {
  using acc_t = acc_type<scalar_t>;
  using L = Lanes<CL>;
  const int64_t c = blockIdx.y * static_cast<int64_t>(L::kChannels) + L::channel();
  const int64_t first = blockIdx.x * rows;
  const int64_t last = first + rows < M ? first + rows : M;
  acc_t s = 0, dot = 0;
  if (c < C) {
    const acc_t mu = mean[c];
    for (int64_t m = first + L::row(); m < last; m += L::kRows) {
      const int64_t off = dense_offset<CL>(m, c, C, HW);
      const acc_t dz = bn_act_pre_grad<acc_t>(static_cast<acc_t>(dy[off]), kRelu ? static_cast<acc_t>(y[off]) : acc_t(1), kRelu);
      if (dz_out != nullptr) dz_out[off] = static_cast<scalar_t>(dz);
      s += dz;
      dot += dz * (static_cast<acc_t>(x[off]) - mu);
    }
  }
  sum_lanes<CL>(static_cast<double>(s), static_cast<double>(dot), psum + blockIdx.x * C, pdot + blockIdx.x * C, C, c);
}

// dweight, dbias, and the coefficients of dx = (dz - a - xmu * k) * scale (a = k = 0 in eval).
template <typename acc_t, typename param_t>
__global__ void grad_finalize_kernel(const double* __restrict__ psum, const double* __restrict__ pdot, int64_t P,
                                     int64_t M, int64_t C, const acc_t* __restrict__ var,
                                     const param_t* __restrict__ weight, double eps, bool training,
                                     acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_bias,
                                     acc_t* __restrict__ coef) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double s = 0, dot = 0;
  for (int64_t p = 0; p < P; ++p) {
    s += psum[p * C + c];
    dot += pdot[p * C + c];
  }
  const double invstd = 1.0 / sqrt(static_cast<double>(var[c]) + eps);
  grad_weight[c] = static_cast<acc_t>(dot * invstd);
  grad_bias[c] = static_cast<acc_t>(s);
  coef[c] = static_cast<acc_t>(training ? s / static_cast<double>(M) : 0.0);
  coef[C + c] = static_cast<acc_t>(training ? dot / static_cast<double>(M) * invstd * invstd : 0.0);
  coef[2 * C + c] = static_cast<acc_t>(invstd * static_cast<double>(weight[c]));
}

// dx from g: g is dz itself (kMask false) or dy, masked here by y > 0 (kMask true).
template <typename scalar_t, bool CL, bool kMask>
__global__ void grad_input_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                  const scalar_t* __restrict__ x, const acc_type<scalar_t>* __restrict__ mean,
                                  const acc_type<scalar_t>* __restrict__ coef, int64_t numel, int64_t C, int64_t H,
                                  int64_t W, scalar_t* __restrict__ dx) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of<CL>(i, C, H * W);
    const acc_t dz = bn_act_pre_grad<acc_t>(static_cast<acc_t>(g[i]), kMask ? static_cast<acc_t>(y[i]) : acc_t(1), kMask);
    dx[i] = static_cast<scalar_t>(bn_grad_input<acc_t>(dz, static_cast<acc_t>(x[i]) - mean[c], coef[c], coef[C + c], coef[2 * C + c]));
  }
}

// ---- launchers -----------------------------------------------------------------------------

// The blocks of a reduction over M rows and C channels: enough to fill the GPU, each range of rows
// at least 64 long. Block (p, j) reduces rows [p * rows, (p + 1) * rows) of its channels.
struct ReductionGrid {
  int64_t rows, ranges, channel_blocks;
  dim3 grid() const { return dim3(static_cast<unsigned>(ranges), static_cast<unsigned>(channel_blocks)); }
};

template <bool CL>
ReductionGrid reduction_grid(int64_t M, int64_t C) {
  const int64_t channel_blocks = (C + Lanes<CL>::kChannels - 1) / Lanes<CL>::kChannels;
  const int64_t P = std::max<int64_t>(1, std::min((2048 + channel_blocks - 1) / channel_blocks, (M + 63) / 64));
  const int64_t rows = (M + P - 1) / P;
  return {rows, (M + rows - 1) / rows, channel_blocks};
}

// A residual with the output's shape, dense in the output's memory format: read at the same offset.
bool residual_flat(const at::Tensor& r, const at::Tensor& x, int64_t stride, at::MemoryFormat fmt) {
  return stride == 1 && r.sizes() == x.sizes() && r.is_contiguous(fmt);
}

// y = act(x * scale + shift + r) over x (dense in fmt): the forward's second pass, and the bias_act
// epilogue with scale nullptr.
template <typename scalar_t>
void launch_apply(const at::Tensor& x, at::Tensor& y, at::MemoryFormat fmt, const acc_type<scalar_t>* scale,
                  const acc_type<scalar_t>* shift, const std::optional<at::Tensor>& residual, int64_t residual_stride,
                  bool relu, cudaStream_t stream) {
  const scalar_t* rp = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  const Strides4 rs = residual.has_value() ? strides_of(*residual) : Strides4{0, 0, 0, 0};
  const int64_t rc = residual.has_value() ? residual->size(1) : 0;
  const bool r_flat = residual.has_value() && residual_flat(*residual, x, residual_stride, fmt);
  with_flag(fmt == at::MemoryFormat::ChannelsLast, [&](auto kCL) {
    with_flag(relu, [&](auto kRelu) {
      apply_kernel<scalar_t, decltype(kCL)::value, decltype(kRelu)::value><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel(), x.size(1), x.size(2), x.size(3),
          scale, shift, rp, rs, rc, residual_stride, r_flat);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, int64_t residual_stride, bool training, double eps, bool relu) {
  check_batch_norm_act_args(input, weight, bias, running_mean, running_var, residual, residual_stride, training);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), M = N * H * W;
  const auto acc = acc_dtype(x);
  at::Tensor mean, var;
  if (training) {
    mean = at::zeros({C}, x.options().dtype(acc));
    var = at::zeros({C}, x.options().dtype(acc));
  } else {
    mean = running_mean->to(acc, false, true).contiguous();
    var = running_var->to(acc, false, true).contiguous();
  }
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return {y, mean, var};
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  at::Tensor scale = at::empty({C}, x.options().dtype(acc)), shift = at::empty({C}, x.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned channel_grid = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_cuda", [&] {
    using x_t = scalar_t;
    using acc_t = acc_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "batch_norm_act_cuda_params", [&] {
      using param_t = scalar_t;
      if (training) {
        with_flag(cl, [&](auto kCL) {
          constexpr bool CL = decltype(kCL)::value;
          const ReductionGrid g = reduction_grid<CL>(M, C);
          const int64_t ranges = g.ranges, rows = g.rows;
          at::Tensor pmean = at::empty({ranges, C}, x.options().dtype(at::kDouble));
          at::Tensor pm2 = at::empty({ranges, C}, x.options().dtype(at::kDouble));
          stats_partial_kernel<x_t, CL><<<g.grid(), dim3(kFast, kSlow), 0, stream>>>(
              x.const_data_ptr<x_t>(), M, C, H * W, rows, pmean.mutable_data_ptr<double>(),
              pm2.mutable_data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          stats_finalize_kernel<acc_t, param_t><<<channel_grid, kThreads, 0, stream>>>(
              pmean.const_data_ptr<double>(), pm2.const_data_ptr<double>(), ranges, rows, M, C,
              w.const_data_ptr<param_t>(), b.const_data_ptr<param_t>(), eps, mean.mutable_data_ptr<acc_t>(),
              var.mutable_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      } else {
        affine_kernel<acc_t, param_t><<<channel_grid, kThreads, 0, stream>>>(
            mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), w.const_data_ptr<param_t>(),
            b.const_data_ptr<param_t>(), eps, C, scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    launch_apply<scalar_t>(x, y, fmt, scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), residual,
                           residual_stride, relu, stream);
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& input, const std::optional<at::Tensor>& output,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool relu,
    bool residual_grad, const std::optional<at::Tensor>& bias /*the CPU kernel's mask from x; unused here*/) {
  check_batch_norm_act_backward_args("batch_norm_act_backward", grad_y, input, output, weight, mean, var, relu, bias,
                                     /*mask_from_input=*/false);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), M = N * H * W;
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(fmt), dy = grad_y.contiguous(fmt);
  const at::Tensor y = relu ? output->contiguous(fmt) : at::Tensor();
  at::Tensor dz = residual_grad ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  const auto acc = acc_dtype(x);
  at::Tensor grad_weight = at::zeros({C}, weight.options().dtype(acc));
  at::Tensor grad_bias = at::zeros({C}, weight.options().dtype(acc));
  if (x.numel() > 0) {
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    const at::Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous(), w = weight.contiguous();
    at::Tensor coef = at::empty({3, C}, x.options().dtype(acc));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act_backward_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      const scalar_t* yp = relu ? y.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* dzp = residual_grad ? dz.mutable_data_ptr<scalar_t>() : nullptr;
      with_flag(cl, [&](auto kCL) {
        constexpr bool CL = decltype(kCL)::value;
        const ReductionGrid rg = reduction_grid<CL>(M, C);
        const int64_t ranges = rg.ranges, rows = rg.rows;
        at::Tensor psum = at::empty({ranges, C}, x.options().dtype(at::kDouble));
        at::Tensor pdot = at::empty({ranges, C}, x.options().dtype(at::kDouble));
        with_flag(relu, [&](auto kRelu) {
          grad_sums_kernel<scalar_t, CL, decltype(kRelu)::value><<<rg.grid(), dim3(kFast, kSlow), 0, stream>>>(
                  dy.const_data_ptr<scalar_t>(), yp, x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(), dzp, M, C,
                  H * W, rows, psum.mutable_data_ptr<double>(), pdot.mutable_data_ptr<double>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        using x_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "batch_norm_act_backward_params", [&] {
          grad_finalize_kernel<acc_type<x_t>, scalar_t><<<static_cast<unsigned>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
              psum.const_data_ptr<double>(), pdot.const_data_ptr<double>(), ranges, M, C, v.const_data_ptr<acc_type<x_t>>(),
              w.const_data_ptr<scalar_t>(), eps, training, grad_weight.mutable_data_ptr<acc_type<x_t>>(),
              grad_bias.mutable_data_ptr<acc_type<x_t>>(), coef.mutable_data_ptr<acc_type<x_t>>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // With dz written by the sums kernel, dx reads it in place of dy and y.
        const scalar_t* g = dzp != nullptr ? dzp : dy.const_data_ptr<scalar_t>();
        with_flag(relu && dzp == nullptr, [&](auto kMask) {
          grad_input_kernel<scalar_t, CL, decltype(kMask)::value><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
              g, yp, x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>(), x.numel(),
              C, H, W, dx.mutable_data_ptr<scalar_t>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {dx, grad_weight.to(weight.scalar_type()), grad_bias.to(weight.scalar_type()), dz};
}

at::Tensor bias_act_cuda(const at::Tensor& input, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                         int64_t residual_stride, bool relu) {
  check_bias_act_args(input, bias, residual, residual_stride);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = input.suggest_memory_format();
  const at::Tensor x = input.contiguous(fmt);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return y;
  const at::Tensor b = bias.to(acc_dtype(x)).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    launch_apply<scalar_t>(x, y, fmt, nullptr, b.const_data_ptr<acc_t>(), residual, residual_stride, relu, stream);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("batch_norm_act", &batch_norm_act_cuda);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cuda);
  m.impl("bias_act", &bias_act_cuda);
}

}  // namespace resnet_fast
