"""Fused ops: one module per op (registration, autograd, backend routing); formulas in
:mod:`resnet_fast.ops.reference`."""

from . import reference
from .batch_norm_act import batch_norm_act
from .zero_pad_shortcut import zero_pad_shortcut

__all__ = ["batch_norm_act", "reference", "zero_pad_shortcut"]
