"""Fused modules: the blocks of the paper's networks and the functional entry points."""

from .blocks import SHORTCUTS, BasicBlock, Bottleneck, MaxPool2d, ZeroPadShortcut, conv1x1, conv3x3, make_shortcut
from .functional import bn_act, conv_bn_act

__all__ = [
    "SHORTCUTS",
    "BasicBlock",
    "Bottleneck",
    "MaxPool2d",
    "ZeroPadShortcut",
    "bn_act",
    "conv_bn_act",
    "conv1x1",
    "conv3x3",
    "make_shortcut",
]
