"""Triton kernels of batch_norm_act (and of bias_act, which runs the same apply kernel with a
scale of 1), and their launchers: the forward's statistics, their merge and the apply; the
backward's reduction, its merge and the apply.

Formula: :func:`resnet_fast.ops.reference.batch_norm_act` (csrc/common/batch_norm_act.h has the same
math for the C++ kernels). The ops that call the launchers are defined in resnet_fast/triton/__init__.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format

from ._common import (
    FINALIZE_BLOCK_C,
    _acc_dtype,
    _chan_merge,
    _grid2,
    _interpret_blocks,
    _is_cl,
    _like,
    _masked_grad,
    _r_dense,
    _reduction_rows,
    _residual_args,
    _residual_rows,
    _store_scale_shift,
    _tile_offsets,
    _tuned,
)

# ------------------------------------------------------------------------------------------
# Forward: statistics, then normalise (+ residual) (+ ReLU)
# ------------------------------------------------------------------------------------------


@triton.jit
def _stats_kernel(
    x_ptr, pmean_ptr, pm2_ptr, M, C, HW, W, sN, sC, sH, sW, ROWS,
    IS_CL: tl.constexpr, FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Mean and sum of squared deviations of rows [pid*ROWS, (pid+1)*ROWS) per channel, each
    BLOCK_M chunk centred on its own mean (in the accumulation type) and merged with Chan's
    formula in float64: one merge per chunk and channel costs nothing next to the chunk's loads,
    and keeps the mean of a large-offset channel exact to float32 rounding."""
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_m = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    first = pid_m.to(tl.int64) * ROWS
    for start in range(first, tl.minimum(first + ROWS, M), BLOCK_M):
        m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (m < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + _tile_offsets(m, c, C, HW, W, sN, sC, sH, sW, IS_CL), mask=mask, other=0.0).to(acc_t)
        nb_acc = tl.minimum(M - start, BLOCK_M).to(acc_t)
        mb_acc = tl.sum(x, axis=0) / nb_acc
        d = tl.where(mask, x - mb_acc[None, :], 0.0)
        m2b = tl.sum(d * d, axis=0).to(tl.float64)
        count, mean, m2 = _chan_merge(count, mean, m2, nb_acc.to(tl.float64), mb_acc.to(tl.float64), m2b)
    tl.store(pmean_ptr + pid_m * C + c, mean, mask=cmask)
    tl.store(pm2_ptr + pid_m * C + c, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(
    pmean_ptr, pm2_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, scale_ptr, shift_ptr, M, C, P, ROWS, eps,
    FP64: tl.constexpr, AFFINE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the P float64 partials of each channel in order (each of ROWS rows, the last of the
    rest); writes mean, biased var, and where AFFINE the per-channel scale = weight / sqrt(var +
    eps) and shift = bias - mean * scale."""
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p in range(0, P):
        nb = tl.minimum(M - p * ROWS, ROWS).to(tl.float64)
        mb = tl.load(pmean_ptr + p * C + c, mask=cmask, other=0.0)
        m2b = tl.load(pm2_ptr + p * C + c, mask=cmask, other=0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, nb, mb, m2b)
    var = tl.where(cmask, m2 / count, 1.0).to(acc_t)  # (1 in the lanes past C: no 0/0 there)
    mean = mean.to(acc_t)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    if AFFINE:
        _store_scale_shift(scale_ptr, shift_ptr, w_ptr, b_ptr, mean, var, c, cmask, eps, acc_t)


@triton.jit
def _affine_kernel(mean_ptr, var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, C, eps, FP64: tl.constexpr, BLOCK_C: tl.constexpr):
    """Eval: scale and shift from the running statistics."""
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(acc_t)
    var = tl.load(var_ptr + c, mask=cmask, other=1.0).to(acc_t)
    _store_scale_shift(scale_ptr, shift_ptr, w_ptr, b_ptr, mean, var, c, cmask, eps, acc_t)


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, r_ptr, scale_ptr, shift_ptr, M, C, HW, W,
    sN, sC, sH, sW, ysN, ysC, ysH, ysW, Cr, rsN, rsC, rsH, rsW, RS,
    IS_CL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, R_DENSE: tl.constexpr,
    RELU: tl.constexpr, FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = act(x * scale + shift + r). Without HAS_SCALE, scale is 1 (the inference epilogue:
    shift is the folded bias). IS_CL: x and y are dense channels_last (offsets m * C + c)."""
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    mask = (m < M)[:, None] & cmask[None, :]
    v = tl.load(x_ptr + _tile_offsets(m, c, C, HW, W, sN, sC, sH, sW, IS_CL), mask=mask, other=0.0).to(acc_t)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + c, mask=cmask, other=0.0).to(acc_t)[None, :]
    v = v + tl.load(shift_ptr + c, mask=cmask, other=0.0).to(acc_t)[None, :]
    if HAS_RESIDUAL:
        v = v + _residual_rows(r_ptr, m, c, mask, C, HW, W, Cr, rsN, rsC, rsH, rsW, RS, R_DENSE).to(acc_t)
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)  # NaN passes, as torch.relu
    y_off = _tile_offsets(m, c, C, HW, W, ysN, ysC, ysH, ysW, IS_CL)
    tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------


