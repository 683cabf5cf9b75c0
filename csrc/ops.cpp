// The schemas of every resnet_fast op: the one table of them. Implementations register for their
// dispatch keys in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the Triton ops (resnet_fast/triton/)
// take these schemas under their own namespace; fake kernels and Python autograd are added in
// resnet_fast/ops/<op>.py, the forward ops' autograd for these kernels in csrc/autograd.cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import resnet_fast._C` loads this library, which runs the registrations below. The module
// itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The arguments of the ops that Triton implements too, written once: each op and its
// check_<op> (below) take them.
#define RF_ZERO_PAD_SHORTCUT_ARGS "(Tensor x, int out_channels, int stride)"
#define RF_ZERO_PAD_SHORTCUT_BACKWARD_ARGS "(Tensor grad_out, SymInt[] input_size, int stride)"
#define RF_BATCH_NORM_ACT_ARGS                                                                  \
  "(Tensor x, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, Tensor? residual, " \
  "int residual_stride, bool training, float eps, bool relu)"
#define RF_BATCH_NORM_ACT_BACKWARD_ARGS                                                           \
  "(Tensor grad_y, Tensor x, Tensor? output, Tensor weight, Tensor mean, Tensor var, bool training, " \
  "float eps, bool relu, bool residual_grad, Tensor? bias=None)"
#define RF_BIAS_ACT_ARGS "(Tensor x, Tensor bias, Tensor? residual, int residual_stride, bool relu)"
#define RF_NORM_CONV_ARGS \
  "(Tensor x, Tensor weight, int stride, int padding, Tensor? scale, Tensor? shift, bool relu)"
#define RF_NORM_CONV_BACKWARD_ARGS                                                                   \
  "(Tensor? grad_y, Tensor x, Tensor weight, int stride, int padding, Tensor? scale, Tensor? shift, " \
  "bool relu, Tensor y, Tensor mean, Tensor? grad_mean, Tensor? grad_var, bool[3] output_mask)"

