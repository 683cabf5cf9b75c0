"""The inference epilogue: ``relu(x + bias[c] + residual)`` after a convolution with BatchNorm
folded into its weights (used on GPUs, where the convolution is cuDNN's; on the CPU the same
epilogue runs as oneDNN post-ops of the convolution).

Formula: :func:`resnet_fast.ops.reference.bias_act`. Kernels: ``csrc/cpu/bias_act.cpp`` (the BN
apply loops with a scale of 1), ``csrc/cuda/batch_norm_act.cu`` and
``resnet_fast/triton/batch_norm_act.py`` (the same apply kernels as batch_norm_act's). Autograd in
Python for every namespace (differentiable PyTorch ops, so double backward works too).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _backend, _routing
from . import reference


def bias_act(x: Tensor, bias: Tensor, residual: Tensor | None = None, relu: bool = True, residual_stride: int = 1) -> Tensor:
    """``relu(x + bias[c] + r)``, with ``r`` the residual read as by :func:`batch_norm_act`
    (subsampled by ``residual_stride``, zero-padded to x's channels)."""
    impl = _routing.elementwise_impl("bias_act", x)
    if impl == "eager" or x.dim() != 4:
        if residual is not None and (residual_stride != 1 or residual.shape[1] != x.shape[1]):
            residual = reference.zero_pad_shortcut(residual, x.shape[1], residual_stride)
        return reference.bias_act(x, bias, residual, relu)
    return _backend.ops_for(impl).bias_act(x, bias, residual, residual_stride, relu)


def register(ns: str) -> None:
    """Fake kernel and autograd of ``{ns}::bias_act`` (every namespace)."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::bias_act")
    def _(x, bias, residual, residual_stride, relu):
        torch._check(x.dim() == 4, lambda: f"bias_act: expected a 4-D input, got {x.dim()}-D")
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))

    def setup_context(ctx, inputs, output):
        _x, bias, residual, residual_stride, relu = inputs
        ctx.save_for_backward(output if relu else None)
        ctx.relu, ctx.bias_dtype = relu, bias.dtype
        ctx.residual_shape = None if residual is None else tuple(residual.shape)
        ctx.residual_stride = residual_stride

    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        dz = grad * (y > 0) if ctx.relu else grad
        grad_residual = None
        if ctx.residual_shape is not None and ctx.needs_input_grad[2]:
            grad_residual = dz
            if ctx.residual_shape != tuple(dz.shape):
                grad_residual = ops.zero_pad_shortcut_backward(dz, list(ctx.residual_shape), ctx.residual_stride)
        acc = torch.float64 if dz.dtype == torch.float64 else torch.float32  # (float32 sums for half types)
        grad_bias = dz.sum((0, 2, 3), dtype=acc).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return dz, grad_bias, grad_residual, None, None

    torch.library.register_autograd(f"{ns}::bias_act", backward, setup_context=setup_context)


if _backend.extension_available():
    register("resnet_fast")
