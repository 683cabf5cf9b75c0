"""Triton kernels of the option-A shortcut and its backward, and their launchers.

Formula: :func:`resnet_fast.ops.reference.zero_pad_shortcut`. The ops that call the launchers are
defined in resnet_fast/triton/__init__.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format

from ._common import _grid2, _interpret_blocks, _is_cl, _offsets, _residual, _rows, _tuned

@triton.jit
def _zero_pad_kernel(
    x_ptr, out_ptr, M, C, HW, W, Cin, sN, sC, sH, sW, osN, osC, osH, osW, S,
    IS_CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, c, h, w] = x[n, c, h * S, w * S] for c < Cin, else 0 (M, C, HW, W: the output's)."""
    m, n, h, w = _rows(tl.program_id(0).to(tl.int64) * BLOCK_M, M, HW, W, BLOCK_M)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (m < M)[:, None] & (c < C)[None, :]
    v = _residual(x_ptr, n, h, w, c, mask, Cin, sN, sC, sH, sW, S)
    tl.store(out_ptr + _offsets(n, h, w, c, osN, osC, osH, osW), v, mask=mask)


@triton.jit
def _zero_pad_backward_kernel(
    g_ptr, dx_ptr, M, C, HW, W, gsN, gsC, gsH, gsW, dsN, dsC, dsH, dsW, S,
    IS_CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx[n, c, h, w] = g[n, c, h / S, w / S] where S divides h and w, else 0 (M, C, HW, W: dx's)."""
    m, n, h, w = _rows(tl.program_id(0).to(tl.int64) * BLOCK_M, M, HW, W, BLOCK_M)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (m < M)[:, None] & (c < C)[None, :]
    hit = ((h % S) == 0) & ((w % S) == 0)
    off = (n * gsN + (h // S) * gsH + (w // S) * gsW)[:, None] + (c * gsC)[None, :]
    v = tl.load(g_ptr + off, mask=mask & hit[:, None], other=0.0)
    tl.store(dx_ptr + _offsets(n, h, w, c, dsN, dsC, dsH, dsW), v, mask=mask)


_zero_pad = _tuned(_zero_pad_kernel, ["M", "C", "IS_CL"])
_zero_pad_backward = _tuned(_zero_pad_backward_kernel, ["M", "C", "IS_CL"])


def zero_pad_shortcut(x: Tensor, out_channels: int, stride: int) -> Tensor:
    N, Cin, H, W = x.shape
    Ho, Wo = triton.cdiv(H, stride), triton.cdiv(W, stride)
    out = torch.empty((N, out_channels, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
    if out.numel() == 0:
        return out
    M = N * Ho * Wo
    _zero_pad[_grid2(M, out_channels)](
        x, out, M, out_channels, Ho * Wo, Wo, Cin, *x.stride(), *out.stride(), stride,
        IS_CL=_is_cl(out), **_interpret_blocks(out),
    )
    return out


def zero_pad_shortcut_backward(grad_out: Tensor, input_size: list[int], stride: int) -> Tensor:
    N, C, H, W = input_size
    dx = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device, memory_format=suggest_memory_format(grad_out))
    if dx.numel() == 0:
        return dx
    M = N * H * W
    _zero_pad_backward[_grid2(M, C)](
        grad_out, dx, M, C, H * W, W, *grad_out.stride(), *dx.stride(), stride,
        IS_CL=_is_cl(dx), **_interpret_blocks(dx),
    )
    return dx