TORCH_LIBRARY(resnet_fast, m) {
  // Option-A shortcut (see csrc/common/zero_pad_shortcut.h).
  m.def("zero_pad_shortcut" RF_ZERO_PAD_SHORTCUT_ARGS " -> Tensor");
  m.def("zero_pad_shortcut_backward" RF_ZERO_PAD_SHORTCUT_BACKWARD_ARGS " -> Tensor");

  // BatchNorm (+ residual add) (+ ReLU) (see csrc/common/batch_norm_act.h). Returns the output and
  // the mean and biased variance it normalised with (the batch's in training, the running
  // statistics in eval); the caller updates the running statistics. The residual is read in place:
  // r[n, c, h, w] = residual[n, c, h * residual_stride, w * residual_stride] for c < its channels, 0
  // beyond, which covers the identity, a projection and the option-A zero-padding shortcut.
  m.def("batch_norm_act" RF_BATCH_NORM_ACT_ARGS " -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_residual); grad_residual is the gradient of the
  // full-size residual term (empty unless residual_grad). With relu, the ReLU mask comes from
  // `output`, or, when output is None, from x through the forward's affine, which needs `bias`
  // (the CPU kernel; the GPU kernels require output).
  m.def("batch_norm_act_backward" RF_BATCH_NORM_ACT_BACKWARD_ARGS " -> (Tensor, Tensor, Tensor, Tensor)");
  // The same backward in two ops (CPU only), so that the caller can free grad_y between them: the
  // first returns dz (grad_y through the ReLU mask; the gradient of the residual term) and the
  // float64 per-channel sums of dz and dz * (x - mean); the second (grad_x, grad_weight, grad_bias)
  // from dz and those sums.
  m.def(
      "batch_norm_act_backward_reduce(Tensor grad_y, Tensor x, Tensor? output, Tensor weight, Tensor mean, "
      "Tensor var, float eps, bool relu, Tensor? bias=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_backward_input(Tensor grad_z, Tensor x, Tensor weight, Tensor mean, Tensor var, "
      "Tensor sum_dz, Tensor sum_dzxmu, bool training, float eps) -> (Tensor, Tensor, Tensor)");
  // nn.BatchNorm2d's update of the running statistics from a batch's mean and biased variance
  // over `count` values a channel, in one op (CPU): running = (1 - momentum) * running +
  // momentum * batch, with the variance made unbiased (count / (count - 1)).
  m.def(
      "batch_norm_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float momentum, int count) -> ()");
  // The inference epilogue after a convolution with BatchNorm folded into its weights:
  // y = relu(x + bias[c] + r), the residual read as by batch_norm_act.
  m.def("bias_act" RF_BIAS_ACT_ARGS " -> Tensor");

  // Max pooling's values without its argmax indices (inference; dilation 1, floor mode), as
  // F.max_pool2d computes them. CPU only: the GPUs keep PyTorch's pooling.
  m.def("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  // Training's max pooling (CPU, float32/float64, dilation 1, floor mode): the maxima and a uint8
  // tensor of the same shape and layout, each maximum's position in its window,
  // (h - oh * stride_h + pad_h) * kernel_w + (w - ow * stride_w + pad_w), ATen's argmax (the first
  // maximum, the last NaN); its backward (input_size: the input's (H, W)) keeps only those.
  m.def("max_pool2d_train(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_train_backward(Tensor grad_y, Tensor window_index, int[2] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding) -> Tensor");

  // The residual nets' 3x3 convolution (padding 1, no bias, stride 1 or 2) for training (CPU).
  // How it runs is decided by the caller (resnet_fast._routing.conv3x3_train_plan): `winograd`:
  // the forward and, at stride 1, the input gradient by Winograd F(2x2, 3x3), else ATen's;
  // `weight_grad_kernel`: the weight gradient by our AVX2 kernel (conv3x3_weight_grad), else ATen's;
  // `winograd_tiles`: Winograd's 16 products by our register tiles, else at::bmm (as
  // conv3x3_bias_act's `tiles`; the input gradient's too, so the caller's rule must hold for C and K
  // swapped).
  // `weight_grad_winograd`: at stride 1, the weight gradient by Winograd F(2x2, 3x3) (conv3x3_weight_grad's
  // `winograd`; AVX-512, channel counts multiples of 16), ahead of `weight_grad_kernel`.
  // `direct`: the forward and the input gradient by our direct AVX-512 kernel
  // (cpu/conv3x3_direct.cpp; K a multiple of 16, the input gradient's C too), else ATen's; not with
  // `winograd`. Its stride-2 input gradient is conv3x3_input_grad (below).
  // conv3x3_weight_grad returns dW of shape (K, C, 3, 3) in channels_last.
  // bn_input (with bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_training): x is
  // batch_norm_act(bn_input, ...)'s output with ReLU and no residual, normalised with bn_mean and
  // bn_var (the statistics that op returned); the backward then keeps bn_input (which the
  // BatchNorm's backward keeps anyway) instead of x, and recomputes x where it needs it.
  // With bn_conv_weight too (bn_conv_stride, bn_conv_padding): x is conv_bn_act_train(bn_input,
  // bn_conv_weight, ..., relu=True)'s output (a network's stem, normalised with bn_mean and bn_var): bn_input
  // is that convolution's input, and the backward recomputes the convolution as well.
  m.def(
      "conv3x3_train(Tensor x, Tensor weight, int stride, bool winograd, bool weight_grad_kernel, "
      "Tensor? bn_input=None, Tensor? bn_weight=None, Tensor? bn_bias=None, Tensor? bn_mean=None, "
      "Tensor? bn_var=None, float bn_eps=0.0, bool bn_training=True, Tensor? bn_conv_weight=None, "
      "int bn_conv_stride=1, int bn_conv_padding=0, bool winograd_tiles=False, bool weight_grad_winograd=False, "
      "bool direct=False) -> Tensor");
  // The input gradient of conv3x3_train(x, weight, stride=2) for x of input_size (N, C, H, W), in
  // channels_last: our direct kernel's where it runs (conv3x3_train's `direct`), else ATen's.
  m.def("conv3x3_input_grad(Tensor grad_out, Tensor weight, int stride, SymInt[] input_size) -> Tensor");
  // With bn_weight, bn_bias, bn_mean, bn_var (float32, C each) and bn_eps, the convolution's input is
  // relu(batch_norm(x)) with them, recomputed as batch_norm_act's forward computes it (the weight
  // gradient is not differentiable then).
  m.def(
      "conv3x3_weight_grad(Tensor grad_out, Tensor x, int stride, bool kernel, Tensor? bn_weight=None, "
      "Tensor? bn_bias=None, Tensor? bn_mean=None, Tensor? bn_var=None, float bn_eps=0.0, bool winograd=False) "
      "-> Tensor");
  // A bottleneck's 1x1 convolution (no bias) in training, whose input x is batch_norm_act(bn_input,
  // ...)'s output with ReLU and no residual, normalised with bn_mean and bn_var (as for
  // conv3x3_train's bn_* arguments): ATen's convolution forward; the backward keeps bn_input instead
  // of x and recomputes x (CPU).
  m.def(
      "conv1x1_train(Tensor x, Tensor weight, int stride, Tensor bn_input, Tensor bn_weight, Tensor bn_bias, "
      "Tensor bn_mean, Tensor bn_var, float bn_eps, bool bn_training) -> Tensor");
  // A convolution + BatchNorm (+ ReLU) in training whose input the caller keeps anyway (a network's
  // stem, a projection shortcut; CPU, float32/float64): y = [relu](batch_norm(conv2d(x, weight, stride,
  // padding))) with the batch's statistics (no bias, square kernel, dilation 1, one group), and the
  // mean and biased variance it normalised with (the caller updates the running statistics). The
  // backward keeps x rather than the convolution's output, and recomputes that output by the same
  // convolution, bit for bit.
  m.def(
      "conv_bn_act_train(Tensor x, Tensor weight, int stride, int padding, Tensor bn_weight, Tensor bn_bias, "
      "float bn_eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // Inference: relu(conv3x3(x, weight) + bias + residual), stride 1, padding 1, by Winograd
  // F(2x2, 3x3) with the weight given transformed, (16, C, K), by winograd_weight (in float64,
  // rounded once to float32). CPU, float32 only.
  // tiles: the 16 products by our register tiles (AVX-512's where the CPU has it), else by MKL's
  // sgemm (at::bmm), as resnet_fast._routing decides.
  m.def(
      "conv3x3_bias_act(Tensor x, Tensor weight_winograd, Tensor bias, Tensor? residual, bool relu, "
      "bool tiles=False) -> Tensor");
  // The same written into the residual's storage (channels_last contiguous; nothing returned, so
  // that functionalization can replace it): a network's block end whose input nothing reads again
  // (resnet_fast.nn.functional's donation).
  m.def(
      "conv3x3_bias_act_(Tensor(a!) residual, Tensor x, Tensor weight_winograd, Tensor bias, bool relu, "
      "bool tiles=False) -> ()");
  m.def("winograd_weight(Tensor weight) -> Tensor");
  // Inference: relu(conv2d(x, weight, stride, padding) + bias + residual), square kernels, as one
  // matrix product with the weight given packed, (ceil(K / 16), kernel^2 * C, 16) float32, by
  // resnet_fast.ops.pack_conv_weight. CPU, float32 only; the output is channels_last. wide: AVX-512
  // register tiles of 6 x 64 channels (else AVX2's 6 x 16), as resnet_fast._routing decides.
  m.def("conv_bias_act(Tensor x, Tensor weight_packed, Tensor bias, Tensor? residual, bool relu, int kernel, "
        "int stride, int padding, bool wide=False) -> Tensor");
  // The same written into the residual's storage (channels_last contiguous; nothing returned),
  // where the depth is one slice: kernel^2 * C <= 256 (else its partial sums would overwrite the
  // residual first; resnet_fast._routing.GEMM_SLICE).
  m.def("conv_bias_act_(Tensor(a!) residual, Tensor x, Tensor weight_packed, Tensor bias, bool relu, int kernel, "
        "int stride, int padding, bool wide=False) -> ()");
  // Inference's classifier head: linear(mean over (H, W) of x, weight, bias), the (K, C) weight given
  // packed by resnet_fast.ops.pack_conv_weight as a (K, C, 1, 1) convolution's; (N, K) out. CPU,
  // float32 only; wide as conv_bias_act's.
  m.def("pool_linear(Tensor x, Tensor weight_packed, Tensor bias, bool wide=False) -> Tensor");
  // Issue 18's "NormConvolution" forward, on GPUs (Triton; not routed yet): a convolution whose
  // input is normalised as it is loaded, x' = [relu](x * scale[c] + shift[c]) (the previous
  // BatchNorm's scale and shift; the zero padding is x''s), and whose epilogue reduces its own output
  // to the batch's mean and biased variance per output channel (the next BatchNorm's statistics):
  // (y, mean, var), y = conv2d(x', weight, stride, padding), no bias, square kernel, dilation 1, one
  // group. Without scale and shift, x' = [relu](x).
  m.def("norm_conv" RF_NORM_CONV_ARGS " -> (Tensor, Tensor, Tensor)");
  // Its backward, fused: (grad_x, grad_weight, grad_scale, grad_shift) from the gradients of y
  // (None: zero) and of the statistics (grad_mean, grad_var, folded into y's as it is loaded), the
  // forward's arguments and its outputs y and mean. The normalised input is recomputed from x, the
  // ReLU mask too. output_mask: (grad_x, grad_weight, grad_scale and grad_shift); an output not
  // asked for (or the scale's and shift's without them) is empty.
  m.def("norm_conv_backward" RF_NORM_CONV_BACKWARD_ARGS " -> (Tensor, Tensor, Tensor, Tensor)");

  // The argument checks of the ops above that Triton implements too (csrc/common/checks.h, for any
  // device): the Triton launchers run them, so that every implementation refuses bad input with
  // the same words. check_batch_norm_act_backward is the GPU kernels' (the ReLU mask from output).
  m.def("check_zero_pad_shortcut" RF_ZERO_PAD_SHORTCUT_ARGS " -> ()");
  m.def("check_zero_pad_shortcut_backward" RF_ZERO_PAD_SHORTCUT_BACKWARD_ARGS " -> ()");
  m.def("check_batch_norm_act" RF_BATCH_NORM_ACT_ARGS " -> ()");
  m.def("check_batch_norm_act_backward" RF_BATCH_NORM_ACT_BACKWARD_ARGS " -> ()");
  m.def("check_bias_act" RF_BIAS_ACT_ARGS " -> ()");
  m.def("check_norm_conv" RF_NORM_CONV_ARGS " -> ()");
  m.def("check_norm_conv_backward" RF_NORM_CONV_BACKWARD_ARGS " -> ()");
}
