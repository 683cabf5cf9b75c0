"""Inference 1x1 convolutions (any stride, no padding) on the CPU as one matrix product, with the
folded BatchNorm's bias, the residual add and ReLU as the epilogue of its register tiles, and the
weight packed once into panels of 16 output channels.

Formula: :func:`resnet_fast.ops.reference.conv1x1_bias_act`. Kernel: ``csrc/cpu/conv1x1.cpp``
(its register tile in ``conv1x1_kernels.inc``). Used by :func:`resnet_fast.nn.conv_bn_act` in
inference (``model.eval()``, nothing to differentiate) where
:func:`resnet_fast._routing.conv_bn_inference_plan` says ``"gemm1x1"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend

PANEL = 16  # output channels per packed panel (csrc/cpu/conv1x1.cpp)


def conv1x1_weight(weight: Tensor) -> Tensor:
    """A (K, C, 1, 1) weight packed for :func:`conv1x1_bias_act`: float32 of shape
    (ceil(K / 16), C, 16), ``packed[p, c, j] = weight[16 p + j, c]``, zero beyond K."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"conv1x1_weight: expected a (K, C, 1, 1) weight, got shape {tuple(weight.shape)}")
    k, c = weight.shape[:2]
    panels = -(-k // PANEL)
    w = F.pad(weight.detach().reshape(k, c).float(), (0, 0, 0, panels * PANEL - k))
    return w.reshape(panels, PANEL, c).transpose(1, 2).contiguous()


def conv1x1_bias_act(x: Tensor, weight_packed: Tensor, bias: Tensor, residual: Tensor | None = None,
                     relu: bool = True, stride: int = 1) -> Tensor:
    """``relu(conv1x1(x, weight, stride) + bias + residual)`` from the packed weight
    (:func:`conv1x1_weight`). CPU, float32; the output is channels_last."""
    return torch.ops.resnet_fast.conv1x1_bias_act(x, weight_packed, bias, residual, relu, stride)


def register() -> None:
    """The fake kernel of ``resnet_fast::conv1x1_bias_act`` (an inference op: no autograd)."""

    @torch.library.register_fake("resnet_fast::conv1x1_bias_act")
    def _(x, weight_packed, bias, residual, relu, stride):
        torch._check(x.dim() == 4, lambda: f"conv1x1_bias_act: expected a 4-D input, got {x.dim()}-D")
        n, _c, h, w = x.shape
        return torch.empty(
            (n, bias.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1),
            dtype=x.dtype, device=x.device, memory_format=torch.channels_last,
        )


if _backend.extension_available():
    register()
