"""The option-A zero-padding shortcut: registration (fake kernels, autograd) and routing.

Formula: :func:`resnet_fast.ops.reference.zero_pad_shortcut`. Kernels: ``csrc/cpu/zero_pad_shortcut.cpp``,
``csrc/cuda/zero_pad_shortcut.cu``, ``resnet_fast/triton/zero_pad_shortcut.py``; shared math in
``csrc/common/zero_pad_shortcut.h``. Autograd: the extension's op has it in C++ (``csrc/autograd.cpp``),
the Triton op the same rule here (:func:`register_autograd`); the backward is linear, and its own
derivative is the forward again (:func:`register_double_backward`, every namespace).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _backend, _routing
from . import reference


def zero_pad_shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """Subsample ``x`` by ``stride`` and append ``out_channels - C`` zero channels (differentiable)."""
    impl = _routing.elementwise_impl("zero_pad_shortcut", x)
    if impl == "eager" or x.dim() != 4:
        return reference.zero_pad_shortcut(x, out_channels, stride)
    return _backend.ops_for(impl).zero_pad_shortcut(x, out_channels, stride)


def _out_size(size: int, stride: int) -> int:
    return (size + stride - 1) // stride


def register_fakes(ns: str) -> None:
    """Fake kernels of ``{ns}::zero_pad_shortcut`` and its backward."""

    @torch.library.register_fake(f"{ns}::zero_pad_shortcut")
    def _(x, out_channels, stride):
        torch._check(x.dim() == 4, lambda: f"zero_pad_shortcut: expected a 4-D input, got {x.dim()}-D")
        torch._check(stride >= 1, lambda: f"zero_pad_shortcut: expected stride >= 1, got {stride}")
        torch._check(out_channels >= x.shape[1], lambda: "zero_pad_shortcut: out_channels < input channels")
        n, _c, h, w = x.shape
        return torch.empty(
            (n, out_channels, _out_size(h, stride), _out_size(w, stride)),
            dtype=x.dtype,
            device=x.device,
            memory_format=suggest_memory_format(x),
        )

    @torch.library.register_fake(f"{ns}::zero_pad_shortcut_backward")
    def _(grad_out, input_size, stride):
        return torch.empty(
            tuple(input_size), dtype=grad_out.dtype, device=grad_out.device, memory_format=suggest_memory_format(grad_out)
        )


def register_double_backward(ns: str) -> None:
    """The backward is linear; its derivative is the forward again."""
    ops = getattr(torch.ops, ns)

    def setup_context(ctx, inputs, output):
        grad_out, _input_size, stride = inputs
        ctx.out_channels = grad_out.shape[1]
        ctx.stride = stride

    def backward(ctx, grad):
        grad_grad_out = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = ops.zero_pad_shortcut(grad, ctx.out_channels, ctx.stride)
        return grad_grad_out, None, None

    torch.library.register_autograd(f"{ns}::zero_pad_shortcut_backward", backward, setup_context=setup_context)


def register_autograd(ns: str) -> None:
    """The autograd of ``{ns}::zero_pad_shortcut`` in Python (the Triton op; the extension's is in C++)."""
    ops = getattr(torch.ops, ns)

    def setup_context(ctx, inputs, output):
        x, _out_channels, stride = inputs
        ctx.input_size = tuple(x.shape)
        ctx.stride = stride

    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.zero_pad_shortcut_backward(grad, list(ctx.input_size), ctx.stride)
        return grad_x, None, None

    torch.library.register_autograd(f"{ns}::zero_pad_shortcut", backward, setup_context=setup_context)


if _backend.extension_available():
    register_fakes("resnet_fast")
    register_double_backward("resnet_fast")
