"""A convolution + BatchNorm (+ ReLU) in training whose input the caller keeps anyway (a network's
stem: the images; a projection shortcut: the block's input, which the block's first convolution
keeps), with the batch's statistics. Its convolution's output is not kept from the forward to the
backward: the backward recomputes it from x by the same convolution, bit for bit. The stem's
convolution, with 3 input channels, is cheap next to the tensor it spares: ResNet-50's at batch 16
is 12 ms of a 3 s training step and its output 51 MB; CIFAR ResNet-20's at batch 128 1 ms of
250 ms, 8 MiB.

Formula: :func:`resnet_fast.ops.reference.conv_bn_act_train`. Kernel: ``csrc/cpu/conv_bn_act_train.cpp``
(ATen's convolution, then batch_norm_act's CPU kernel); autograd: ``csrc/autograd.cpp``; routing:
:func:`resnet_fast._routing.recomputes_conv_output`, called by
:func:`resnet_fast.nn.functional.stem_conv_bn_act` and :func:`~resnet_fast.nn.functional.projection_bn`.
CPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format
from torch import Tensor

from .. import _backend
from .batch_norm_act import _acc_dtype, check_batch_stats_shape, update_running_stats


def conv_bn_act_train(
    x: Tensor,
    weight: Tensor,
    stride: int,
    padding: int,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: ``y = [relu](batch_norm(conv2d(x, weight, stride, padding)))`` with the
    batch's mean and biased variance, which it returns; the running statistics (where given) are
    updated as nn.BatchNorm2d updates them."""
    n, _, h, w = x.shape
    k = weight.shape[-1]
    out_shape = (n, weight.shape[0], (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)
    if x.numel() > 0:
        check_batch_stats_shape(out_shape)
    y, mean, var = torch.ops.resnet_fast.conv_bn_act_train(x, weight, stride, padding, bn_weight, bn_bias, eps, relu)
    if x.numel() > 0:
        update_running_stats("cpu", running_mean, running_var, mean, var, momentum, y.numel() // y.shape[1])
    return y, mean, var


def register() -> None:
    @torch.library.register_fake("resnet_fast::conv_bn_act_train")
    def _(x, weight, stride, padding, bn_weight, bn_bias, bn_eps, relu):
        c = F.conv2d(x, weight, None, stride, padding)
        y = torch.empty(c.shape, dtype=c.dtype, device=c.device, memory_format=suggest_memory_format(c))
        k = weight.shape[0]
        return y, x.new_empty((k,), dtype=_acc_dtype(x)), x.new_empty((k,), dtype=_acc_dtype(x))


if _backend.extension_available():
    register()
