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

``norm_conv_backward`` is two more implicit GEMMs, each folding the statistics' gradients into y's
as it loads them (``g = grad_y + c0[k] + c1[k] * y``: the next BatchNorm's backward through its
mean and variance):

* the data gradient (``_norm_conv_dgrad_kernel``): a program owns BLOCK_M *input* pixels by
  BLOCK_N input channels and gathers, for each tap, the output pixels that read them (at stride s
  only the taps with ``ih + padding - r`` a multiple of s); its epilogue reloads x there,
  recomputes the prologue's pre-activation, applies the ReLU mask and the scale (the gradient of
  x), and reduces the tile to per-channel partials of the scale's and the shift's gradients;
* the weight gradient (``_norm_conv_wgrad_kernel``): a program owns BLOCK_N output channels by
  BLOCK_C input channels of one tap and a slice of the output pixels (split over programs so that
  small weights still fill a GPU), recomputing the normalised input in its prologue as the forward
  does; the slices' partials are summed in order.

So the backward reads x, y, grad_y and the weight, writes the gradients, and neither the
normalised activation nor the folded gradient is ever in memory. On by default nowhere (the
residual blocks take it with ``RESNET_FAST_NORM_CONV=1``) until a GPU has measured it against
cuDNN's convolutions (forward and backward) and the statistics passes (bench/test_gpu.py). Float32 products follow
``torch.backends.cudnn.allow_tf32``, as PyTorch's convolutions on GPUs do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FINALIZE_BLOCK_C, INTERPRET, _acc_dtype
from .batch_norm_act import _stats_finalize_kernel


@triton.jit
def _load_normalised(x_ptr, pixel, c, sC, inside, cmask, scale_ptr, shift_ptr, acc_t: tl.constexpr,
                     HAS_SCALE: tl.constexpr, RELU: tl.constexpr):
    """The prologue, shared by the forward and the weight gradient (which recomputes it): the
    input tile at ``pixel`` (rows) by channels ``c``, ``[relu](x * scale[c] + shift[c])``, zero
    outside the map (the padding is the normalised activation's)."""
    amask = inside[:, None] & cmask[None, :]
    a = tl.load(x_ptr + pixel[:, None] + (c * sC)[None, :], mask=amask, other=0.0).to(acc_t)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(acc_t)
        sh = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(acc_t)
        a = tl.where(amask, a * sc[None, :] + sh[None, :], 0.0)
    if RELU:
        a = tl.maximum(a, 0.0)
    return a


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
                # The prologue: the previous BatchNorm, as the input arrives.
                a = _load_normalised(x_ptr, pixel, c, sC, inside, cmask, scale_ptr, shift_ptr, acc_t, HAS_SCALE, RELU)
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


