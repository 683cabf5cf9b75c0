"""BatchNorm (+ residual add) (+ ReLU): the fused end of every conv unit and residual block.

Formula: :func:`resnet_fast.ops.reference.batch_norm_act`. Kernels: ``csrc/cpu/batch_norm_act.cpp``
(loops in ``csrc/cpu/batch_norm_act_kernels.inc``), ``csrc/cuda/batch_norm_act.cu``,
``resnet_fast/triton/kernels.py``; per-element math in ``csrc/common/batch_norm_act.h``. The op returns the mean and variance it normalised with; the
running statistics are updated here, like nn.BatchNorm2d does, so the op itself mutates nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _backend
from . import reference


def batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    residual: Tensor | None = None,
    relu: bool = True,
    residual_stride: int = 1,
) -> Tensor:
    """``relu(batch_norm(x) + r)``, with ``r`` the residual subsampled by ``residual_stride`` and
    zero-padded to x's channels (the option-A shortcut read in place); see the formula."""
    impl = _backend.resolve("batch_norm_act", x.device)
    if impl == "eager" or weight is None or bias is None:
        if residual is not None and (residual_stride != 1 or residual.shape[1] != x.shape[1]):
            residual = reference.zero_pad_shortcut(residual, x.shape[1], residual_stride)
        return reference.batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu)
    if training and x.dim() == 4 and x.numel() > 0 and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        # The same error (type and words) as torch.nn.functional.batch_norm.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    y, mean, var = _backend.ops_for(impl).batch_norm_act(
        x,
        weight,
        bias,
        None if training else running_mean,
        None if training else running_var,
        residual,
        residual_stride,
        training,
        eps,
        relu,
    )
    if training and running_mean is not None and running_var is not None and x.numel() > 0:
        n = x.numel() // x.shape[1]
        if impl == "cpu" and running_mean.is_contiguous() and running_var.is_contiguous():
            # One C++ op (in double, as ATen's batch_norm) in place of the seven below.
            torch.ops.resnet_fast.batch_norm_update_stats_(running_mean, running_var, mean, var, momentum, n)
        else:
            with torch.no_grad():
                # As nn.BatchNorm2d: running = (1 - momentum) * running + momentum * batch, with the
                # unbiased variance.
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (n / max(n - 1, 1))).to(running_var.dtype), alpha=momentum)
    return y


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def register(ns: str) -> None:
    """Fake kernels and autograd for ``{ns}::batch_norm_act`` (and its backward)."""
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::batch_norm_act")
    def _(x, weight, bias, running_mean, running_var, residual, residual_stride, training, eps, relu):
        torch._check(x.dim() == 4, lambda: f"batch_norm_act: expected a 4-D input, got {x.dim()}-D")
        c = x.shape[1]
        return _like(x), x.new_empty((c,), dtype=_acc_dtype(x)), x.new_empty((c,), dtype=_acc_dtype(x))

    @torch.library.register_fake(f"{ns}::batch_norm_act_backward")
    def _(grad_y, x, output, weight, mean, var, training, eps, relu, residual_grad, bias=None):
        c = x.shape[1]
        grad_residual = _like(x) if residual_grad else x.new_empty((0,))
        return _like(x), weight.new_empty((c,)), weight.new_empty((c,)), grad_residual

    if ns == "resnet_fast":  # the backward in two ops (CPU), for the end of a residual block; the stats update

        @torch.library.register_fake(f"{ns}::batch_norm_update_stats_")
        def _(running_mean, running_var, mean, var, momentum, count):
            return None

        @torch.library.register_fake(f"{ns}::batch_norm_act_backward_reduce")
        def _(grad_y, x, output, weight, mean, var, eps, relu, bias=None):
            c = x.shape[1]
            return _like(x), x.new_empty((c,), dtype=torch.float64), x.new_empty((c,), dtype=torch.float64)

        @torch.library.register_fake(f"{ns}::batch_norm_act_backward_input")
        def _(grad_z, x, weight, mean, var, sum_dz, sum_dzxmu, training, eps):
            c = x.shape[1]
            return _like(x), weight.new_empty((c,)), weight.new_empty((c,))

    # (The extension's own op has this autograd in C++, csrc/autograd.cpp, which also lets its CPU
    # kernel recompute the ReLU mask from x instead of keeping y.)
    def _setup_context(ctx, inputs, output):
        x, weight, _bias, _rm, _rv, residual, residual_stride, training, eps, relu = inputs
        y, mean, var = output
        ctx.save_for_backward(x, y if relu else None, weight, mean, var)
        ctx.training, ctx.eps, ctx.relu = training, eps, relu
        ctx.residual_shape = None if residual is None else tuple(residual.shape)
        ctx.residual_stride = residual_stride

    def _backward(ctx, grad_y, _grad_mean, _grad_var):
        x, y, weight, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        residual_grad = ctx.residual_shape is not None and needs[5]
        grad_x, grad_weight, grad_bias, grad_z = ops.batch_norm_act_backward(
            grad_y, x, y, weight, mean, var, ctx.training, ctx.eps, ctx.relu, residual_grad
        )
        grad_residual = None
        if residual_grad:
            grad_residual = grad_z
            if ctx.residual_shape != tuple(x.shape):  # the option-A shortcut: back to the block input
                grad_residual = ops.zero_pad_shortcut_backward(grad_z, list(ctx.residual_shape), ctx.residual_stride)
        return (
            grad_x if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None,
            None,
            grad_residual,
            None,
            None,
            None,
            None,
        )

    if ns != "resnet_fast":  # the extension's op: csrc/autograd.cpp
        torch.library.register_autograd(f"{ns}::batch_norm_act", _backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "resnet_fast: double backward through batch_norm_act is not supported; run this model with "
            "resnet_fast.set_backend('eager') to differentiate twice"
        )

    backward_ops = ["batch_norm_act_backward"]
    if ns == "resnet_fast":
        backward_ops += ["batch_norm_act_backward_reduce", "batch_norm_act_backward_input"]
    for name in backward_ops:
        torch.library.register_autograd(
            f"{ns}::{name}", _no_double_backward, setup_context=lambda ctx, inputs, output: None
        )


if _backend.extension_available():
    register("resnet_fast")
