"""Max pooling without argmax indices, for inference on the CPU: ATen's CPU max_pool2d always
runs max_pool2d_with_indices, writing an int64 index per output value (12.8 MB after ResNet-50's
stem at batch 8, twice the pooled values themselves) that only a backward pass would read.

Formula: :func:`resnet_fast.ops.reference.max_pool2d`. Kernel: ``csrc/cpu/max_pool2d.cpp``.
Routing: :func:`resnet_fast._routing.max_pool2d_impl` (GPUs and anything to differentiate keep
PyTorch's pooling: there the indices are needed).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _backend, _routing
from . import reference


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1, floor mode)."""
    kernel_size = _pair(kernel_size)
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
    padding = _pair(padding)
    if _routing.max_pool2d_impl(x) != "cpu":
        return reference.max_pool2d(x, kernel_size, stride, padding)
    return torch.ops.resnet_fast.max_pool2d(x, kernel_size, stride, padding)


def register() -> None:
    """Fake kernel and autograd of ``resnet_fast::max_pool2d``."""

    @torch.library.register_fake("resnet_fast::max_pool2d")
    def _(x, kernel_size, stride, padding):
        torch._check(x.dim() == 4, lambda: f"max_pool2d: expected a 4-D (N, C, H, W) input, got {x.dim()}-D")
        n, c, h, w = x.shape
        oh = (h + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
        ow = (w + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
        return torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))

    # The op is for inference; a gradient, should one be asked for, recomputes the argmax with
    # PyTorch's pooling (the same window maxima) and scatters through it.
    def setup_context(ctx, inputs, output):
        x, kernel_size, stride, padding = inputs
        ctx.save_for_backward(x)
        ctx.window = (list(kernel_size), list(stride), list(padding))

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding = ctx.window
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, kernel_size, stride, padding, [1, 1], False, indices
        )
        return grad_x, None, None, None

    torch.library.register_autograd("resnet_fast::max_pool2d", backward, setup_context=setup_context)


if _backend.extension_available():
    register()
