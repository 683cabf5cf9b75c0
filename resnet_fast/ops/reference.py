"""The formula of every fused op, in plain PyTorch.

This module is three things at once: the ``eager`` backend, the oracle that every kernel is
tested against, and the documentation of the math. A kernel is correct when it agrees with
its formula here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def zero_pad_shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    """The paper's option-A shortcut (He et al. 2015, section 3.3): parameter-free identity.

    ``out[n, c, h, w] = x[n, c, h*stride, w*stride]`` for ``c < C_in`` and ``0`` for the
    ``out_channels - C_in`` extra channels, which are appended after the input's.

    x: (N, C_in, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride))
    """
    if x.dim() != 4:
        raise ValueError(f"zero_pad_shortcut: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if stride < 1:
        raise ValueError(f"zero_pad_shortcut: expected stride >= 1, got {stride}")
    if out_channels < x.shape[1]:
        raise ValueError(
            f"zero_pad_shortcut: out_channels ({out_channels}) must be at least the input's channels ({x.shape[1]})"
        )
    return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, out_channels - x.shape[1]))


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
    """BatchNorm, then an optional residual add, then an optional ReLU: the end of every
    conv-BN-ReLU unit and of every residual block.

    ``y = relu(BN(x) + residual)`` with ``BN(x)[:, c] = (x[:, c] - mean_c) / sqrt(var_c + eps)
    * weight_c + bias_c``. In training, ``mean``/``var`` are the batch statistics over
    (N, H, W) (biased variance for normalising) and the running buffers move by ``momentum``
    towards them (unbiased variance); in eval the running buffers are used.

    x, residual: (N, C, H, W); weight, bias, running_mean, running_var: (C,)
    """
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y += residual
    if relu:
        y = torch.relu_(y)
    return y


def bias_act(x: Tensor, bias: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """The inference epilogue of a convolution whose weights absorbed BatchNorm:
    ``y = relu(x + bias[c] + residual)``.

    Folding: with ``scale = weight / sqrt(running_var + eps)``, ``BN(conv(x, K)) = conv(x, K * scale)
    + (bias - running_mean * scale)``, so a conv with the scaled kernel and this epilogue with the
    folded bias compute ``relu(BN(conv(x)) + residual)`` in eval mode.

    x, residual: (N, C, H, W); bias: (C,)
    """
    y = x + bias.to(x.dtype).reshape(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def max_pool2d(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """Max pooling with dilation 1 and floor mode (the stem's 3x3, stride 2, padding 1):
    ``y[n, c, i, j] = max{x[n, c, i*sh - ph + a, j*sw - pw + b] : 0 <= a < kh, 0 <= b < kw, in bounds}``,
    NaN if any value of the window is NaN. x: (N, C, H, W)."""
    return F.max_pool2d(x, kernel_size, stride, padding)


def max_pool2d_train(
    x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """:func:`max_pool2d` and, for training, each maximum's position in its window as uint8:
    ``(h - i*sh + ph) * kw + (w - j*sw + pw)`` for the input (h, w) that PyTorch's argmax picks
    (the first maximum in the window's row-major order; the last NaN). The gradient is PyTorch's:
    each output's gradient added to that input."""
    y, flat = F.max_pool2d(x, kernel_size, stride, padding, return_indices=True)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh = torch.arange(y.shape[2]).reshape(1, 1, -1, 1)
    ow = torch.arange(y.shape[3]).reshape(1, 1, 1, -1)
    h, w = flat // x.shape[3], flat % x.shape[3]
    return y, ((h - oh * sh + ph) * kw + (w - ow * sw + pw)).to(torch.uint8)


def conv3x3_train(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """The residual nets' 3x3 convolution (padding 1, no bias), as training runs it.
    ``y[n, k, h, w] = sum_{c, r, s} weight[k, c, r, s] * x[n, c, h*stride + r - 1, w*stride + s - 1]``
    (zero outside the map). x: (N, C, H, W), weight: (K, C, 3, 3) -> (N, K, ceil(H/stride), ceil(W/stride))."""
    return F.conv2d(x, weight, None, stride, 1)


def conv1x1_train(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """A bottleneck's 1x1 convolution (no bias): ``y[n, k, h, w] = sum_c weight[k, c, 0, 0] *
    x[n, c, h*stride, w*stride]``. x: (N, C, H, W), weight: (K, C, 1, 1)."""
    return F.conv2d(x, weight, None, stride)


def conv_bn_act_train(
    x: Tensor, weight: Tensor, stride: int, padding: int, bn_weight: Tensor, bn_bias: Tensor, eps: float, relu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """A convolution + BatchNorm (+ ReLU) in training (a network's stem, a projection shortcut):
    ``c = conv2d(x, weight, stride, padding)`` (no bias), then
    ``y = (c - mean[k]) / sqrt(var[k] + eps) * bn_weight[k] + bn_bias[k]``, ReLU'd where ``relu``,
    with the batch's mean and biased variance of each output channel over (N, OH, OW).
    Returns (y, mean, var)."""
    c = F.conv2d(x, weight, None, stride, padding)
    mean = c.mean((0, 2, 3))
    var = c.var((0, 2, 3), unbiased=False)
    y = F.batch_norm(c, None, None, bn_weight, bn_bias, True, 0.0, eps)
    return (torch.relu(y) if relu else y), mean, var


def norm_conv(
    x: Tensor, weight: Tensor, stride: int, padding: int, scale: Tensor | None, shift: Tensor | None, relu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """A convolution with the previous BatchNorm applied to its input as it is loaded and the next
    BatchNorm's statistics reduced from its output (issue 18's "NormConvolution" forward):
    ``x' = [relu](x * scale[c] + shift[c])`` (``[relu](x)`` without scale and shift), zero-padded,
    ``y = conv2d(x', weight, stride, padding)`` (no bias), and the batch's mean and biased variance
    of each output channel of y over (N, OH, OW). Returns (y, mean, var)."""
    if scale is not None:
        x = x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)
    if relu:
        x = torch.relu(x)
    y = F.conv2d(x, weight, None, stride, padding)
    return y, y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)


def conv3x3_weight_grad(grad_out: Tensor, x: Tensor, stride: int) -> Tensor:
    """The gradient of :func:`conv3x3_train` with respect to its weight:
    ``dW[k, c, r, s] = sum_{n, h, w} grad_out[n, k, h, w] * x[n, c, h*stride + r - 1, w*stride + s - 1]``.
    grad_out: (N, K, OH, OW), x: (N, C, H, W) -> (K, C, 3, 3)."""
    return torch.nn.grad.conv2d_weight(x, (grad_out.shape[1], x.shape[1], 3, 3), grad_out, stride, 1)


def conv3x3_bias_act(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """Inference's 3x3 convolution (stride 1, padding 1) with a BatchNorm folded into ``weight``
    and ``bias`` (see :func:`bias_act`): ``y = relu(conv3x3_train(x, weight, 1) + bias[k] + residual)``.
    x: (N, C, H, W), weight: (K, C, 3, 3), bias: (K,), residual: (N, K, H, W)."""
    return bias_act(F.conv2d(x, weight, None, 1, 1), bias, residual, relu)


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None = None, relu: bool = True,
                  stride: int = 1, padding: int = 0) -> Tensor:
    """Inference's convolution with a BatchNorm folded into ``weight`` and ``bias`` (see
    :func:`bias_act`), square kernels: ``y[n, k, h, w] = relu(sum_{c, i, j} weight[k, c, i, j] *
    x[n, c, h*stride - padding + i, w*stride - padding + j] + bias[k] + residual[n, k, h, w])``
    (x zero outside the map). x: (N, C, H, W), weight: (K, C, R, R), bias: (K,), residual: the
    output's shape."""
    return bias_act(F.conv2d(x, weight, None, stride, padding), bias, residual, relu)


def pool_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Inference's classifier head, global average pooling then the linear layer:
    ``y[n, k] = bias[k] + sum_c weight[k, c] * mean_{h, w} x[n, c, h, w]``. x: (N, C, H, W),
    weight: (K, C), bias: (K,) -> (N, K)."""
    return F.linear(x.mean((2, 3)), weight, bias)
