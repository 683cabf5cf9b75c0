"""Inference 3x3 convolutions (stride 1, padding 1) by Winograd's F(2x2, 3x3) on the CPU, with
the folded BatchNorm's bias, the residual add and ReLU as the epilogue: 16 multiplications per 2x2
outputs and input channel instead of 36, which runs ResNet-50's stride-1 3x3 convolutions 1.3-1.7x
faster than oneDNN's direct ones here.

Formula: :func:`resnet_fast.ops.reference.conv3x3_bias_act`. Kernel: ``csrc/cpu/winograd.cpp``
(shared with training's ``conv3x3_train``), which also transforms the weights
(``resnet_fast::winograd_weight``, in float64, rounded once). Used by
:func:`resnet_fast.nn.conv_bn_act` in inference (``model.eval()``, nothing to differentiate) where
:func:`resnet_fast._routing.conv_bn_inference_plan` says ``"winograd"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _routing


def winograd_weight(weight: Tensor) -> Tensor:
    """A (K, C, 3, 3) weight in the Winograd domain, (16, C, K) float32: ``U[4i + j, c, k] =
    (G weight[k, c] G^T)[i, j]``, computed in float64 and rounded once (the same transform as
    training's, in C++)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight: expected a (K, C, 3, 3) weight, got shape {tuple(weight.shape)}")
    return torch.ops.resnet_fast.winograd_weight(weight.detach())


def conv3x3_bias_act(x: Tensor, weight_winograd: Tensor, bias: Tensor, residual: Tensor | None = None,
                     relu: bool = True, tiles: bool | None = None) -> Tensor:
    """``relu(conv3x3(x, weight) + bias + residual)`` (stride 1, padding 1) from the transformed
    weight (:func:`winograd_weight`). CPU, float32; the output is channels_last. ``tiles``: the
    16 products by our register tiles (``csrc/cpu/conv_gemm.cpp``, AVX-512's where the CPU has
    it) rather than MKL's sgemm; None: :func:`resnet_fast._routing.winograd_tiles`."""
    if tiles is None:
        tiles = _routing.winograd_tiles(weight_winograd.shape[1], weight_winograd.shape[2])
    return torch.ops.resnet_fast.conv3x3_bias_act(x, weight_winograd, bias, residual, relu, tiles)


def conv3x3_bias_act_(residual: Tensor, x: Tensor, weight_winograd: Tensor, bias: Tensor, relu: bool = True,
                      tiles: bool | None = None) -> Tensor:
    """:func:`conv3x3_bias_act` written into ``residual`` (float32, channels_last contiguous, not
    overlapping ``x``), which it returns: the output transform reads each tile's residual, then
    stores its outputs in the same place."""
    if tiles is None:
        tiles = _routing.winograd_tiles(weight_winograd.shape[1], weight_winograd.shape[2])
    torch.ops.resnet_fast.conv3x3_bias_act_(residual, x, weight_winograd, bias, relu, tiles)
    return residual


def register() -> None:
    """Fake kernels of ``resnet_fast::conv3x3_bias_act`` and its in-place form (inference ops: no
    autograd) and ``resnet_fast::winograd_weight``."""

    @torch.library.register_fake("resnet_fast::conv3x3_bias_act_")
    def _(residual, x, weight_winograd, bias, relu, tiles=False):
        return None

    @torch.library.register_fake("resnet_fast::conv3x3_bias_act")
    def _(x, weight_winograd, bias, residual, relu, tiles=False):
        torch._check(x.dim() == 4, lambda: f"conv3x3_bias_act: expected a 4-D input, got {x.dim()}-D")
        n, _c, h, w = x.shape
        return torch.empty(
            (n, weight_winograd.shape[2], h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )

    @torch.library.register_fake("resnet_fast::winograd_weight")
    def _(weight):
        return weight.new_empty((16, weight.shape[1], weight.shape[0]), dtype=torch.float32)


if _backend.extension_available():
    register()
