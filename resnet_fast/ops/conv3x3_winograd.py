"""Inference 3x3 convolutions (stride 1, padding 1) by Winograd's F(2x2, 3x3) on the CPU, with
the folded BatchNorm's bias, the residual add and ReLU as the epilogue: oneDNN has Winograd
only for AVX-512, and this machine's AVX2 runs ResNet-50's stride-1 3x3 convolutions 1.3-1.7x
faster this way (fewer multiplications: 16 per 2x2 outputs and input channel instead of 36).

Formula: :func:`resnet_fast.ops.reference.conv3x3_bias_act`. Kernel: ``csrc/cpu/conv3x3_winograd.cpp``.
Used by :func:`resnet_fast.nn.conv_bn_act` in inference (``model.eval()``, nothing to differentiate);
training's :func:`resnet_fast.ops.conv3x3` runs the same kernel from C++ for its forward and input
gradient, with the weight transformed at each call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend

# G of F(2x2, 3x3): the weight transform U = G g G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_weight(weight: Tensor) -> Tensor:
    """A (K, C, 3, 3) weight in the Winograd domain, (16, C, K) float32: ``U[4i + j, c, k] =
    (G weight[k, c] G^T)[i, j]``, computed in float64."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight: expected a (K, C, 3, 3) weight, got shape {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ir,kcrs,js->ijck", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


def conv3x3_bias_act(x: Tensor, weight_winograd: Tensor, bias: Tensor, residual: Tensor | None = None,
                     relu: bool = True) -> Tensor:
    """``relu(conv3x3(x, weight) + bias + residual)`` (stride 1, padding 1) from the transformed
    weight (:func:`winograd_weight`). CPU, float32; the output is channels_last."""
    return torch.ops.resnet_fast.conv3x3_bias_act(x, weight_winograd, bias, residual, relu)


def register(ns: str) -> None:
    """The fake kernel of ``{ns}::conv3x3_bias_act`` (an inference op: no autograd)."""

    @torch.library.register_fake(f"{ns}::conv3x3_bias_act")
    def _(x, weight_winograd, bias, residual, relu):
        torch._check(x.dim() == 4, lambda: f"conv3x3_bias_act: expected a 4-D input, got {x.dim()}-D")
        n, _c, h, w = x.shape
        return torch.empty(
            (n, weight_winograd.shape[2], h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )


if _backend.extension_available() and _backend.kernels()["conv3x3_bias_act"]["cpu"]:
    register("resnet_fast")
