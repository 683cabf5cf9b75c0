"""Max pooling on the CPU without ATen's int64 argmax indices.

* Inference (``max_pool2d``): the maxima only. ATen's CPU max_pool2d always runs
  max_pool2d_with_indices, writing an int64 index per output value (12.8 MB after ResNet-50's
  stem at batch 8, twice the pooled values themselves) that only a backward pass would read.
* Training (``max_pool2d_train``): the maxima and each one's position in its window in one byte,
  which is all its backward keeps: PyTorch's pooling keeps its input and the int64 indices (after
  ResNet-50's stem at batch 16: 51 MB and 25.7 MB; ours 3.2 MB). The same maxima, the same
  argmax, the same gradient, bit for bit.

Formulas: :func:`resnet_fast.ops.reference.max_pool2d`, :func:`~resnet_fast.ops.reference.max_pool2d_train`.
Kernels: ``csrc/cpu/max_pool2d.cpp``; the training op's autograd: ``csrc/autograd.cpp``.
Routing: :func:`resnet_fast._routing.max_pool2d_impl` (GPUs keep PyTorch's pooling).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import _backend, _routing
from . import reference


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _window(kernel_size, stride, padding) -> tuple[list[int], list[int], list[int]]:
    kernel_size = _pair(kernel_size)
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
    return kernel_size, stride, _pair(padding)


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1, floor mode), by the op
    :func:`resnet_fast._routing.max_pool2d_impl` picks: the maxima alone where nothing is to be
    differentiated, the maxima with one-byte positions for the backward in training."""
    kernel_size, stride, padding = _window(kernel_size, stride, padding)
    impl = _routing.max_pool2d_impl(x, kernel_size=kernel_size)
    if impl == "cpu":
        return torch.ops.resnet_fast.max_pool2d(x, kernel_size, stride, padding)
    if impl == "cpu_train":
        return torch.ops.resnet_fast.max_pool2d_train(x, kernel_size, stride, padding)[0]
    return reference.max_pool2d(x, kernel_size, stride, padding)


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

    def pooled(x, kernel_size, stride, padding):
        torch._check(x.dim() == 4, lambda: f"max_pool2d_train: expected a 4-D (N, C, H, W) input, got {x.dim()}-D")
        n, c, h, w = x.shape
        oh = (h + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
        ow = (w + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
        return (n, c, oh, ow), suggest_memory_format(x)

    @torch.library.register_fake("resnet_fast::max_pool2d_train")
    def _(x, kernel_size, stride, padding):
        shape, fmt = pooled(x, kernel_size, stride, padding)
        return (
            torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
            torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=fmt),
        )

    @torch.library.register_fake("resnet_fast::max_pool2d_train_backward")
    def _(grad_y, window_index, input_size, kernel_size, stride, padding):
        n, c = grad_y.shape[:2]
        return torch.empty((n, c, *input_size), dtype=grad_y.dtype, device=grad_y.device,
                           memory_format=suggest_memory_format(window_index))


if _backend.extension_available():
    register()
