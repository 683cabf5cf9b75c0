"""The residual nets' 3x3 convolution (padding 1, no bias, stride 1 or 2) for training on the CPU,
with our weight gradient: oneDNN computed ResNet-20's at 125-140 GFLOP/s, two thirds of what its
forward and input gradient reach; the AVX2 kernel in ``csrc/cpu/conv3x3_train.cpp`` runs at 150-190.
On wide stride-1 maps the forward and the input gradient run by Winograd F(2x2, 3x3)
(``csrc/cpu/winograd.cpp``), and on AVX-512 CPUs from 32 channels the stride-1 weight gradient
too (same file: 16 multiplies where the direct one does 36; oneDNN's took 1.0-2.0x its time on
ResNet-20's and ResNet-50's).

Formula: :func:`resnet_fast.ops.reference.conv3x3_train` and
:func:`resnet_fast.ops.reference.conv3x3_weight_grad`. Which parts run by which kernel is
:func:`resnet_fast._routing.conv3x3_train_plan`'s decision, passed to the op as arguments. Given
the BatchNorm that made its input (the ``bn_*`` arguments, where
:func:`resnet_fast._routing.recomputes_conv_input`), the op keeps that BatchNorm's input for its
backward instead of its own, and the weight gradient recomputes ``relu(bn(x))`` as it loads x (a
BatchNorm prologue). The op's autograd is in ``csrc/autograd.cpp``; the weight gradient's own (for
double backward) is here.
GPUs keep PyTorch's convolution (cuDNN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _routing
from . import reference


def conv3x3_train(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding=1)`` for a (K, C, 3, 3) weight. Our op runs
    where :func:`resnet_fast._routing.conv3x3_train_plan` has a plan (float32 CPU tensors whose
    weight gradient will be computed); anything else is PyTorch's convolution."""
    plan = _routing.conv3x3_train_plan(x, weight, stride)
    if plan is None:
        return reference.conv3x3_train(x, weight, stride)
    return torch.ops.resnet_fast.conv3x3_train(
        x, weight, stride, plan.winograd, plan.weight_grad_kernel, **plan.op_kwargs()
    )


def register() -> None:
    """Fake kernels of ``resnet_fast::conv3x3_train``, ``resnet_fast::conv3x3_weight_grad`` and
    ``resnet_fast::conv3x3_input_grad``, and the two gradients' own autograd (for double backward, e.g. a gradient penalty); the
    convolution's autograd is in C++."""

    @torch.library.register_fake("resnet_fast::conv3x3_train")
    def _(x, weight, stride, winograd, weight_grad_kernel, bn_input=None, bn_weight=None, bn_bias=None, bn_mean=None,
          bn_var=None, bn_eps=0.0, bn_training=True, bn_conv_weight=None, bn_conv_stride=1, bn_conv_padding=0,
          winograd_tiles=False, weight_grad_winograd=False, direct=False):
        # PyTorch's convolution on the fake tensors: its shape checks and output layout (Winograd's
        # and the direct kernel's output is channels_last whatever the input's).
        y = F.conv2d(x, weight, None, stride, 1)
        return y.contiguous(memory_format=torch.channels_last) if winograd or direct else y

    @torch.library.register_fake("resnet_fast::conv3x3_weight_grad")
    def _(grad_out, x, stride, kernel, bn_weight=None, bn_bias=None, bn_mean=None, bn_var=None, bn_eps=0.0,
          winograd=False):
        torch._check(x.dim() == 4 and grad_out.dim() == 4, lambda: "conv3x3_weight_grad: expected 4-D tensors")
        return torch.empty(
            (grad_out.shape[1], x.shape[1], 3, 3), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )

    # dW is bilinear in (grad_out, x): <V, dW> = sum(grad_out * conv3x3(x, V)), so its gradients
    # for a cotangent V are conv3x3(x, V) and the input gradient of that convolution.
    # With a BatchNorm prologue the op is the backward's, never differentiated (under create_graph
    # the input is recomputed by batch_norm_act and passed without one).
    def setup_context(ctx, inputs, output):
        grad_out, x, stride, _kernel, bn_weight, bn_bias, bn_mean, bn_var, _eps, _winograd = inputs
        ctx.save_for_backward(grad_out, x)
        ctx.stride = stride
        ctx.prologue = any(t is not None for t in (bn_weight, bn_bias, bn_mean, bn_var))

    def backward(ctx, v):
        if ctx.prologue:
            raise RuntimeError(
                "resnet_fast::conv3x3_weight_grad with a BatchNorm prologue (bn_*) is not differentiable; pass "
                "the recomputed input instead"
            )
        grad_out, x = ctx.saved_tensors
        s = ctx.stride
        d_grad_out = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad_out = F.conv2d(x, v, None, s, 1)
        if ctx.needs_input_grad[1]:
            d_x = torch.ops.aten.convolution_backward(
                grad_out, x, v, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        return d_grad_out, d_x, None, None, None, None, None, None, None, None

    torch.library.register_autograd("resnet_fast::conv3x3_weight_grad", backward, setup_context=setup_context)

    @torch.library.register_fake("resnet_fast::conv3x3_input_grad")
    def _(grad_out, weight, stride, input_size):
        torch._check(grad_out.dim() == 4 and len(input_size) == 4, lambda: "conv3x3_input_grad: expected 4-D shapes")
        return torch.empty(input_size, dtype=grad_out.dtype, device=grad_out.device, memory_format=torch.channels_last)

    # dx = conv3x3_input_grad(dy, w) is bilinear in (dy, w): <V, dx> = sum(dy * conv3x3(V, w)), so
    # for a cotangent V its gradients are conv3x3(V, w) and the weight gradient of (dy, V).
    def setup_input_grad(ctx, inputs, output):
        grad_out, weight, stride, _size = inputs
        ctx.save_for_backward(grad_out, weight)
        ctx.stride = stride

    def input_grad_backward(ctx, v):
        grad_out, weight = ctx.saved_tensors
        s = ctx.stride
        d_grad_out = d_weight = None
        if ctx.needs_input_grad[0]:
            d_grad_out = F.conv2d(v, weight, None, s, 1)
        if ctx.needs_input_grad[1]:
            d_weight = torch.ops.aten.convolution_backward(
                grad_out, v, weight, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
            )[1]
        return d_grad_out, d_weight, None, None

    torch.library.register_autograd(
        "resnet_fast::conv3x3_input_grad", input_grad_backward, setup_context=setup_input_grad
    )


if _backend.extension_available():
    register()
