"""Fused ops: one module per op (its wrapper, fake kernels and autograd); their formulas in
:mod:`resnet_fast.ops.reference`; which implementation runs in :mod:`resnet_fast._routing`."""

from .. import _backend
from . import reference
from .batch_norm_act import batch_norm_act
from .bias_act import bias_act
from . import conv1x1_train as _conv1x1_train  # noqa: F401  (its fake kernel)
from .conv_bias_act import conv_bias_act, conv_bias_act_, pack_conv_weight
from .conv_bn_act_train import conv_bn_act_train
from .conv3x3_bias_act import conv3x3_bias_act, conv3x3_bias_act_, winograd_weight
from .conv3x3_train import conv3x3_train
from .max_pool2d import max_pool2d
from .norm_conv import norm_conv
from .pool_linear import pool_linear
from .zero_pad_shortcut import zero_pad_shortcut

if _backend.triton_available():
    try:
        from .. import triton as _triton  # defines torch.ops.resnet_fast_triton.*
    except Exception as exc:  # a triton release these kernels do not support
        _backend._disable_triton(f"resnet_fast.triton failed to import ({type(exc).__name__}: {exc})")

__all__ = [
    "batch_norm_act", "bias_act", "conv_bias_act", "conv_bias_act_", "conv_bn_act_train", "conv3x3_bias_act",
    "conv3x3_bias_act_", "conv3x3_train", "max_pool2d",
    "norm_conv", "pack_conv_weight", "pool_linear", "reference", "winograd_weight", "zero_pad_shortcut",
]
