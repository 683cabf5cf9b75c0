"""The residual nets' 3x3 convolution (padding 1, no bias, stride 1 or 2) for training on the CPU,
with our weight gradient: oneDNN computes ResNet-20's at 125-140 GFLOP/s, two thirds of what its
forward and input gradient reach; the AVX2 kernel in ``csrc/cpu/conv3x3.cpp`` runs at 150-190.

Formula: :func:`resnet_fast.ops.reference.conv3x3` and
:func:`resnet_fast.ops.reference.conv3x3_weight_grad`. The op's forward and input gradient are
ATen's, or at stride 1 with 64 to 256 channels in and out Winograd's (``csrc/cpu/conv3x3_winograd.cpp``);
its autograd is in ``csrc/autograd.cpp``. GPUs keep PyTorch's convolution (cuDNN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from . import reference


def conv3x3(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding=1)`` for a (K, C, 3, 3) weight. Our op runs for
    float32 CPU tensors when the weight's gradient will be computed (training); anything else is
    PyTorch's convolution, to which our op adds nothing."""
    if (
        x.dtype != torch.float32
        or weight.dtype != torch.float32
        or stride not in (1, 2)
        or weight.dim() != 4
        or tuple(weight.shape[2:]) != (3, 3)
        or not (weight.requires_grad and torch.is_grad_enabled())
        or _backend.resolve("conv3x3", x.device) != "cpu"
    ):
        return reference.conv3x3(x, weight, stride)
    return torch.ops.resnet_fast.conv3x3(x, weight, stride)


def register(ns: str) -> None:
    """Fake kernels for ``{ns}::conv3x3`` and ``{ns}::conv3x3_weight_grad``, and the weight
    gradient's own autograd (for double backward, e.g. a gradient penalty); conv3x3's autograd is
    in C++."""

    @torch.library.register_fake(f"{ns}::conv3x3")
    def _(x, weight, stride):
        # PyTorch's convolution on the fake tensors: its shape checks and output layout.
        return F.conv2d(x, weight, None, stride, 1)

    @torch.library.register_fake(f"{ns}::conv3x3_weight_grad")
    def _(grad_out, x, stride):
        torch._check(x.dim() == 4 and grad_out.dim() == 4, lambda: "conv3x3_weight_grad: expected 4-D tensors")
        return torch.empty(
            (grad_out.shape[1], x.shape[1], 3, 3), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )

    # dW is bilinear in (grad_out, x): <V, dW> = sum(grad_out * conv3x3(x, V)), so its gradients
    # for a cotangent V are conv3x3(x, V) and the input gradient of that convolution.
    def _setup_context(ctx, inputs, output):
        grad_out, x, stride = inputs
        ctx.save_for_backward(grad_out, x)
        ctx.stride = stride

    def _backward(ctx, v):
        grad_out, x = ctx.saved_tensors
        s = ctx.stride
        d_grad_out = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad_out = F.conv2d(x, v, None, s, 1)
        if ctx.needs_input_grad[1]:
            d_x = torch.ops.aten.convolution_backward(
                grad_out, x, v, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        return d_grad_out, d_x, None

    torch.library.register_autograd(f"{ns}::conv3x3_weight_grad", _backward, setup_context=_setup_context)


if _backend.extension_available() and _backend.kernels()["conv3x3"]["cpu"]:
    register("resnet_fast")
