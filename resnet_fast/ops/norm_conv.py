"""Issue 18's "NormConvolution" forward, for GPUs: a convolution that applies the previous
BatchNorm's scale and shift and ReLU to its input as it loads it, and reduces its own output to
the next BatchNorm's batch statistics in its epilogue, so that neither the normalised activation
is written nor the output read again for its statistics.

Formula: :func:`resnet_fast.ops.reference.norm_conv`. Kernel: ``resnet_fast/triton/norm_conv.py``
(Triton only; under ``TRITON_INTERPRET=1`` on CPU tensors, which is how it is tested here). Schema
and argument check: ``csrc/ops.cpp``, ``csrc/checks.cpp``. Not routed: no model calls it until a GPU
has measured it faster than cuDNN's convolution followed by the statistics pass
(``bench/test_gpu.py::test_gpu_norm_conv_forward``). Forward only (no autograd yet).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend


def norm_conv(
    x: Tensor, weight: Tensor, stride: int = 1, padding: int = 0, scale: Tensor | None = None,
    shift: Tensor | None = None, relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: ``y = conv2d([relu](x * scale[c] + shift[c]), weight, stride, padding)``
    and the batch's mean and biased variance of each of y's channels (float64 for float64 inputs,
    else float32). Runs the Triton kernel (a CUDA device, or CPU tensors under the interpreter)."""
    if not _backend.triton_available():
        raise RuntimeError(f"norm_conv runs by Triton, which cannot run here: {_backend.triton_error()}")
    return torch.ops.resnet_fast_triton.norm_conv(x, weight, stride, padding, scale, shift, relu)


def register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::norm_conv")
    def _(x, weight, stride, padding, scale, shift, relu):
        n, _, h, w = x.shape
        r = weight.shape[-1]
        shape = (n, weight.shape[0], (h + 2 * padding - r) // stride + 1, (w + 2 * padding - r) // stride + 1)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        k = weight.shape[0]
        return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
                x.new_empty((k,), dtype=acc), x.new_empty((k,), dtype=acc))
