"""What the Triton kernels share: block sizes and autotuning, the address arithmetic of 4-D
tensors through their strides, the residual read in place, Chan's merge.

Every kernel sees a 4-D tensor (N, C, H, W) through its four strides, so NCHW, channels_last and
any other layout run without a copy. A program owns a tile of BLOCK_M rows (the N*H*W positions)
by BLOCK_C channels; reductions over the rows (the batch statistics, the weight and bias
gradients) write one partial per program row-range into a buffer that a second kernel combines
in a fixed order: deterministic, no atomics. Arithmetic in float32 (float64 for float64 inputs).
With ``TRITON_INTERPRET=1`` set before this module is imported, the kernels run on CPU tensors
(that is how they are tested without a GPU), with fixed block sizes instead of autotuning.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Autotuning compiles and times 16 configurations of every kernel for every new shape: minutes on
# a machine with an empty Triton cache. RESNET_FAST_TRITON_AUTOTUNE=0 takes fixed blocks instead
# (the interpreter always does); bench/gpu_check.py sets it unless asked to autotune.
AUTOTUNE = not INTERPRET and os.environ.get("RESNET_FAST_TRITON_AUTOTUNE", "1") != "0"

# Rows per program of a reduction are a multiple of the largest BLOCK_M, so that the number of
# partials does not depend on the configuration autotuning picks.
MAX_BLOCK_M = 256
TARGET_PARTIALS = 512
FINALIZE_BLOCK_C = 64


def _configs() -> list[triton.Config]:
    shapes = [(256, 4), (128, 8), (64, 16), (32, 32), (16, 64), (8, 128), (64, 32), (32, 64)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_C": c}, num_warps=w) for m, c in shapes for w in (4, 8)]


def _tuned(fn, key):
    """Autotuned on a GPU; fixed blocks under the interpreter or without AUTOTUNE (the launcher
    passes them)."""
    if not AUTOTUNE:
        return fn
    return triton.autotune(configs=_configs(), key=key)(fn)


def _interpret_blocks(x: Tensor) -> dict:
    """The fixed blocks where nothing is autotuned (else {}): channels_last tiles wide in the
    channels, NCHW tiles long in the rows (the interpreter's cost is per program, so large)."""
    if AUTOTUNE:
        return {}
    return {"BLOCK_M": 64, "BLOCK_C": 32} if _is_cl(x) else {"BLOCK_M": 256, "BLOCK_C": 8}


# ------------------------------------------------------------------------------------------
# Shared jit helpers
# ------------------------------------------------------------------------------------------


@triton.jit
def _rows(start, M, HW, W, BLOCK_M: tl.constexpr):
    m = start + tl.arange(0, BLOCK_M).to(tl.int64)
    n = m // HW
    hw = m - n * HW
    h = hw // W
    return m, n, h, hw - h * W


@triton.jit
def _offsets(n, h, w, c, sN, sC, sH, sW):
    return (n * sN + h * sH + w * sW)[:, None] + (c * sC)[None, :]


@triton.jit
def _masked_grad(g_ptr, y_ptr, off, mask, RELU: tl.constexpr, acc_t: tl.constexpr):
    """The gradient at g_ptr, through ReLU's mask (the output y > 0) when RELU."""
    dz = tl.load(g_ptr + off, mask=mask, other=0.0).to(acc_t)
    if RELU:
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(acc_t)
        dz = tl.where(y > 0.0, dz, 0.0)
    return dz


@triton.jit
def _chan_merge(count, mean, m2, nb, mb, m2b):
    """Chan's merge of (count, mean, m2) with another set's (nb, mb, m2b)."""
    total = count + nb
    delta = mb - mean
    return total, mean + delta * (nb / total), m2 + m2b + delta * delta * (count * nb / total)


@triton.jit
def _store_scale_shift(scale_ptr, shift_ptr, w_ptr, b_ptr, mean, var, c, cmask, eps, acc_t: tl.constexpr):
    """scale = weight / sqrt(var + eps), shift = bias - mean * scale."""
    weight = tl.load(w_ptr + c, mask=cmask, other=1.0).to(acc_t)
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(acc_t)
    scale = weight / tl.sqrt(var + eps)
    tl.store(scale_ptr + c, scale, mask=cmask)
    tl.store(shift_ptr + c, bias - mean * scale, mask=cmask)


@triton.jit
def _tile_offsets(m, c, C, HW, W, sN, sC, sH, sW, IS_CL: tl.constexpr):
    """Offsets of rows m, channels c. A dense channels_last tensor needs no division: m * C + c."""
    if IS_CL:
        return (m * C)[:, None] + c[None, :]
    n = m // HW
    hw = m - n * HW
    h = hw // W
    return _offsets(n, h, hw - h * W, c, sN, sC, sH, sW)


@triton.jit
def _residual_rows(r_ptr, m, c, mask, C, HW, W, Cr, rsN, rsC, rsH, rsW, RS, R_DENSE: tl.constexpr):
    """The residual at rows m, channels c: read like the output when it is a dense
    channels_last tensor of the output's shape, else through its strides (option A too)."""
    if R_DENSE:
        return tl.load(r_ptr + (m * C)[:, None] + c[None, :], mask=mask, other=0.0)
    n = m // HW
    hw = m - n * HW
    h = hw // W
    return _residual(r_ptr, n, h, hw - h * W, c, mask, Cr, rsN, rsC, rsH, rsW, RS)


@triton.jit
def _residual(r_ptr, n, h, w, c, mask, Cr, rsN, rsC, rsH, rsW, RS):
    """r[n, c, h * RS, w * RS] for c < Cr, 0 beyond: identity, projection or option A in place."""
    off = (n * rsN + (h * RS) * rsH + (w * RS) * rsW)[:, None] + (c * rsC)[None, :]
    return tl.load(r_ptr + off, mask=mask & (c < Cr)[None, :], other=0.0)


# ------------------------------------------------------------------------------------------
# Launcher helpers
# ------------------------------------------------------------------------------------------

def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _is_cl(t: Tensor) -> bool:
    """Dense channels_last: element (m, c) of the (N*H*W, C) view sits at m * C + c."""
    return t.is_contiguous(memory_format=torch.channels_last)


def _r_dense(residual: Tensor | None, x: Tensor, stride: int) -> bool:
    return residual is not None and stride == 1 and residual.shape == x.shape and _is_cl(residual) and _is_cl(x)


def _grid2(M: int, C: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))


def _reduction_rows(M: int) -> int:
    rows = triton.cdiv(M, TARGET_PARTIALS)
    return max(MAX_BLOCK_M, triton.cdiv(rows, MAX_BLOCK_M) * MAX_BLOCK_M)


def _residual_args(residual: Tensor | None, x: Tensor, stride: int) -> tuple:
    if residual is None:
        return (x, 0, 0, 0, 0, 0, 1)
    return (residual, residual.shape[1], *residual.stride(), stride)