@triton.jit
def _backward_reduce_kernel(
    dy_ptr, y_ptr, x_ptr, mean_ptr, dz_ptr, psum_ptr, pdot_ptr, M, C, HW, W,
    sN, sC, sH, sW, ROWS,
    IS_CL: tl.constexpr, RELU: tl.constexpr, WRITE_DZ: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel over rows [pid*ROWS, (pid+1)*ROWS): sum(dz) and sum(dz * (x - mean)), with
    dz = dy * (y > 0); dz is also written when the residual needs its gradient. All of
    dy, y, x, dz share one layout (the launcher makes them)."""
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_m = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(acc_t)
    s = tl.zeros([BLOCK_C], dtype=acc_t)
    dot = tl.zeros([BLOCK_C], dtype=acc_t)
    first = pid_m.to(tl.int64) * ROWS
    for start in range(first, tl.minimum(first + ROWS, M), BLOCK_M):
        m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (m < M)[:, None] & cmask[None, :]
        off = _tile_offsets(m, c, C, HW, W, sN, sC, sH, sW, IS_CL)
        dz = _masked_grad(dy_ptr, y_ptr, off, mask, RELU, acc_t)
        if WRITE_DZ:
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_t)
        s += tl.sum(dz, axis=0)
        dot += tl.sum(dz * tl.where(mask, x - mean[None, :], 0.0), axis=0)
    tl.store(psum_ptr + pid_m * C + c, s, mask=cmask)
    tl.store(pdot_ptr + pid_m * C + c, dot, mask=cmask)


@triton.jit
def _backward_finalize_kernel(
    psum_ptr, pdot_ptr, var_ptr, w_ptr, dw_ptr, db_ptr, coef_ptr, M, C, P, eps,
    TRAINING: tl.constexpr, FP64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sums the partials in order: dbias = sum(dz), dweight = sum(dz * xmu) * invstd; and the
    coefficients of dx = (dz - a - xmu * k) * scale: a = sum(dz) / M, k = invstd^2 * sum(dz * xmu) / M
    in training (0 in eval), scale = invstd * weight."""
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    s = tl.zeros([BLOCK_C], dtype=acc_t)
    dot = tl.zeros([BLOCK_C], dtype=acc_t)
    for p in range(0, P):
        s += tl.load(psum_ptr + p * C + c, mask=cmask, other=0.0)
        dot += tl.load(pdot_ptr + p * C + c, mask=cmask, other=0.0)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cmask, other=1.0).to(acc_t) + eps)
    weight = tl.load(w_ptr + c, mask=cmask, other=0.0).to(acc_t)
    tl.store(db_ptr + c, s, mask=cmask)
    tl.store(dw_ptr + c, dot * invstd, mask=cmask)
    if TRAINING:
        a = s / M
        k = invstd * invstd * dot / M
    else:
        a = tl.zeros([BLOCK_C], dtype=acc_t)
        k = tl.zeros([BLOCK_C], dtype=acc_t)
    tl.store(coef_ptr + c, a, mask=cmask)
    tl.store(coef_ptr + C + c, k, mask=cmask)
    tl.store(coef_ptr + 2 * C + c, invstd * weight, mask=cmask)