@triton.jit
def _norm_conv_dgrad_kernel(
    g_ptr, y_ptr, c0_ptr, c1_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, gx_ptr, pgs_ptr, pgb_ptr,
    M, C, H, W, K, OH, OW, gsN, gsK, gsH, gsW, ysN, ysK, ysH, ysW, wsK, wsC, wsR, wsS,
    sN, sC, sH, sW, gxsN, gxsC, gxsH, gxsW, stride, padding,
    R: tl.constexpr, HAS_G: tl.constexpr, FOLD: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_SS: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_m = tl.program_id(0)
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mmask = m < M
    cmask = c < C
    HW = H * W
    n = m // HW
    hw = m - n * HW
    ih = hw // W
    iw = hw - ih * W
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
    for r in range(R):
        th = ih + padding - r  # = oh * stride where an output pixel reads this one through tap r
        oh = th // stride
        for s in range(R):
            tw = iw + padding - s
            ow = tw // stride
            valid = (mmask & (th >= 0) & (tw >= 0) & (th - oh * stride == 0) & (tw - ow * stride == 0)
                     & (oh < OH) & (ow < OW))
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                kmask = k < K
                amask = valid[:, None] & kmask[None, :]
                if HAS_G:
                    a = tl.load(g_ptr + (n * gsN + oh * gsH + ow * gsW)[:, None] + (k * gsK)[None, :],
                                mask=amask, other=0.0).to(acc_t)
                else:
                    a = tl.zeros([BLOCK_M, BLOCK_K], dtype=acc_t)
                if FOLD:  # the statistics' gradients, folded in as grad_y arrives
                    yv = tl.load(y_ptr + (n * ysN + oh * ysH + ow * ysW)[:, None] + (k * ysK)[None, :],
                                 mask=amask, other=0.0).to(acc_t)
                    c0 = tl.load(c0_ptr + k, mask=kmask, other=0.0).to(acc_t)
                    c1 = tl.load(c1_ptr + k, mask=kmask, other=0.0).to(acc_t)
                    a = tl.where(amask, a + c0[None, :] + c1[None, :] * yv, 0.0)
                b = tl.load(
                    w_ptr + (k * wsK)[:, None] + (c * wsC)[None, :] + r * wsR + s * wsS,
                    mask=kmask[:, None] & cmask[None, :], other=0.0,
                ).to(acc_t)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    # The epilogue: the prologue's chain rule at these input pixels.
    omask = mmask[:, None] & cmask[None, :]
    pixel = (n * sN + ih * sH + iw * sW)[:, None] + (c * sC)[None, :]
    gp = acc
    if HAS_SCALE:
        xv = tl.load(x_ptr + pixel, mask=omask, other=0.0).to(acc_t)
        sc = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(acc_t)
        if RELU:
            sh = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(acc_t)
            gp = tl.where(xv * sc[None, :] + sh[None, :] > 0, gp, 0.0)
        if NEED_GX:
            gx = gp * sc[None, :]
        if NEED_SS:
            gp0 = tl.where(omask, gp, 0.0)
            tl.store(pgs_ptr + pid_m * C + c, tl.sum(gp0 * xv, axis=0).to(tl.float64), mask=cmask)
            tl.store(pgb_ptr + pid_m * C + c, tl.sum(gp0, axis=0).to(tl.float64), mask=cmask)
    else:
        if RELU:
            xv = tl.load(x_ptr + pixel, mask=omask, other=0.0).to(acc_t)
            gp = tl.where(xv > 0, gp, 0.0)
        gx = gp
    if NEED_GX:
        gx_off = (n * gxsN + ih * gxsH + iw * gxsW)[:, None] + (c * gxsC)[None, :]
        tl.store(gx_ptr + gx_off, gx.to(gx_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _norm_conv_wgrad_kernel(
    g_ptr, y_ptr, c0_ptr, c1_ptr, x_ptr, scale_ptr, shift_ptr, pw_ptr,
    M, C, H, W, K, OHW, OW, CHUNK, gsN, gsK, gsH, gsW, ysN, ysK, ysH, ysW, sN, sC, sH, sW, stride, padding,
    R: tl.constexpr, HAS_G: tl.constexpr, FOLD: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t: tl.constexpr = tl.float64 if FP64 else tl.float32
    k = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    t = tl.program_id(2)
    tap = t % (R * R)
    split = t // (R * R)
    r = tap // R
    s = tap - r * R
    kmask = k < K
    cmask = c < C
    if FOLD:
        c0 = tl.load(c0_ptr + k, mask=kmask, other=0.0).to(acc_t)
        c1 = tl.load(c1_ptr + k, mask=kmask, other=0.0).to(acc_t)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_t)
    start = split.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, M)
    for m0 in range(start, end, BLOCK_P):
        m = m0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mmask = m < end
        n = m // OHW
        ohw = m - n * OHW
        oh = ohw // OW
        ow = ohw - oh * OW
        gmask = kmask[:, None] & mmask[None, :]
        if HAS_G:
            gt = tl.load(g_ptr + (k * gsK)[:, None] + (n * gsN + oh * gsH + ow * gsW)[None, :],
                         mask=gmask, other=0.0).to(acc_t)
        else:
            gt = tl.zeros([BLOCK_N, BLOCK_P], dtype=acc_t)
        if FOLD:
            yv = tl.load(y_ptr + (k * ysK)[:, None] + (n * ysN + oh * ysH + ow * ysW)[None, :],
                         mask=gmask, other=0.0).to(acc_t)
            gt = tl.where(gmask, gt + c0[:, None] + c1[:, None] * yv, 0.0)
        ih = oh * stride - padding + r
        iw = ow * stride - padding + s
        inside = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # The forward's prologue, recomputed.
        a = _load_normalised(x_ptr, n * sN + ih * sH + iw * sW, c, sC, inside, cmask, scale_ptr, shift_ptr, acc_t,
                             HAS_SCALE, RELU)
        acc = tl.dot(gt, a, acc, input_precision=PRECISION)
    out = pw_ptr + split.to(tl.int64) * (K * C * R * R) + (k * (C * R * R))[:, None] + (c * (R * R))[None, :] + tap
    tl.store(out, acc, mask=kmask[:, None] & cmask[None, :])


def _blocks(fp64: bool) -> dict:
    """Fixed tiles (not autotuned yet): tl.dot needs 16 or more in every dimension; float64 and
    the interpreter (whose cost is per program and per element) take smaller ones."""
    if INTERPRET:
        return {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}
    if fp64:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4}


def _backward_blocks(fp64: bool) -> tuple[dict, dict]:
    """The data gradient's and the weight gradient's fixed tiles (as :func:`_blocks`)."""
    if INTERPRET:
        return ({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4},
                {"BLOCK_N": 16, "BLOCK_C": 16, "BLOCK_P": 16, "num_warps": 4})
    if fp64:
        return ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4},
                {"BLOCK_N": 32, "BLOCK_C": 32, "BLOCK_P": 16, "num_warps": 4})
    return ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4},
            {"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_P": 32, "num_warps": 4})


