"""``norm_conv`` in Triton: issue 18's "NormConvolution" forward as one implicit-GEMM kernel.

Formula: :func:`resnet_fast.ops.reference.norm_conv`. A program owns BLOCK_M output pixels (rows
of the (N*OH*OW, K) output) by BLOCK_N output channels. For each tap of the kernel and each
BLOCK_K slice of input channels it loads the input pixels that tap reads, applies the previous
BatchNorm's scale and shift and ReLU to them as they arrive (the *prologue*: the normalised
activation is never written to memory), zeroes what falls in the padding (the padding is the
normalised activation's), and accumulates ``tl.dot`` with the weight's slice. Its *epilogue*
stores the output and reduces its own tile to each channel's mean and sum of squared deviations
(the tile centred on its own mean, as the statistics kernel of :mod:`.batch_norm_act` does), one
float64 partial per program row; the statistics kernel's finalize merges them in order with
Chan's formula: deterministic, no atomics.

Not routed yet: it is on by default nowhere until a GPU has measured it against cuDNN's
convolution followed by the statistics pass (bench/test_gpu.py). The kernel is the forward; its
autograd (:mod:`resnet_fast.ops.norm_conv`) is PyTorch's ops, unfused, and the fused backward (the
data gradient with the ReLU mask and the BatchNorm weight and bias reductions in its epilogue) is
the next step. Float32 products follow ``torch.backends.cudnn.allow_tf32``, as PyTorch's
convolutions on GPUs do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FINALIZE_BLOCK_C, INTERPRET, _acc_dtype
from .batch_norm_act import _stats_finalize_kernel


@triton.jit
def _norm_conv_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, pmean_ptr, pm2_ptr,
    M, C, H, W, K, OHW, OW, sN, sC, sH, sW, wsK, wsC, wsR, wsS, ysN, ysK, ysH, ysW, stride, padding,
    R: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_m = tl.program_id(0)
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    k = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mmask = m < M
    kmask = k < K
    n = m // OHW
    ohw = m - n * OHW
    oh = ohw // OW
    ow = ohw - oh * OW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
    for r in range(R):
        ih = oh * stride - padding + r
        for s in range(R):
            iw = ow * stride - padding + s
            inside = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pixel = n * sN + ih * sH + iw * sW
            for c0 in range(0, C, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
                cmask = c < C
                amask = inside[:, None] & cmask[None, :]
                a = tl.load(x_ptr + pixel[:, None] + (c * sC)[None, :], mask=amask, other=0.0).to(acc_t)
                if HAS_SCALE:  # the prologue: the previous BatchNorm, as the input arrives
                    sc = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(acc_t)
                    sh = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(acc_t)
                    a = tl.where(amask, a * sc[None, :] + sh[None, :], 0.0)  # (the padding stays 0)
                if RELU:
                    a = tl.maximum(a, 0.0)
                b = tl.load(
                    w_ptr + (k * wsK)[None, :] + (c * wsC)[:, None] + r * wsR + s * wsS,
                    mask=cmask[:, None] & kmask[None, :], other=0.0,
                ).to(acc_t)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # The epilogue: the output, and this tile's statistics per channel.
    omask = mmask[:, None] & kmask[None, :]
    y_off = (n * ysN + oh * ysH + ow * ysW)[:, None] + (k * ysK)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off, out, mask=omask)
    v = out.to(acc_t)
    rows = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(acc_t)
    mb = tl.sum(tl.where(omask, v, 0.0), axis=0) / rows
    d = tl.where(omask, v - mb[None, :], 0.0)
    tl.store(pmean_ptr + pid_m * K + k, mb.to(tl.float64), mask=kmask)
    tl.store(pm2_ptr + pid_m * K + k, tl.sum(d * d, axis=0).to(tl.float64), mask=kmask)


def _blocks(fp64: bool) -> dict:
    """Fixed tiles (not autotuned yet): tl.dot needs 16 or more in every dimension; float64 and
    the interpreter (whose cost is per program and per element) take smaller ones."""
    if INTERPRET:
        return {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
    if fp64:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}


def norm_conv(
    x: Tensor, weight: Tensor, stride: int, padding: int, scale: Tensor | None, shift: Tensor | None, relu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    N, C, H, W = x.shape
    K, R = weight.shape[0], weight.shape[2]
    OH, OW = (H + 2 * padding - R) // stride + 1, (W + 2 * padding - R) // stride + 1
    acc = _acc_dtype(x)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    y = torch.empty((N, K, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    M = N * OH * OW
    mean = torch.zeros(K, dtype=acc, device=x.device)
    var = torch.zeros(K, dtype=acc, device=x.device)
    if M == 0 or K == 0:
        return y, mean, var
    fp64 = acc == torch.float64
    blocks = _blocks(fp64)
    P = triton.cdiv(M, blocks["BLOCK_M"])
    pmean = torch.empty(P, K, dtype=torch.float64, device=x.device)
    pm2 = torch.empty(P, K, dtype=torch.float64, device=x.device)
    has_scale = scale is not None
    sc = scale.contiguous() if has_scale else x
    sh = shift.contiguous() if has_scale else x
    precision = "tf32" if not fp64 and not INTERPRET and torch.backends.cudnn.allow_tf32 else "ieee"
    grid = (P, triton.cdiv(K, blocks["BLOCK_N"]))
    _norm_conv_kernel[grid](
        x, weight, sc, sh, y, pmean, pm2,
        M, C, H, W, K, OH * OW, OW, *x.stride(), *weight.stride(), *y.stride(), stride, padding,
        R=R, HAS_SCALE=has_scale, RELU=relu, FP64=fp64, PRECISION=precision, **blocks,
    )
    _stats_finalize_kernel[(triton.cdiv(K, FINALIZE_BLOCK_C),)](
        # (mean and var stand in for the affine pointers, which AFFINE=False leaves unread.)
        pmean, pm2, mean, var, mean, var, mean, var, M, K, P, blocks["BLOCK_M"], 0.0,
        FP64=fp64, AFFINE=False, BLOCK_C=FINALIZE_BLOCK_C,
    )
    return y, mean, var
