"""Inference convolutions on the CPU as one matrix product (an implicit GEMM: each output pixel's
row is its taps' input channels, read in place), with the folded BatchNorm's bias, the residual
add and ReLU as the epilogue of its register tiles, and the weight packed once into panels of 16
output channels.

Formula: :func:`resnet_fast.ops.reference.conv_bias_act`. Kernel: ``csrc/cpu/conv_gemm.cpp``
(its register tiles, AVX2's 6 x 16 and AVX-512's 6 x 64, in ``conv_gemm_kernels.inc``). Used by :func:`resnet_fast.nn.conv_bn_act` in
inference (``model.eval()``, nothing to differentiate) where
:func:`resnet_fast._routing.conv_bn_inference_plan` says ``"gemm"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _routing

PANEL = 16  # output channels per packed panel (csrc/cpu/conv_gemm.cpp)


def pack_conv_weight(weight: Tensor) -> Tensor:
    """A (K, C, R, R) weight packed for :func:`conv_bias_act`: float32 of shape
    (ceil(K / 16), R*R*C, 16), ``packed[p, (i*R + j)*C + c, q] = weight[16 p + q, c, i, j]``, zero
    beyond K."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"pack_conv_weight: expected a (K, C, R, R) weight, got shape {tuple(weight.shape)}")
    k = weight.shape[0]
    panels = -(-k // PANEL)
    w = weight.detach().permute(0, 2, 3, 1).reshape(k, -1).float()
    w = F.pad(w, (0, 0, 0, panels * PANEL - k))
    return w.reshape(panels, PANEL, w.shape[1]).transpose(1, 2).contiguous()


def conv_bias_act(x: Tensor, weight_packed: Tensor, bias: Tensor, residual: Tensor | None = None,
                  relu: bool = True, kernel: int = 1, stride: int = 1, padding: int = 0,
                  wide: bool | None = None) -> Tensor:
    """``relu(conv2d(x, weight, stride, padding) + bias + residual)`` from the packed weight
    (:func:`pack_conv_weight`) of a square ``kernel``; a kernel larger than 1x1 needs a multiple
    of 16 output channels. CPU, float32; the output is channels_last. ``wide``: AVX-512 register
    tiles (6 pixels x 64 channels) rather than AVX2's (6 x 16); None:
    :func:`resnet_fast._routing.gemm_wide_tiles`."""
    if wide is None:
        wide = _routing.gemm_wide_tiles()
    return torch.ops.resnet_fast.conv_bias_act(x, weight_packed, bias, residual, relu, kernel, stride, padding, wide)


def conv_bias_act_(residual: Tensor, x: Tensor, weight_packed: Tensor, bias: Tensor, relu: bool = True,
                   kernel: int = 1, stride: int = 1, padding: int = 0, wide: bool | None = None) -> Tensor:
    """:func:`conv_bias_act` written into ``residual`` (float32, channels_last contiguous, not
    overlapping ``x``), which it returns: each output is stored where its residual was read. Only
    where ``kernel**2 * C <= 256`` (:data:`resnet_fast._routing.GEMM_SLICE`: the depth is one
    slice, so no partial sums pass through the output first)."""
    if wide is None:
        wide = _routing.gemm_wide_tiles()
    torch.ops.resnet_fast.conv_bias_act_(residual, x, weight_packed, bias, relu, kernel, stride, padding, wide)
    return residual


def register() -> None:
    """The fake kernels of ``resnet_fast::conv_bias_act`` and its in-place form (inference ops:
    no autograd)."""

    @torch.library.register_fake("resnet_fast::conv_bias_act_")
    def _(residual, x, weight_packed, bias, relu, kernel, stride, padding, wide=False):
        return None

    @torch.library.register_fake("resnet_fast::conv_bias_act")
    def _(x, weight_packed, bias, residual, relu, kernel, stride, padding, wide=False):
        torch._check(x.dim() == 4, lambda: f"conv_bias_act: expected a 4-D input, got {x.dim()}-D")
        n, _c, h, w = x.shape
        return torch.empty(
            (n, bias.shape[0], (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1),
            dtype=x.dtype, device=x.device, memory_format=torch.channels_last,
        )


if _backend.extension_available():
    register()
