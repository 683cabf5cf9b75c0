"""A bottleneck's 1x1 convolution in training, where its input is ``relu(bn(x))`` from the fused
CPU BatchNorm before it: the forward is ATen's convolution (oneDNN's, as ``nn.Conv2d`` runs it);
the backward keeps the BatchNorm's input x (which the BatchNorm's backward keeps anyway) instead
of the activation, and recomputes the activation for the weight gradient with batch_norm_act's
own apply pass, bit for bit: one activation fewer per bottleneck alive between the forward and the
backward.

Formula: :func:`resnet_fast.ops.reference.conv1x1_train`. Kernel: ``csrc/cpu/conv1x1_train.cpp``;
autograd: ``csrc/autograd.cpp``; routing: :func:`resnet_fast._routing.conv1x1_recomputes_input`,
called by :func:`resnet_fast.nn.functional.conv_bn_act`. CPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend


def register() -> None:
    @torch.library.register_fake("resnet_fast::conv1x1_train")
    def _(x, weight, stride, bn_input, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_training):
        return F.conv2d(x, weight, None, stride)


if _backend.extension_available():
    register()