@triton.jit
def _backward_apply_kernel(
    g_ptr, y_ptr, x_ptr, mean_ptr, coef_ptr, dx_ptr, M, C, HW, W, sN, sC, sH, sW,
    IS_CL: tl.constexpr, RELU: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = (dz - a - (x - mean) * k) * scale. ``g`` is dz itself (RELU False: already masked,
    or no ReLU) or dy (RELU True: masked here by y > 0)."""
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = c < C
    mask = (m < M)[:, None] & cmask[None, :]
    off = _tile_offsets(m, c, C, HW, W, sN, sC, sH, sW, IS_CL)
    dz = _masked_grad(g_ptr, y_ptr, off, mask, RELU, acc_t)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_t)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(acc_t)
    a = tl.load(coef_ptr + c, mask=cmask, other=0.0)
    k = tl.load(coef_ptr + C + c, mask=cmask, other=0.0)
    scale = tl.load(coef_ptr + 2 * C + c, mask=cmask, other=0.0)
    dx = (dz - a[None, :] - (x - mean[None, :]) * k[None, :]) * scale[None, :]
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_stats = _tuned(_stats_kernel, ["M", "C", "IS_CL"])
_apply = _tuned(_apply_kernel, ["M", "C", "IS_CL", "HAS_RESIDUAL", "R_DENSE"])
_backward_reduce = _tuned(_backward_reduce_kernel, ["M", "C", "IS_CL", "WRITE_DZ"])
_backward_apply = _tuned(_backward_apply_kernel, ["M", "C", "IS_CL"])


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------


def batch_norm_act(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    residual: Tensor | None, residual_stride: int, training: bool, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    N, C, H, W = x.shape
    M, acc = N * H * W, _acc_dtype(x)
    fp64 = acc == torch.float64
    y = _like(x)
    if training:
        mean = torch.zeros(C, dtype=acc, device=x.device)
        var = torch.zeros(C, dtype=acc, device=x.device)
    else:
        mean = running_mean.to(acc, copy=True).contiguous()
        var = running_var.to(acc, copy=True).contiguous()
    if x.numel() == 0:
        return y, mean, var
    scale = torch.empty(C, dtype=acc, device=x.device)
    shift = torch.empty(C, dtype=acc, device=x.device)
    cl = _is_cl(x)
    blocks = _interpret_blocks(x)
    fin_grid = (triton.cdiv(C, FINALIZE_BLOCK_C),)
    weight, bias = weight.contiguous(), bias.contiguous()
    if training:
        rows = _reduction_rows(M)
        P = triton.cdiv(M, rows)
        pmean = torch.empty(P, C, dtype=torch.float64, device=x.device)
        pm2 = torch.empty(P, C, dtype=torch.float64, device=x.device)
        _stats[lambda meta: (P, triton.cdiv(C, meta["BLOCK_C"]))](
            x, pmean, pm2, M, C, H * W, W, *x.stride(), rows, IS_CL=cl, FP64=fp64, **blocks
        )
        _stats_finalize_kernel[fin_grid](
            pmean, pm2, weight, bias, mean, var, scale, shift, M, C, P, rows, eps, FP64=fp64, AFFINE=True,
            BLOCK_C=FINALIZE_BLOCK_C
        )
    else:
        _affine_kernel[fin_grid](mean, var, weight, bias, scale, shift, C, eps, FP64=fp64, BLOCK_C=FINALIZE_BLOCK_C)
    r = _residual_args(residual, x, residual_stride)
    _apply[_grid2(M, C)](
        x, y, r[0], scale, shift, M, C, H * W, W, *x.stride(), *y.stride(), *r[1:],
        IS_CL=cl, HAS_SCALE=True, HAS_RESIDUAL=residual is not None, R_DENSE=_r_dense(residual, x, residual_stride),
        RELU=relu, FP64=fp64, **blocks,
    )
    return y, mean, var


def bias_act(x: Tensor, bias: Tensor, residual: Tensor | None, residual_stride: int, relu: bool) -> Tensor:
    N, C, H, W = x.shape
    y = _like(x)
    if x.numel() == 0:
        return y
    r = _residual_args(residual, x, residual_stride)
    _apply[_grid2(N * H * W, C)](
        x, y, r[0], bias, bias.contiguous(), N * H * W, C, H * W, W, *x.stride(), *y.stride(), *r[1:],
        IS_CL=_is_cl(x), HAS_SCALE=False, HAS_RESIDUAL=residual is not None,
        R_DENSE=_r_dense(residual, x, residual_stride), RELU=relu,
        FP64=x.dtype == torch.float64, **_interpret_blocks(x),
    )
    return y


def batch_norm_act_backward(
    grad_y: Tensor, x: Tensor, output: Tensor | None, weight: Tensor, mean: Tensor, var: Tensor,
    training: bool, eps: float, relu: bool, residual_grad: bool, bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # (bias: the CPU kernel recomputes the ReLU mask from x with it; this kernel reads the output.)
    N, C, H, W = x.shape
    M, acc = N * H * W, _acc_dtype(x)
    fp64 = acc == torch.float64
    fmt = suggest_memory_format(x)
    # One layout for every per-element tensor, so that one set of strides addresses them all.
    x = x.contiguous(memory_format=fmt)
    grad_y = grad_y.contiguous(memory_format=fmt)
    y = output.contiguous(memory_format=fmt) if relu else x
    grad_x = torch.empty_like(x, memory_format=fmt)
    grad_weight = torch.zeros(C, dtype=acc, device=x.device)
    grad_bias = torch.zeros(C, dtype=acc, device=x.device)
    grad_z = torch.empty_like(x, memory_format=fmt) if residual_grad else x.new_empty((0,))
    if x.numel() == 0:
        return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), grad_z
    cl = _is_cl(x)
    blocks = _interpret_blocks(x)
    rows = _reduction_rows(M)
    P = triton.cdiv(M, rows)
    psum = torch.empty(P, C, dtype=acc, device=x.device)
    pdot = torch.empty(P, C, dtype=acc, device=x.device)
    mean = mean.to(acc).contiguous()
    _backward_reduce[lambda meta: (P, triton.cdiv(C, meta["BLOCK_C"]))](
        grad_y, y, x, mean, grad_z if residual_grad else grad_y, psum, pdot, M, C, H * W, W, *x.stride(), rows,
        IS_CL=cl, RELU=relu, WRITE_DZ=residual_grad, FP64=fp64, **blocks,
    )
    coef = torch.empty(3, C, dtype=acc, device=x.device)
    _backward_finalize_kernel[(triton.cdiv(C, FINALIZE_BLOCK_C),)](
        psum, pdot, var.contiguous(), weight.contiguous(), grad_weight, grad_bias, coef, M, C, P, eps,
        TRAINING=training, FP64=fp64, BLOCK_C=FINALIZE_BLOCK_C,
    )
    g, mask_here = (grad_z, False) if residual_grad else (grad_y, relu)
    _backward_apply[_grid2(M, C)](
        g, y, x, mean, coef, grad_x, M, C, H * W, W, *x.stride(), IS_CL=cl, RELU=mask_here, FP64=fp64, **blocks
    )
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), grad_z
