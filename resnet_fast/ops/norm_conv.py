"""Issue 18's "NormConvolution" forward, for GPUs: a convolution that applies the previous
BatchNorm's scale and shift and ReLU to its input as it loads it, and reduces its own output to
the next BatchNorm's batch statistics in its epilogue, so that neither the normalised activation
is written nor the output read again for its statistics.

Formula: :func:`resnet_fast.ops.reference.norm_conv`. Kernel: ``resnet_fast/triton/norm_conv.py``
(Triton only; under ``TRITON_INTERPRET=1`` on CPU tensors, which is how it is tested here). Schema
and argument check: ``csrc/ops.cpp``, ``csrc/checks.cpp``. Routing: the residual blocks train
through it (:func:`resnet_fast.nn.functional.norm_conv_block`) only where
``RESNET_FAST_NORM_CONV=1`` (:func:`resnet_fast._routing.norm_conv_block_applies`), off by default
until a GPU has measured it faster than cuDNN's convolutions and the fused BatchNorm
(``bench/test_gpu.py::test_gpu_norm_conv_*``).

Autograd (:func:`register_autograd`): the fused backward, ``norm_conv_backward`` (the same
kernel file: the statistics' gradients folded into y's as it is loaded, the data gradient with the
ReLU mask, the scale and the scale's and shift's reductions in its epilogue, the weight gradient
with the normalised input recomputed in its prologue). Under ``create_graph`` (a gradient penalty,
double backward) the backward is :func:`_backward_eager` instead, the same formula in PyTorch's
ops, which autograd differentiates again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend


def norm_conv(
    x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, scale: Tensor | None = None,
    shift: Tensor | None = None, relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: ``y = conv2d([relu](x * scale[c] + shift[c]), weight, stride, padding)``
    and the batch's mean and biased variance of each of y's channels (float64 for float64 inputs,
    else float32). Runs the Triton kernel (a CUDA device, or CPU tensors under the interpreter)."""
    if not _backend.triton_available():
        raise RuntimeError(f"norm_conv runs by Triton, which cannot run here: {_backend.triton_error()}")
    return torch.ops.resnet_fast_triton.norm_conv(x, weight, stride, padding, scale, shift, relu)


def register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::norm_conv")
    def _(x, weight, stride, padding, scale, shift, relu):
        n, _, h, w = x.shape
        r = weight.shape[-1]
        shape = (n, weight.shape[0], (h + 2 * padding - r) // stride + 1, (w + 2 * padding - r) // stride + 1)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        k = weight.shape[0]
        return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
                x.new_empty((k,), dtype=acc), x.new_empty((k,), dtype=acc))

    @torch.library.register_fake(f"{ns}::norm_conv_backward")
    def _(grad_y, x, weight, stride, padding, scale, shift, relu, y, mean, grad_mean, grad_var, output_mask):
        empty = x.new_empty(0)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if output_mask[0] else empty
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if output_mask[1] else empty
        with_ss = output_mask[2] and scale is not None
        return (grad_x, grad_w, torch.empty_like(scale) if with_ss else empty,
                torch.empty_like(shift) if with_ss else empty)


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, scale, shift, relu = inputs
    y, mean, _var = output
    ctx.conv = (stride, padding, relu)
    ctx.save_for_backward(x, weight, scale, shift, y, mean)


def _backward(ctx, grad_y, grad_mean, grad_var):
    if torch.is_grad_enabled():  # create_graph: a backward that autograd can differentiate
        return _backward_eager(ctx, grad_y, grad_mean, grad_var)
    x, weight, scale, shift, y, mean = ctx.saved_tensors
    stride, padding, relu = ctx.conv
    need = ctx.needs_input_grad
    mask = [need[0], need[1], scale is not None and (need[4] or need[5])]
    grad_x, grad_weight, grad_scale, grad_shift = ctx.backward_op(
        grad_y, x, weight, stride, padding, scale, shift, relu, y, mean, grad_mean, grad_var, mask
    )
    return (grad_x if need[0] else None, grad_weight if need[1] else None, None, None,
            grad_scale if mask[2] and need[4] else None, grad_shift if mask[2] and need[5] else None, None)


def _backward_eager(ctx, grad_y, grad_mean, grad_var):
    """The backward in PyTorch's ops (differentiable): the statistics' gradients folded into y's,
    the normalised input recomputed, ATen's convolution backward, the prologue's chain rule."""
    x, weight, scale, shift, y, mean = ctx.saved_tensors
    stride, padding, relu = ctx.conv
    count = max(y.numel() // max(y.shape[1], 1), 1)
    # The statistics' gradients join y's: d mean / d y = 1 / count, d var / d y = 2 (y - mean) / count.
    g = torch.zeros_like(y) if grad_y is None else grad_y
    if grad_mean is not None:
        g = g + (grad_mean / count).to(y.dtype).reshape(1, -1, 1, 1)
    if grad_var is not None:
        g = g + (grad_var.reshape(1, -1, 1, 1) * 2 / count * (y - mean.reshape(1, -1, 1, 1))).to(y.dtype)
    pre = x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1) if scale is not None else x
    xin = torch.relu(pre) if relu else pre
    need_x = ctx.needs_input_grad[0] or (scale is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]))
    grad_xin, grad_weight, _ = torch.ops.aten.convolution_backward(
        g, xin, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1,
        [need_x, ctx.needs_input_grad[1], False],
    )
    grad_x = grad_scale = grad_shift = None
    if need_x:
        grad_pre = torch.where(pre > 0, grad_xin, 0) if relu else grad_xin
        if scale is None:
            grad_x = grad_pre
        else:
            grad_x = grad_pre * scale.to(x.dtype).reshape(1, -1, 1, 1) if ctx.needs_input_grad[0] else None
            if ctx.needs_input_grad[4]:
                grad_scale = (grad_pre * x).sum((0, 2, 3)).to(scale.dtype)
            if ctx.needs_input_grad[5]:
                grad_shift = grad_pre.sum((0, 2, 3)).to(shift.dtype)
    return grad_x, grad_weight, None, None, grad_scale, grad_shift, None


def register_autograd(ns: str) -> None:
    """The autograd of ``{ns}::norm_conv`` (see the module docstring)."""
    backward_op = getattr(torch.ops, ns).norm_conv_backward

    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.backward_op = backward_op

    torch.library.register_autograd(f"{ns}::norm_conv", _backward, setup_context=setup_context)
