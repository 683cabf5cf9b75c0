"""BatchNorm (+ residual add) (+ ReLU): the fused end of every conv unit and residual block.

Formula: :func:`resnet_fast.ops.reference.batch_norm_act`. This version routes every backend
to the formula; the fused CPU and GPU kernels plug in here.
"""

from __future__ import annotations

from torch import Tensor

from . import reference


def batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    residual: Tensor | None = None,
    relu: bool = True,
) -> Tensor:
    """``relu(batch_norm(x) + residual)``; see the formula for the arguments."""
    return reference.batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu)
