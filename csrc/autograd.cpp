// Autograd of resnet_fast::batch_norm_act, zero_pad_shortcut, conv3x3_train, conv1x1_train, max_pool2d_train and
// conv_bn_act_train in C++, for the extension's own kernels (CPU and CUDA; the convolutions and the
// pooling are CPU only).
// The same rules as the Python registration that the Triton ops use (resnet_fast/ops/
// batch_norm_act.py, `register`), without Python on the path: a training step calls this op once
// per BatchNorm, and the Python autograd function cost about 100 us per call forward + backward
// (a third of a small op's time, e.g. the option-A block end of ResNet-20).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max_pool2d_with_indices_backward.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/conv_bn_act_train.h"

namespace resnet_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward of batch_norm_act can do on x's device: the two choices that are the kernels'
// capabilities rather than routing (resnet_fast/_routing.py lists them). The CPU kernels
// recompute the ReLU mask from x through the forward's affine, bit for bit (so a unit without a
// residual keeps no output for its backward: two fewer reads of an activation per backward pass),
// and at a block end run the backward in two ops with the incoming gradient freed between them
// (two block-sized gradients alive at a time instead of three). The GPU kernels read the output.
struct BackwardFeatures {
  bool mask_from_input;
  bool split_at_block_end;
};

BackwardFeatures backward_features(const at::Tensor& x) {
  const bool cpu = x.device().is_cpu();
  return {cpu, cpu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& bias,
                                                            const std::optional<at::Tensor>& running_mean,
                                                            const std::optional<at::Tensor>& running_var,
                                                            const std::optional<at::Tensor>& residual,
                                                            int64_t residual_stride, bool training, double eps,
                                                            bool relu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fast::batch_norm_act", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, int64_t, bool, double, bool)>();
  return op.call(x, weight, bias, running_mean, running_var, residual, residual_stride, training, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& output, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool relu, bool residual_grad,
    const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fast::batch_norm_act_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double, bool, bool,
                                 const std::optional<at::Tensor>&)>();
  return op.call(grad_y, x, output, weight, mean, var, training, eps, relu, residual_grad, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward_reduce(const at::Tensor& grad_y, const at::Tensor& x,
                                                                    const std::optional<at::Tensor>& output,
                                                                    const at::Tensor& weight, const at::Tensor& mean,
                                                                    const at::Tensor& var, double eps, bool relu,
                                                                    const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fast::batch_norm_act_backward_reduce", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool,
                                 const std::optional<at::Tensor>&)>();
  return op.call(grad_y, x, output, weight, mean, var, eps, relu, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward_input(const at::Tensor& grad_z, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& var, const at::Tensor& sum_dz,
                                                                   const at::Tensor& sum_dzxmu, bool training,
                                                                   double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fast::batch_norm_act_backward_input", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, double)>();
  return op.call(grad_z, x, weight, mean, var, sum_dz, sum_dzxmu, training, eps);
}

at::Tensor call_zero_pad_backward(const at::Tensor& grad, c10::SymIntArrayRef size, int64_t stride) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fast::zero_pad_shortcut_backward", "")
                             .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, int64_t)>();
  return op.call(grad, size, stride);
}

class BatchNormAct : public torch::autograd::Function<BatchNormAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual,
                               int64_t residual_stride, bool training, double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var] = call_forward(x, weight, bias, running_mean, running_var, residual, residual_stride,
                                       training, eps, relu);
    // Without a residual the CPU kernel recomputes the ReLU mask from x (the forward's affine, bit
    // for bit): y is not kept.
    const bool from_x = relu && !residual.has_value() && backward_features(x).mask_from_input;
    ctx->save_for_backward({x, relu && !from_x ? y : at::Tensor(), weight, from_x ? bias : at::Tensor(), mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_residual"] = residual.has_value();
    // needs_input_grad counts the tensor inputs that were given: x, weight, bias, then the
    // running statistics where present (eval), then the residual.
    ctx->saved_data["residual_edge"] = int64_t(3) + (running_mean.has_value() && running_mean->defined()) +
                                       (running_var.has_value() && running_var->defined());
    ctx->saved_data["residual_stride"] = residual_stride;
    if (residual.has_value()) {
      ctx->saved_data["residual_size"] = c10::IValue(residual->sym_sizes().vec());
      ctx->saved_data["residual_is_x_shaped"] = residual->sym_sizes() == x.sym_sizes();
    }
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  // `grads` by reference: CppNode::apply holds the only reference autograd keeps to the incoming
  // gradient there, which lets the residual case below free it halfway.
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &y = saved[1], &weight = saved[2], &bias = saved[3], &mean = saved[4],
                     &var = saved[5];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const bool residual_grad = has_residual && ctx->needs_input_grad(ctx->saved_data["residual_edge"].toInt());
    const bool training = ctx->saved_data["training"].toBool(), relu = ctx->saved_data["relu"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto output = y.defined() ? std::optional<at::Tensor>(y) : std::nullopt;
    const auto bias_opt = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    at::Tensor grad_x, grad_weight, grad_bias, grad_z;
    at::Tensor grad_y = std::move(grads[0]);
    // The kernels read the gradient in x's layout; converted here rather than in the op, the
    // gradient in the other layout (e.g. average pooling's, NCHW) is freed before the op allocates.
    const BackwardFeatures features = backward_features(x);
    if (grad_y.defined() && features.split_at_block_end) grad_y = grad_y.contiguous(x.suggest_memory_format());
    // Under create_graph=True (a second derivative to come) the one-op backward runs: it is the
    // differentiable one (resnet_fast/ops/batch_norm_act.py, _double_backward).
    if (residual_grad && features.split_at_block_end && !at::GradMode::is_enabled()) {
      // The end of a residual block: dz (the residual's gradient) is written anyway, and pass 2
      // reads dz, not dy. Two ops, with the incoming gradient released between them, keep two
      // block-sized gradients alive at a time, not three (as eager's ReLU backward + add do).
      auto [dz, sum_dz, sum_dzxmu] = call_backward_reduce(grad_y, x, output, weight, mean, var, eps, relu, bias_opt);
      grad_y.reset();
      std::tie(grad_x, grad_weight, grad_bias) =
          call_backward_input(dz, x, weight, mean, var, sum_dz, sum_dzxmu, training, eps);
      grad_z = std::move(dz);
    } else {
      std::tie(grad_x, grad_weight, grad_bias, grad_z) =
          call_backward(grad_y, x, output, weight, mean, var, training, eps, relu, residual_grad, bias_opt);
    }
    at::Tensor grad_residual;
    if (residual_grad) {
      grad_residual = grad_z;
      if (!ctx->saved_data["residual_is_x_shaped"].toBool()) {  // the option-A shortcut: back to the block input
        const auto size = ctx->saved_data["residual_size"].toSymIntVector();
        grad_residual = call_zero_pad_backward(grad_z, size, ctx->saved_data["residual_stride"].toInt());
      }
    }
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(),
            ctx->needs_input_grad(1) ? grad_weight : at::Tensor(),
            ctx->needs_input_grad(2) ? grad_bias : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            grad_residual,
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// zero_pad_shortcut: linear, its gradient is zero_pad_shortcut_backward (whose own autograd, for
// double backward, stays in Python: it is the forward again).
class ZeroPadShortcut : public torch::autograd::Function<ZeroPadShortcut> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t out_channels, int64_t stride) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnet_fast::zero_pad_shortcut", "")
                               .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
    ctx->saved_data["input_size"] = c10::IValue(x.sym_sizes().vec());
    ctx->saved_data["stride"] = stride;
    return {op.call(x, out_channels, stride)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto size = ctx->saved_data["input_size"].toSymIntVector();
    return {call_zero_pad_backward(grads[0], size, ctx->saved_data["stride"].toInt()), at::Tensor(), at::Tensor()};
  }
};

using OptTensor = std::optional<at::Tensor>;
using Conv3x3Signature = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool, const OptTensor&,
                                    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool,
                                    const OptTensor&, int64_t, int64_t, bool, bool, bool);

// x = relu(batch_norm(bn_input)) again, as batch_norm_act made it for a convolution that did not
// keep it: under create_graph as the forward ran it (batch statistics recomputed, differentiable
// in bn_input and the BatchNorm's parameters), else from the forward's statistics (eval mode: the
// same affine and apply pass, bit for bit).
at::Tensor recompute_bn_relu(const at::Tensor& bn_input, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                             const at::Tensor& mean, const at::Tensor& var, double eps, bool training) {
  const bool batch_stats = training && at::GradMode::is_enabled();
  return std::get<0>(call_forward(bn_input, bn_weight, bn_bias, batch_stats ? OptTensor() : mean,
                                  batch_stats ? OptTensor() : var, std::nullopt, 1, batch_stats, eps, true));
}

const c10::TypedOperatorHandle<Conv3x3Signature>& conv3x3_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("resnet_fast::conv3x3_train", "")
                             .typed<Conv3x3Signature>();
  return op;
}

