"""Inference's classifier head on the CPU in one op: global average pooling, then the linear
layer, by our GEMM (``conv_bias_act``'s register tiles) on the pooled rows, the weight packed once
by :func:`resnet_fast.ops.pack_conv_weight` as a (K, C, 1, 1) convolution's.

Formula: :func:`resnet_fast.ops.reference.pool_linear`. Kernel: ``csrc/cpu/pool_linear.cpp``.
Used by :func:`resnet_fast.nn.functional.pool_linear` (the models' ``avgpool``, ``flatten`` and
``fc``) where :func:`resnet_fast._routing.pool_linear_applies` says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _routing


def pool_linear(x: Tensor, weight_packed: Tensor, bias: Tensor, wide: bool | None = None) -> Tensor:
    """``linear(x.mean((2, 3)), weight, bias)`` from the packed weight (``pack_conv_weight`` of
    ``weight[:, :, None, None]``). CPU, float32; (N, K) out. ``wide``: AVX-512 register tiles, as
    :func:`resnet_fast.ops.conv_bias_act`'s; None: :func:`resnet_fast._routing.gemm_wide_tiles`."""
    if wide is None:
        wide = _routing.gemm_wide_tiles()
    return torch.ops.resnet_fast.pool_linear(x, weight_packed, bias, wide)


def register() -> None:
    """The fake kernel of ``resnet_fast::pool_linear`` (an inference op: no autograd)."""

    @torch.library.register_fake("resnet_fast::pool_linear")
    def _(x, weight_packed, bias, wide=False):
        torch._check(x.dim() == 4, lambda: f"pool_linear: expected a 4-D input, got {x.dim()}-D")
        return x.new_empty((x.shape[0], bias.shape[0]))


if _backend.extension_available():
    register()
