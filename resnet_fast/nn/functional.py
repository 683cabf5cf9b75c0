"""Module-level entry points of the fused ops: they take the model's own modules, so that the
models keep torchvision's module tree and state_dict while running fused code."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops


def _runs_own_forward(bn: nn.Module) -> bool:
    # A norm layer that is not exactly nn.BatchNorm2d (a user's norm_layer, a subclass with
    # its own forward, SyncBatchNorm), or one with hooks, runs its own forward unfused.
    return type(bn) is not nn.BatchNorm2d or bool(bn._forward_hooks or bn._forward_pre_hooks)


def bn_act(
    x: Tensor, bn: nn.Module, residual: Tensor | None = None, relu: bool = True, residual_stride: int = 1
) -> Tensor:
    """``relu(bn(x) + residual)`` with exactly nn.BatchNorm2d's semantics (batch statistics in
    training, running statistics in eval, momentum=None as a cumulative average,
    ``num_batches_tracked``, ``track_running_stats``), through the fused op.

    A residual with fewer channels than ``x`` or a ``residual_stride`` > 1 is the option-A
    shortcut: subsampled and zero-padded, read in place by the fused kernel."""
    if _runs_own_forward(bn):
        if residual is not None and (residual_stride != 1 or residual.shape[1] != x.shape[1]):
            residual = ops.zero_pad_shortcut(residual, x.shape[1], residual_stride)
        y = bn(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W) to {bn}, got shape {tuple(x.shape)}")
    # The same momentum bookkeeping as torch.nn.modules.batchnorm._BatchNorm.forward.
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return ops.batch_norm_act(
        x,
        bn.weight,
        bn.bias,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        use_batch_stats,
        momentum,
        bn.eps,
        residual,
        relu,
        residual_stride,
    )