at::Tensor call_conv3x3(const at::Tensor& x, const at::Tensor& weight, int64_t stride, bool winograd, bool kernel,
                        bool tiles, bool direct) {
  return conv3x3_op().call(x, weight, stride, winograd, kernel, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                           std::nullopt, 0.0, true, std::nullopt, 1, 0, tiles, false, direct);
}

// conv3x3_train: at stride 1 the input gradient is the op itself on the flipped, transposed weight
// (so Winograd or the direct kernel runs it where it runs the forward: C and K swap, and the rules
// are symmetric in them;
// double backward differentiates it again); at stride 2 it is conv3x3_input_grad where the plan
// says `direct` (its own autograd in resnet_fast/ops/conv3x3_train.py), else ATen's (oneDNN's
// backward-data).
// The weight gradient is conv3x3_weight_grad, by Winograd or our direct kernel where the caller's
// plan says so.
// Where x is relu(batch_norm(bn_input)) (the bn_* arguments), x is not kept: the weight gradient
// recomputes it from bn_input, bit for bit, inside our kernel (its prologue) or whole before ATen's;
// under create_graph (a second derivative to come) x is recomputed by batch_norm_act itself, so that
// the weight gradient's dependence on x reaches bn_input and the BatchNorm's parameters as it would
// through x. Where x came from a network's stem (bn_conv_weight: conv_bn_act_train), bn_input is the
// stem's input (the images) and the BatchNorm's input is recomputed first, by the stem's convolution.
class Conv3x3Train : public torch::autograd::Function<Conv3x3Train> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                               bool winograd, bool weight_grad_kernel, const OptTensor& bn_input,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& bn_mean,
                               const OptTensor& bn_var, double bn_eps, bool bn_training,
                               const OptTensor& bn_conv_weight, int64_t bn_conv_stride, int64_t bn_conv_padding,
                               bool winograd_tiles, bool weight_grad_winograd, bool direct) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool recompute = bn_input.has_value();
    if (recompute)
      ctx->save_for_backward({*bn_input, weight, *bn_weight, *bn_bias, *bn_mean, *bn_var,
                              bn_conv_weight.has_value() ? *bn_conv_weight : at::Tensor()});
    else
      ctx->save_for_backward({x, weight});
    if (bn_conv_weight.has_value()) {
      ctx->saved_data["x_size"] = x.sizes().vec();
      ctx->saved_data["bn_conv_stride"] = bn_conv_stride;
      ctx->saved_data["bn_conv_padding"] = bn_conv_padding;
    }
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["winograd"] = winograd;
    ctx->saved_data["winograd_tiles"] = winograd_tiles;
    ctx->saved_data["weight_grad_kernel"] = weight_grad_kernel;
    ctx->saved_data["weight_grad_winograd"] = weight_grad_winograd;
    ctx->saved_data["direct"] = direct;
    ctx->saved_data["recompute"] = recompute;
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["bn_training"] = bn_training;
    return {conv3x3_op().call(x, weight, stride, winograd, weight_grad_kernel, bn_input, bn_weight, bn_bias, bn_mean,
                              bn_var, bn_eps, bn_training, bn_conv_weight, bn_conv_stride, bn_conv_padding,
                              winograd_tiles, weight_grad_winograd, direct)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using WeightGradSignature = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, const OptTensor&,
                                           const OptTensor&, const OptTensor&, const OptTensor&, double, bool);
    static const auto weight_grad_op = c10::Dispatcher::singleton()
                                           .findSchemaOrThrow("resnet_fast::conv3x3_weight_grad", "")
                                           .typed<WeightGradSignature>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[1];
    // x: bn_input where recomputing; the stem's input where x came from the stem (bn_conv_weight), in
    // which case the BatchNorm's input is that convolution again, recomputed for the weight gradient.
    at::Tensor x = saved[0];
    const at::Tensor stem_weight = saved.size() > 6 ? saved[6] : at::Tensor();
    const int64_t stride = ctx->saved_data["stride"].toInt();
    const bool winograd = ctx->saved_data["winograd"].toBool();
    const bool kernel = ctx->saved_data["weight_grad_kernel"].toBool();
    const bool wgrad_winograd = ctx->saved_data["weight_grad_winograd"].toBool();
    const bool direct = ctx->saved_data["direct"].toBool();
    const bool recompute = ctx->saved_data["recompute"].toBool();
    at::Tensor grad_x, grad_weight;
    if (ctx->needs_input_grad(0)) {
      // At stride 1 in the plans with a kernel of ours, the convolution with the flipped, transposed
      // weight (Winograd's, or oneDNN's forward; its own weight gradient, needed only in a double
      // backward, is ATen's: our kernel's channel rules are not symmetric in C and K). Otherwise
      // ATen's input gradient, as PyTorch's convolution runs it: the plan (False, False), which runs
      // our op only to recompute x, would pay for the flipped weight's copy (512 x 512 channels:
      // 10 ms a call, the input gradient 12 ms). It reads only x's shape, which bn_input shares.
      if (stride == 1 && (winograd || kernel || direct)) {
        grad_x = call_conv3x3(grads[0], weight.flip({2, 3}).transpose(0, 1), 1, winograd, false,
                              ctx->saved_data["winograd_tiles"].toBool(), direct);
      } else if (direct) {  // stride 2: our direct kernel's transposed convolution
        using InputGradSignature = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::SymIntArrayRef);
        static const auto input_grad_op = c10::Dispatcher::singleton()
                                              .findSchemaOrThrow("resnet_fast::conv3x3_input_grad", "")
                                              .typed<InputGradSignature>();
        std::vector<c10::SymInt> size;  // x's (the stem's input has another shape)
        if (stem_weight.defined())
          for (const int64_t v : ctx->saved_data["x_size"].toIntVector()) size.emplace_back(v);
        else
          size = x.sym_sizes().vec();
        grad_x = input_grad_op.call(grads[0], weight, stride, size);
      } else {
        // A tensor of x's shape: the stem's input has another. Never written or read: an unfilled
        // buffer's pages are not touched.
        const at::Tensor shaped =
            stem_weight.defined() ? at::empty(ctx->saved_data["x_size"].toIntVector(),
                                              weight.options().memory_format(weight.suggest_memory_format()))
                                  : x;
        grad_x = std::get<0>(at::convolution_backward(grads[0], shaped, weight, std::nullopt, {stride, stride},
                                                      {1, 1}, {1, 1}, false, {0, 0}, 1, {true, false, false}));
      }
    }
    if (ctx->needs_input_grad(1)) {
      if (!recompute) {
        grad_weight = weight_grad_op.call(grads[0], x, stride, kernel, std::nullopt, std::nullopt, std::nullopt,
                                          std::nullopt, 0.0, wgrad_winograd);
      } else {
        const at::Tensor &bn_weight = saved[2], &bn_bias = saved[3], &mean = saved[4], &var = saved[5];
        const double eps = ctx->saved_data["bn_eps"].toDouble();
        const bool training = ctx->saved_data["bn_training"].toBool();
        if (stem_weight.defined())  // the BatchNorm's input, as the stem computed it
          x = square_conv(x, stem_weight, ctx->saved_data["bn_conv_stride"].toInt(),
                          ctx->saved_data["bn_conv_padding"].toInt());
        if (at::GradMode::is_enabled()) {
          const at::Tensor input = recompute_bn_relu(x, bn_weight, bn_bias, mean, var, eps, training);
          grad_weight = weight_grad_op.call(grads[0], input, stride, kernel, std::nullopt, std::nullopt, std::nullopt,
                                            std::nullopt, 0.0, wgrad_winograd);
        } else {
          grad_weight =
              weight_grad_op.call(grads[0], x, stride, kernel, bn_weight, bn_bias, mean, var, eps, wgrad_winograd);
        }
      }
      if (!grad_weight.is_contiguous(weight.suggest_memory_format()))  // the parameter's own layout
        grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
    }
    variable_list out(18);  // one per argument: x and weight get gradients; bn_* make x, which carries them
    out[0] = grad_x;
    out[1] = grad_weight;
    return out;
  }
};

