"""BatchNorm (+ residual add) (+ ReLU): the fused end of every conv unit and residual block.

Formula: :func:`resnet_fast.ops.reference.batch_norm_act`. Kernels: ``csrc/cpu/batch_norm_act.cpp``
(loops in ``csrc/cpu/batch_norm_act/``), ``csrc/cuda/batch_norm_act.cu``,
``resnet_fast/triton/batch_norm_act.py``; per-element math in ``csrc/common/batch_norm_act.h``;
routing in :func:`resnet_fast._routing.batch_norm_act_impl`. The op returns the mean and variance
it normalised with; the running statistics are updated here, as nn.BatchNorm2d does, so that the
op itself mutates nothing.

Autograd: the extension's op has it in C++ (``csrc/autograd.cpp``: no Python on the path, about
100 us less per call); the Triton op has the same rules in Python (:func:`register_autograd`), and
``tests/ops/test_batch_norm_act.py`` runs the same gradient cases through both. The backward op's
own derivative (double backward: gradient penalties, MAML) is :func:`_double_backward`, the same
for every implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _backend, _routing
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
    return_stats: bool = False,
):
    """``relu(batch_norm(x) + r)``, with ``r`` the residual subsampled by ``residual_stride`` and
    zero-padded to x's channels (the option-A shortcut read in place); see the formula. With
    ``return_stats``, ``(y, mean, var)``: the statistics the kernel normalised with (None, None
    from the formula)."""
    impl = _routing.batch_norm_act_impl(x, weight, bias)
    if impl == "eager":
        if residual is not None and (residual_stride != 1 or residual.shape[1] != x.shape[1]):
            residual = reference.zero_pad_shortcut(residual, x.shape[1], residual_stride)
        y = reference.batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu)
        return (y, None, None) if return_stats else y
    if training and x.numel() > 0:
        check_batch_stats_shape(x.shape)
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
    if training and x.numel() > 0:
        update_running_stats(impl, running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    return (y, mean, var) if return_stats else y


def check_batch_stats_shape(x_shape) -> None:
    """The error nn.BatchNorm2d gives (type and words) where a channel has a single value."""
    if x_shape[0] * x_shape[2] * x_shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(x_shape)}")


def update_running_stats(
    impl: str, running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, momentum: float, n: int
) -> None:
    """nn.BatchNorm2d's update of the running statistics (where it has them) from a batch's mean and
    biased variance over ``n`` values a channel, which the op ``impl`` returned."""
    if running_mean is None or running_var is None:
        return
    if impl == "cpu" and running_mean.is_contiguous() and running_var.is_contiguous():
        # One C++ op (in double, as ATen's batch_norm) in place of the seven below.
        torch.ops.resnet_fast.batch_norm_update_stats_(running_mean, running_var, mean, var, momentum, n)
    else:
        with torch.no_grad():
            # As nn.BatchNorm2d: running = (1 - momentum) * running + momentum * batch, with the
            # unbiased variance.
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (n / max(n - 1, 1))).to(running_var.dtype), alpha=momentum)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


# -- what every namespace gets ----------------------------------------------------------------


def register_fakes(ns: str) -> None:
    """Fake kernels of ``{ns}::batch_norm_act`` and ``{ns}::batch_norm_act_backward``."""

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


def _backward_formula(grad_y, x, weight, mask, mean, var, training: bool, eps: float):
    """The backward of the formula as differentiable PyTorch ops (csrc/common/batch_norm_act.h has
    the same math): (grad_x, grad_weight, grad_bias, dz) from the incoming gradient, x and the
    weight, with the ReLU mask held fixed (its derivative is zero wherever it is defined). In
    training the statistics are recomputed from x, so that their dependence on x is differentiated
    too; in eval they are the running statistics, constants."""
    acc = _acc_dtype(x)
    dims = (0, 2, 3)
    xa, dz = x.to(acc), grad_y.to(acc)
    if mask is not None:
        dz = dz * mask
    if training:
        mu, v = xa.mean(dims), xa.var(dims, unbiased=False)
    else:
        mu, v = mean.to(acc), var.to(acc)
    invstd = torch.rsqrt(v + eps)
    xhat = (xa - mu[None, :, None, None]) * invstd[None, :, None, None]
    grad_bias = dz.sum(dims)
    grad_weight = (dz * xhat).sum(dims)
    scale = (weight.to(acc) * invstd)[None, :, None, None]
    if training:
        m = x.numel() // x.shape[1]
        grad_x = scale * (dz - (grad_bias / m)[None, :, None, None] - xhat * (grad_weight / m)[None, :, None, None])
    else:
        grad_x = scale * dz
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), dz.to(x.dtype)


def _relu_mask(x, output, weight, bias, mean, var, eps):
    """The forward's ReLU mask, a constant: from its output where kept, else from x through the
    forward's affine (the CPU kernels keep no output where the unit has no residual)."""
    with torch.no_grad():
        if output is not None and output.shape == x.shape:
            return output > 0
        acc = _acc_dtype(x)
        scale = weight.to(acc) * torch.rsqrt(var.to(acc) + eps)
        shift = bias.to(acc) - mean.to(acc) * scale
        return x.to(acc) * scale[None, :, None, None] + shift[None, :, None, None] > 0


