"""The Triton implementation of every fused op, as custom ops ``torch.ops.resnet_fast_triton.*``.

They have the schemas of the C++ ops (csrc/ops.cpp) and the same fake kernels and autograd
(registered by resnet_fast/ops/<op>.py), so torch.compile traces them without a graph break and
the models switch between implementations by namespace alone. The kernels are in
:mod:`resnet_fast.triton.kernels`. Imported by :mod:`resnet_fast.ops` when Triton can run (a CUDA
device, or ``TRITON_INTERPRET=1`` set before import for CPU tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.batch_norm_act import register as _register_batch_norm_act
from ..ops.bias_act import register as _register_bias_act
from ..ops.zero_pad_shortcut import register as _register_zero_pad_shortcut
from . import kernels

NAMESPACE = "resnet_fast_triton"

SCHEMAS = {
    "zero_pad_shortcut": "zero_pad_shortcut(Tensor x, int out_channels, int stride) -> Tensor",
    "zero_pad_shortcut_backward": "zero_pad_shortcut_backward(Tensor grad_out, SymInt[] input_size, int stride) -> Tensor",
    "batch_norm_act": (
        "batch_norm_act(Tensor x, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, "
        "Tensor? residual, int residual_stride, bool training, float eps, bool relu) -> (Tensor, Tensor, Tensor)"
    ),
    "batch_norm_act_backward": (
        "batch_norm_act_backward(Tensor grad_y, Tensor x, Tensor? output, Tensor weight, Tensor mean, Tensor var, "
        "bool training, float eps, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "bias_act": "bias_act(Tensor x, Tensor bias, Tensor? residual, int residual_stride, bool relu) -> Tensor",
}


def _check(cond: bool, message) -> None:
    if not cond:
        raise RuntimeError(message() if callable(message) else message)


def _check_device(*tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type == "cpu" and not kernels.INTERPRET:
            raise RuntimeError(
                "resnet_fast_triton ops run CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set before import"
            )


def _check_residual(x: Tensor, residual: Tensor | None, stride: int, op: str) -> None:
    if residual is None:
        return
    _check(stride >= 1, f"{op}: expected residual_stride >= 1, got {stride}")
    n, c, h, w = x.shape
    ok = (
        residual.dim() == 4
        and residual.shape[0] == n
        and residual.shape[1] <= c
        and (residual.shape[2] + stride - 1) // stride == h
        and (residual.shape[3] + stride - 1) // stride == w
    )
    _check(ok, lambda: f"{op}: a residual of shape {tuple(residual.shape)} read with stride {stride} does not fit an output of shape {tuple(x.shape)}")
    _check(residual.dtype == x.dtype, lambda: f"{op}: the residual must have the input's dtype ({x.dtype}), got {residual.dtype}")


def zero_pad_shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    _check_device(x)
    _check(x.dim() == 4, lambda: f"zero_pad_shortcut: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    _check(stride >= 1, f"zero_pad_shortcut: expected stride >= 1, got {stride}")
    _check(out_channels >= x.shape[1], lambda: f"zero_pad_shortcut: out_channels ({out_channels}) must be at least the input's channels ({x.shape[1]})")
    _check(x.is_floating_point(), lambda: f"zero_pad_shortcut: expected a floating-point input, got {x.dtype}")
    return kernels.zero_pad_shortcut(x, out_channels, stride)


def zero_pad_shortcut_backward(grad_out: Tensor, input_size: list[int], stride: int) -> Tensor:
    _check_device(grad_out)
    _check(grad_out.dim() == 4 and len(input_size) == 4, "zero_pad_shortcut_backward: expected a 4-D grad_out and a 4-element input_size")
    _check(stride >= 1, f"zero_pad_shortcut_backward: expected stride >= 1, got {stride}")
    n, c, h, w = input_size
    fits = (grad_out.shape[0] == n and grad_out.shape[1] >= c and grad_out.shape[2] == (h + stride - 1) // stride
            and grad_out.shape[3] == (w + stride - 1) // stride)
    _check(fits, lambda: f"zero_pad_shortcut_backward: grad_out of shape {tuple(grad_out.shape)} does not fit an input of shape {list(input_size)} with stride {stride}")
    return kernels.zero_pad_shortcut_backward(grad_out, list(input_size), stride)


def batch_norm_act(x, weight, bias, running_mean, running_var, residual, residual_stride, training, eps, relu):
    _check_device(x, weight, bias, residual)
    _check(x.dim() == 4, lambda: f"batch_norm_act: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    _check(x.is_floating_point(), lambda: f"batch_norm_act: expected a floating-point input, got {x.dtype}")
    c = x.shape[1]
    _check(weight.numel() == c and bias.numel() == c, lambda: f"batch_norm_act: expected weight and bias of {c} elements (one per channel), got {weight.numel()} and {bias.numel()}")
    _check(training or (running_mean is not None and running_var is not None), "batch_norm_act: eval mode needs running_mean and running_var")
    if training:
        _check(x.numel() == 0 or x.shape[0] * x.shape[2] * x.shape[3] > 1, lambda: f"Expected more than 1 value per channel when training, got input size {x.size()}")
    _check_residual(x, residual, residual_stride, "batch_norm_act")
    return kernels.batch_norm_act(x, weight, bias, running_mean, running_var, residual, residual_stride, training, eps, relu)


def batch_norm_act_backward(grad_y, x, output, weight, mean, var, training, eps, relu, residual_grad):
    _check_device(grad_y, x)
    _check(grad_y.shape == x.shape, lambda: f"batch_norm_act_backward: expected grad_y of shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    _check(not relu or (output is not None and output.shape == x.shape), "batch_norm_act_backward: relu needs the forward's output")
    return kernels.batch_norm_act_backward(grad_y, x, output, weight, mean, var, training, eps, relu, residual_grad)


def bias_act(x, bias, residual, residual_stride, relu):
    _check_device(x, bias, residual)
    _check(x.dim() == 4, lambda: f"bias_act: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    _check(bias.numel() == x.shape[1], lambda: f"bias_act: expected a bias of {x.shape[1]} elements, got {bias.numel()}")
    _check_residual(x, residual, residual_stride, "bias_act")
    return kernels.bias_act(x, bias, residual, residual_stride, relu)


_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    for _key in ("CUDA", "CPU"):
        _lib.impl(_name, globals()[_name], _key)

_register_batch_norm_act(NAMESPACE)
_register_bias_act(NAMESPACE)
_register_zero_pad_shortcut(NAMESPACE)

__all__ = ["NAMESPACE", "SCHEMAS", "kernels"]