at::Tensor conv3x3_train_autograd(const at::Tensor& x, const at::Tensor& weight, int64_t stride, bool winograd,
                                  bool weight_grad_kernel, const OptTensor& bn_input, const OptTensor& bn_weight,
                                  const OptTensor& bn_bias, const OptTensor& bn_mean, const OptTensor& bn_var,
                                  double bn_eps, bool bn_training, const OptTensor& bn_conv_weight,
                                  int64_t bn_conv_stride, int64_t bn_conv_padding, bool winograd_tiles,
                                  bool weight_grad_winograd, bool direct) {
  return Conv3x3Train::apply(x, weight, stride, winograd, weight_grad_kernel, bn_input, bn_weight, bn_bias, bn_mean,
                             bn_var, bn_eps, bn_training, bn_conv_weight, bn_conv_stride, bn_conv_padding,
                             winograd_tiles, weight_grad_winograd, direct)[0];
}

// conv1x1_train: x = relu(batch_norm(bn_input)) is not kept. The input gradient is ATen's
// backward-data (it reads only x's shape, which bn_input shares); the weight gradient ATen's on x
// recomputed by batch_norm_act with the forward's statistics (eval mode: the same affine, the same
// apply pass, bit for bit); under create_graph x is recomputed by batch_norm_act as the forward ran
// it, differentiably, and both gradients come from it.
class Conv1x1Train : public torch::autograd::Function<Conv1x1Train> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                               const at::Tensor& bn_input, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const at::Tensor& bn_mean, const at::Tensor& bn_var, double bn_eps, bool bn_training) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnet_fast::conv1x1_train", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, double, bool)>();
    ctx->save_for_backward({bn_input, weight, bn_weight, bn_bias, bn_mean, bn_var});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["bn_training"] = bn_training;
    return {op.call(x, weight, stride, bn_input, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_training)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &bn_input = saved[0], &weight = saved[1], &bn_weight = saved[2], &bn_bias = saved[3],
                     &mean = saved[4], &var = saved[5];
    const int64_t stride = ctx->saved_data["stride"].toInt();
    const double eps = ctx->saved_data["bn_eps"].toDouble();
    const bool training = ctx->saved_data["bn_training"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const auto conv_backward = [&](const at::Tensor& input, bool dx, bool dw) {
      return at::convolution_backward(grads[0], input, weight, std::nullopt, {stride, stride}, {0, 0}, {1, 1}, false,
                                      {0, 0}, 1, {dx, dw, false});
    };
    at::Tensor grad_x, grad_weight;
    if (at::GradMode::is_enabled()) {
      const at::Tensor x = recompute_bn_relu(bn_input, bn_weight, bn_bias, mean, var, eps, training);
      std::tie(grad_x, grad_weight, std::ignore) = conv_backward(x, need_x, need_w);
    } else {
      if (need_x) grad_x = std::get<0>(conv_backward(bn_input, true, false));
      if (need_w)
        grad_weight = std::get<1>(
            conv_backward(recompute_bn_relu(bn_input, bn_weight, bn_bias, mean, var, eps, training), false, true));
    }
    if (grad_weight.defined() && !grad_weight.is_contiguous(weight.suggest_memory_format()))
      grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
    variable_list out(10);  // one per argument: x and weight get gradients; bn_* make x, which carries them
    out[0] = need_x ? grad_x : at::Tensor();
    out[1] = need_w ? grad_weight : at::Tensor();
    return out;
  }
};