def _double_backward(ctx, gg_x, gg_weight, gg_bias, gg_z):
    """The derivative of ``batch_norm_act_backward``: the vector-Jacobian product of
    :func:`_backward_formula` with the cotangents of its outputs, for the incoming gradient, x and
    the weight (the bias, the output and the statistics enter only through the ReLU mask, or are
    recomputed from x). Partial derivatives, by ``torch.func.vjp``: the saved tensors carry the
    outer graph's history (the incoming gradient depends on x through the later layers), which
    ``torch.autograd.grad`` would differentiate through as well; and under create_graph the result
    stays differentiable, so a third derivative goes on through it."""
    grad_y, x, output, weight, mean, var, bias = ctx.saved_tensors
    mask = _relu_mask(x, output, weight, bias, mean, var, ctx.eps) if ctx.relu else None

    def backward(gy, xx, ww):
        return _backward_formula(gy, xx, ww, mask, mean, var, ctx.training, ctx.eps)

    outs, vjp = torch.func.vjp(backward, grad_y, x, weight)
    cotangents = tuple(
        torch.zeros_like(o) if g is None or g.numel() == 0 else g.to(o.dtype)
        for o, g in zip(outs, (gg_x, gg_weight, gg_bias, gg_z))
    )
    d_grad_y, d_x, d_weight = vjp(cotangents)
    needs = ctx.needs_input_grad
    # Inputs: grad_y, x, output, weight, mean, var, training, eps, relu, residual_grad, bias.
    return (
        d_grad_y if needs[0] else None, d_x if needs[1] else None, None, d_weight if needs[3] else None,
        None, None, None, None, None, None, None,
    )


def _setup_double_backward(ctx, inputs, output):
    grad_y, x, y, weight, mean, var, training, eps, relu, _residual_grad, bias = inputs
    ctx.save_for_backward(grad_y, x, y, weight, mean, var, bias)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu


def register_double_backward(ns: str) -> None:
    """``{ns}::batch_norm_act_backward`` is differentiable (:func:`_double_backward`)."""
    torch.library.register_autograd(
        f"{ns}::batch_norm_act_backward", _double_backward, setup_context=_setup_double_backward
    )


# -- the Triton namespace: autograd in Python -------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, weight, bias, _rm, _rv, residual, residual_stride, training, eps, relu = inputs
    y, mean, var = output
    ctx.save_for_backward(x, y if relu else None, weight, mean, var)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.residual_shape = None if residual is None else tuple(residual.shape)
    ctx.residual_stride = residual_stride


def _make_backward(ops):
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

    return _backward


def register_autograd(ns: str) -> None:
    """The autograd of ``{ns}::batch_norm_act`` in Python: the rules of csrc/autograd.cpp (which
    the extension's op uses), with the output kept for the ReLU mask."""
    torch.library.register_autograd(
        f"{ns}::batch_norm_act", _make_backward(getattr(torch.ops, ns)), setup_context=_setup_context
    )


# -- the extension only: the CPU's two-op backward and the statistics update ------------------


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "resnet_fast: batch_norm_act_backward_reduce/_input are not differentiable; under create_graph=True the "
        "backward runs batch_norm_act_backward, which is (this is a bug if you see it)"
    )


def register_extension() -> None:
    """Fake kernels of the extension's CPU-only ops. The two-op backward runs only when no
    second derivative is asked for (csrc/autograd.cpp takes batch_norm_act_backward then)."""

    @torch.library.register_fake("resnet_fast::batch_norm_update_stats_")
    def _(running_mean, running_var, mean, var, momentum, count):
        return None

    @torch.library.register_fake("resnet_fast::batch_norm_act_backward_reduce")
    def _(grad_y, x, output, weight, mean, var, eps, relu, bias=None):
        c = x.shape[1]
        return _like(x), x.new_empty((c,), dtype=torch.float64), x.new_empty((c,), dtype=torch.float64)

    @torch.library.register_fake("resnet_fast::batch_norm_act_backward_input")
    def _(grad_z, x, weight, mean, var, sum_dz, sum_dzxmu, training, eps):
        c = x.shape[1]
        return _like(x), weight.new_empty((c,)), weight.new_empty((c,))

    for name in ("batch_norm_act_backward_reduce", "batch_norm_act_backward_input"):
        torch.library.register_autograd(
            f"resnet_fast::{name}", _no_double_backward, setup_context=lambda ctx, inputs, output: None
        )


if _backend.extension_available():
    register_fakes("resnet_fast")
    register_double_backward("resnet_fast")
    register_extension()