def _splits(M: int, programs: int, block_p: int, device: torch.device) -> int:
    """How many slices of the output pixels the weight gradient's programs share out: enough
    programs for two per GPU multiprocessor, each slice at least four BLOCK_P long (under the
    interpreter, slices of four BLOCK_P, at most 8, so that the tests cross slices)."""
    most = max(1, triton.cdiv(M, 4 * block_p))
    if INTERPRET or device.type != "cuda":
        return min(most, 8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(most, triton.cdiv(2 * sms, programs)))


def norm_conv_backward(
    grad_y: Tensor | None, x: Tensor, weight: Tensor, stride: int, padding: int, scale: Tensor | None,
    shift: Tensor | None, relu: bool, y: Tensor, mean: Tensor, grad_mean: Tensor | None,
    grad_var: Tensor | None, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    N, C, H, W = x.shape
    K, R = weight.shape[0], weight.shape[2]
    OH, OW = y.shape[2], y.shape[3]
    acc = _acc_dtype(x)
    fp64 = acc == torch.float64
    has_scale = scale is not None
    need_x, need_w, need_ss = output_mask[0], output_mask[1], output_mask[2] and has_scale
    empty = x.new_empty(0)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_x else empty
    grad_w = empty
    grad_scale = grad_shift = empty
    count = max(N * OH * OW, 1)
    # The statistics' gradients: d mean / d y = 1 / count, d var / d y = 2 (y - mean) / count, so
    # g = grad_y + c0[k] + c1[k] * y with c1 = 2 grad_var / count, c0 = grad_mean / count - c1 * mean.
    fold = grad_mean is not None or grad_var is not None
    c0 = torch.zeros(K, dtype=acc, device=x.device)
    c1 = torch.zeros(K, dtype=acc, device=x.device)
    if grad_var is not None:
        c1 = grad_var.to(acc) * (2.0 / count)
        c0 = c0 - c1 * mean.to(acc)
    if grad_mean is not None:
        c0 = c0 + grad_mean.to(acc) / count
    has_g = grad_y is not None
    g = grad_y if has_g else y
    sc = scale.contiguous() if has_scale else x
    sh = shift.contiguous() if has_scale else x
    precision = "tf32" if not fp64 and not INTERPRET and torch.backends.cudnn.allow_tf32 else "ieee"
    dblocks, wblocks = _backward_blocks(fp64)
    M_in, M_out = N * H * W, N * OH * OW
    flags = {"R": R, "HAS_G": has_g, "FOLD": fold, "HAS_SCALE": has_scale, "RELU": relu, "FP64": fp64,
             "PRECISION": precision}
    if (need_x or need_ss) and M_in > 0 and C > 0:
        P = triton.cdiv(M_in, dblocks["BLOCK_M"])
        pgs = torch.empty(P if need_ss else 1, C, dtype=torch.float64, device=x.device)
        pgb = torch.empty_like(pgs)
        _norm_conv_dgrad_kernel[(P, triton.cdiv(C, dblocks["BLOCK_N"]))](
            g, y, c0, c1, weight, x, sc, sh, grad_x if need_x else x, pgs, pgb,
            M_in, C, H, W, K, OH, OW, *g.stride(), *y.stride(), *weight.stride(), *x.stride(),
            *(grad_x.stride() if need_x else x.stride()), stride, padding,
            NEED_GX=need_x, NEED_SS=need_ss, **flags, **dblocks,
        )
        if need_ss:
            grad_scale, grad_shift = pgs.sum(0).to(scale.dtype), pgb.sum(0).to(shift.dtype)
    elif need_ss:
        grad_scale, grad_shift = torch.zeros_like(scale), torch.zeros_like(shift)
    if need_w:
        if M_out == 0 or K == 0 or C == 0:
            grad_w = torch.zeros_like(weight)
        else:
            base = triton.cdiv(K, wblocks["BLOCK_N"]) * triton.cdiv(C, wblocks["BLOCK_C"]) * R * R
            splits = _splits(M_out, base, wblocks["BLOCK_P"], x.device)
            chunk = triton.cdiv(triton.cdiv(M_out, splits), wblocks["BLOCK_P"]) * wblocks["BLOCK_P"]
            splits = triton.cdiv(M_out, chunk)
            pw = torch.empty(splits, K, C, R, R, dtype=acc, device=x.device)
            _norm_conv_wgrad_kernel[(triton.cdiv(K, wblocks["BLOCK_N"]), triton.cdiv(C, wblocks["BLOCK_C"]),
                                     R * R * splits)](
                g, y, c0, c1, x, sc, sh, pw,
                M_out, C, H, W, K, OH * OW, OW, chunk, *g.stride(), *y.stride(), *x.stride(), stride, padding,
                **flags, **wblocks,
            )
            grad_w = (pw[0] if splits == 1 else pw.sum(0)).to(weight.dtype)
    return grad_x, grad_w, grad_scale, grad_shift


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