at::Tensor conv1x1_train_autograd(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                  const at::Tensor& bn_input, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                  const at::Tensor& bn_mean, const at::Tensor& bn_var, double bn_eps, bool bn_training) {
  return Conv1x1Train::apply(x, weight, stride, bn_input, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_training)[0];
}

// conv_bn_act_train (a network's stem, a projection shortcut): the convolution's output (the BatchNorm's
// input) is not kept. The backward recomputes it from x by the same convolution (ATen's, bit for
// bit), runs the BatchNorm (+ ReLU) backward on it (the ReLU mask from it through the forward's
// affine), frees it and the incoming gradient, then runs ATen's convolution backward. Under
// create_graph the same steps are differentiable: the recomputed output carries x's and the
// weight's history, batch_norm_act_backward and ATen's convolution_backward have derivatives.
class ConvBnActTrain : public torch::autograd::Function<ConvBnActTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                               int64_t padding, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               double bn_eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnet_fast::conv_bn_act_train", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, int64_t, int64_t, const at::Tensor&,
                                   const at::Tensor&, double, bool)>();
    auto [y, mean, var] = op.call(x, weight, stride, padding, bn_weight, bn_bias, bn_eps, relu);
    // The bias only for the ReLU mask, recomputed through the forward's affine.
    ctx->save_for_backward({x, weight, bn_weight, relu ? bn_bias : at::Tensor(), mean, var});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["bn_eps"] = bn_eps;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  // `grads` by reference, so that the incoming gradient can be freed before the convolution's backward.
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bn_weight = saved[2], &bn_bias = saved[3], &mean = saved[4],
                     &var = saved[5];
    const int64_t stride = ctx->saved_data["stride"].toInt(), padding = ctx->saved_data["padding"].toInt();
    const double eps = ctx->saved_data["bn_eps"].toDouble();
    at::Tensor c = square_conv(x, weight, stride, padding);
    at::Tensor grad_y = std::move(grads[0]);
    // The kernel reads the gradient in the BatchNorm input's layout, as BatchNormAct's backward.
    grad_y = grad_y.contiguous(c.suggest_memory_format());
    auto [grad_c, grad_bn_weight, grad_bn_bias, unused] =
        call_backward(grad_y, c, std::nullopt, bn_weight, mean, var, true, eps, ctx->saved_data["relu"].toBool(), false,
                      bn_bias.defined() ? std::optional<at::Tensor>(bn_bias) : std::nullopt);
    grad_y.reset();
    c.reset();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    at::Tensor grad_x, grad_weight;
    if (need_x || need_w)
      std::tie(grad_x, grad_weight, std::ignore) =
          at::convolution_backward(grad_c, x, weight, std::nullopt, {stride, stride}, {padding, padding}, {1, 1},
                                   false, {0, 0}, 1, {need_x, need_w, false});
    if (grad_weight.defined() && !grad_weight.is_contiguous(weight.suggest_memory_format()))
      grad_weight = grad_weight.contiguous(weight.suggest_memory_format());  // the parameter's own layout
    return {grad_x,
            grad_weight,
            at::Tensor(),
            at::Tensor(),
            ctx->needs_input_grad(2) ? grad_bn_weight : at::Tensor(),  // (it counts the tensor arguments)
            ctx->needs_input_grad(3) ? grad_bn_bias : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_act_train_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                           int64_t stride, int64_t padding,
                                                                           const at::Tensor& bn_weight,
                                                                           const at::Tensor& bn_bias, double bn_eps,
                                                                           bool relu) {
  auto out = ConvBnActTrain::apply(x, weight, stride, padding, bn_weight, bn_bias, bn_eps, relu);
  return {out[0], out[1], out[2]};
}

// max_pool2d_train keeps its one-byte window positions and its input's size, not its input (ATen's
// max_pool2d keeps the input and int64 indices). Under create_graph the gradient is ATen's
// max_pool2d_with_indices_backward on the flat indices made from them: differentiable in grad_y,
// as PyTorch's pooling is.
class MaxPool2dTrain : public torch::autograd::Function<MaxPool2dTrain> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("resnet_fast::max_pool2d_train", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef,
                                                                         at::IntArrayRef, at::IntArrayRef)>();
    auto [y, index] = op.call(x, kernel_size, stride, padding);
    ctx->mark_non_differentiable({index});
    ctx->save_for_backward({index});
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["input_size"] = std::vector<int64_t>{x.size(2), x.size(3)};
    return {y, index};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("resnet_fast::max_pool2d_train_backward", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                              at::IntArrayRef)>();
    const at::Tensor index = ctx->get_saved_variables()[0];
    const auto kernel = ctx->saved_data["kernel_size"].toIntVector(), stride = ctx->saved_data["stride"].toIntVector(),
               padding = ctx->saved_data["padding"].toIntVector(),
               size = ctx->saved_data["input_size"].toIntVector();
    at::Tensor grad_x;
    if (at::GradMode::is_enabled()) {
      const int64_t OH = index.size(2), OW = index.size(3);
      const at::Tensor p = index.to(at::kLong);
      const auto opts = p.options();
      const at::Tensor h = at::arange(OH, opts).view({1, 1, OH, 1}).mul(stride[0]).sub(padding[0]).add(p.div(kernel[1], "floor"));
      const at::Tensor w = at::arange(OW, opts).view({1, 1, 1, OW}).mul(stride[1]).sub(padding[1]).add(p.remainder(kernel[1]));
      const at::Tensor flat = h.mul(size[1]).add(w).contiguous(index.suggest_memory_format());
      const at::Tensor shape = at::empty({index.size(0), index.size(1), size[0], size[1]},
                                         grads[0].options().memory_format(index.suggest_memory_format()));
      grad_x = at::max_pool2d_with_indices_backward(grads[0], shape, kernel, stride, padding, {1, 1}, false, flat);
    } else {
      grad_x = backward_op.call(grads[0], index, size, kernel, stride, padding);
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_train_autograd(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                             at::IntArrayRef stride, at::IntArrayRef padding) {
  auto out = MaxPool2dTrain::apply(x, kernel_size, stride, padding);
  return {out[0], out[1]};
}

at::Tensor zero_pad_shortcut_autograd(const at::Tensor& x, int64_t out_channels, int64_t stride) {
  return ZeroPadShortcut::apply(x, out_channels, stride)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& residual, int64_t residual_stride,
    bool training, double eps, bool relu) {
  auto out = BatchNormAct::apply(x, weight, bias, running_mean, running_var, residual, residual_stride, training, eps,
                                 relu);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, Autograd, m) {
  m.impl("batch_norm_act", &batch_norm_act_autograd);
  m.impl("zero_pad_shortcut", &zero_pad_shortcut_autograd);
  m.impl("conv3x3_train", &conv3x3_train_autograd);
  m.impl("conv1x1_train", &conv1x1_train_autograd);
  m.impl("max_pool2d_train", &max_pool2d_train_autograd);
  m.impl("conv_bn_act_train", &conv_bn_act_train_autograd);
}

}  // namespace resnet_fast
