"""Which implementation runs: every decision of that kind, in one place.

The modules (:mod:`resnet_fast.nn`, :mod:`resnet_fast.models`) and the op wrappers
(:mod:`resnet_fast.ops`) ask the functions below; they do not re-derive the answers. Each
threshold is a named constant with the measurement behind it. The C++ kernels decide nothing of
this: they receive the decision as an argument (e.g. ``conv3x3_train(..., winograd, ...)``) and
check only that they can carry it out.

=======================================  =====================================================
question                                 function
=======================================  =====================================================
is something capturing the model?        :func:`formulas_only` (TorchScript, torch.export,
                                         ONNX export, torch.fx: PyTorch's own ops only)
does a module run its own forward?       :func:`steps_aside` (hooks, subclasses, norm layers
                                         of other types), :func:`may_bypass_call`
which implementation of an op?           :func:`impl_for` (backend and device)
is the fused path on for a device?       :func:`fused_path`
BatchNorm (+ add) (+ ReLU)               :func:`batch_norm_act_impl`
a training 3x3 convolution               :func:`conv3x3_train_plan` (our op? Winograd? our
                                         weight gradient?), :func:`recomputes_conv_input`
                                         (keep its input, or recompute it from the BatchNorm's?)
a training 1x1 convolution               :func:`conv1x1_recomputes_input`
a stem / projection in training          :func:`recomputes_conv_output` (keep the input,
                                         recompute the convolution's output)
a block across its convolutions          :func:`norm_conv_block_applies` (GPUs, opt-in:
                                         ``norm_conv`` with the statistics in the epilogue,
                                         the BatchNorm in the next one's prologue)
inference conv + BN                      :func:`conv_bn_inference_plan` (folded: oneDNN
                                         post-ops, Winograd, our 1x1 GEMM, or cuDNN +
                                         epilogue)
max pooling                              :func:`max_pool2d_impl`
the classifier head (pool + linear)      :func:`pool_linear_applies`
layouts                                  :func:`conv_weight_format`, :func:`internal_layout`
writing a block end into its residual    :func:`may_donate_residuals`
replaying a network's recorded forward   :func:`plans_forward` (:mod:`resnet_fast._plan`)
=======================================  =====================================================

Two choices stay in C++ because they are what the kernels can do, not a routing choice
(``csrc/autograd.cpp``, ``backward_features``): on the CPU the backward of ``batch_norm_act``
recomputes the ReLU mask from x (the GPU kernels read the output) and, at a block end, runs in
two ops with the incoming gradient freed between them.

Every function is plain Python on module state, so torch.compile traces through it without a
graph break.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from . import _backend

# -- stepping aside ---------------------------------------------------------------------------


def formulas_only() -> bool:
    """True while the model is being captured for another runtime: torch.jit.trace (and the
    TorchScript-based ONNX exporter, which traces), torch.export (and the default ONNX exporter), torch.fx
    symbolic tracing (torchvision's feature extraction). The modules then run the formulas, in
    torchvision's order of module calls, so the captured graph holds PyTorch's own ops only (Conv,
    BatchNorm, ReLU, Add): it is torchvision's graph, and it runs wherever torchvision's does,
    without resnet_fast. (``torch.jit.script`` compiles the same formulas: each module's
    ``forward`` branches on ``torch.jit.is_scripting()``.)"""
    if torch.compiler.is_compiling():  # torch.compile (fused ops traced) or torch.export
        return torch.compiler.is_exporting()
    # (No torch.onnx.is_in_onnx_export(): its ONNX exporter traces with torch.jit, seen above, its
    # dynamo exporter with torch.export; and in torch 2.14 the call imports the exporter's
    # package, 2 MiB, at a training step's first BatchNorm.)
    return (
        is_fx_symbolic_tracing()
        or torch.jit.is_tracing()
        # The whole of torch.jit.trace(module, ...), whose check re-runs the Python forward outside
        # the trace and compares it with the traced graph: it must run the same formulas.
        or getattr(torch.jit._trace, "_trace_module_map", None) is not None
    )


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


def has_hooks(module: nn.Module) -> bool:
    """Forward, pre-forward or (full) backward hooks on ``module``: a fused call that does not go
    through ``module.__call__`` would not fire them."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def steps_aside(*modules: nn.Module | None) -> bool:
    """Whether these modules run their own forward instead of a fused call: a layer that is not
    exactly the class the kernels implement (a user's norm layer, SyncBatchNorm, FrozenBatchNorm2d,
    a parametrized or subclassed convolution), one with hooks of any kind, any global module hook
    (a profiler, a FLOP counter), or a capture in progress (:func:`formulas_only`)."""
    if _global_hooks() or formulas_only():
        return True
    for m in modules:
        if m is None:
            continue
        if type(m) not in (nn.Conv2d, nn.BatchNorm2d) or has_hooks(m):
            return True
    return False


def may_bypass_call(*modules: nn.Module) -> bool:
    """Whether a network's forward may run these modules' bodies without their ``__call__``: none
    has hooks or was compiled in place (``module.compile()``, which ``__call__`` would run), there
    is no global module hook and nothing is capturing the model, so that nothing would notice (e.g.
    to hand the first block how the stem made its input)."""
    return not (
        _global_hooks()
        or formulas_only()
        or any(has_hooks(m) or getattr(m, "_compiled_call_impl", None) is not None for m in modules)
    )


# -- backends ---------------------------------------------------------------------------------


def impl_for(op: str, device: torch.device) -> str:
    """The implementation that runs ``op`` on a tensor of ``device``: eager, cpu, cuda or triton.
    ``auto`` picks Triton for CUDA tensors (then the CUDA C++ kernels), the C++ kernels for CPU
    tensors; ``triton`` also takes CPU tensors under TRITON_INTERPRET=1. An op without a kernel
    for the device runs its formula."""
    backend = _backend.get_backend()
    if backend == "eager":
        return "eager"
    kind = device.type
    if backend == "triton":
        if kind == "cuda" or (kind == "cpu" and _backend.TRITON_INTERPRET):
            return "triton" if _backend.has_kernel(op, "triton") else "eager"
        raise RuntimeError(
            f"resnet_fast backend 'triton' was selected but {op} got a tensor on {device}; Triton runs CUDA "
            "tensors (and CPU tensors only with TRITON_INTERPRET=1 set before import)"
        )
    if backend in ("cpu", "cuda") and kind != backend:
        raise RuntimeError(
            f"resnet_fast backend {backend!r} was selected but {op} got a tensor on {device}; "
            f"move the tensor to {backend} or call resnet_fast.set_backend('auto')"
        )
    if backend == "auto" and kind == "cuda" and _backend.has_kernel(op, "triton"):
        return "triton"
    if kind in ("cpu", "cuda") and _backend.has_kernel(op, kind):
        return kind
    return "eager"


def fused_path(device: torch.device) -> bool:
    """Whether the models run their fused path (BatchNorm fused with the add and ReLU, folded in
    inference) for tensors on ``device``: the backend is not eager and batch_norm_act has a kernel."""
    return impl_for("batch_norm_act", device) != "eager"


# The dtypes each implementation of batch_norm_act / bias_act computes (the CPU kernels dispatch
# on float32, float64 and bfloat16; the GPU kernels also take float16).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


def batch_norm_act_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> str:
    """The implementation of ``batch_norm_act`` for this input: the formula for a BatchNorm
    without affine parameters (the kernels take a weight and a bias), a non-4-D input (whose
    error the formula reports as PyTorch does) and dtypes the kernels lack (float16 on the CPU)."""
    impl = impl_for("batch_norm_act", x.device)
    if impl == "eager" or weight is None or bias is None or x.dim() != 4 or x.dtype not in KERNEL_DTYPES[impl]:
        return "eager"
    return impl


def elementwise_impl(op: str, x: Tensor) -> str:
    """``zero_pad_shortcut`` and ``bias_act``: the device's kernel where it takes the dtype."""
    impl = impl_for(op, x.device)
    if impl == "eager" or (op == "bias_act" and x.dtype not in KERNEL_DTYPES[impl]):
        return "eager"
    return impl


# -- convolutions -----------------------------------------------------------------------------

# The CPU's vector ISA as ATen sees it ("AVX512", "AVX2", "DEFAULT"); oneDNN's convolutions use
# AVX-512 where it is there, our kernels AVX2. Read once (torch.compile does not trace it).
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
_AVX512 = CPU_CAPABILITY == "AVX512"

# Winograd F(2x2, 3x3) (16 multiplies per 2x2 outputs and input channel instead of 36) runs the
# stride-1 3x3 convolutions with this many channels or more in and out faster than oneDNN's direct
# convolution: in inference, ResNet-50's 3x3s at batch 8 by 1.27-1.71x on a 2-core Zen 3 (AVX2),
# 1.07-1.33x on a 2-core Zen 4 (AVX-512) and 1.43-1.57x on a 2-core Xeon (AVX-512, two FMA units;
# oneDNN at 300-350 GFLOP/s there) (bench/test_ops.py); at 16 channels oneDNN is faster. Both
# counts must be multiples of 8 (the transforms' vectors).
WINOGRAD_MIN_CHANNELS = 64
# Below this many 2x2 output tiles (N * ceil(H/2) * ceil(W/2)) the 16 products are too thin for the
# GEMM and the transformed weight (16/9 of the direct one) is read for little work: a 512-channel
# 7x7 map at batch 1 (16 tiles) took 1.18x oneDNN's time on the Zen 4, while 49 tiles (256
# channels, 14x14, batch 1) took 0.64x. On the Xeon that layer alone was 1.07-1.12x faster by
# Winograd, but inside ResNet-18 at batch 1 (its 17 MB transformed weight no longer in cache) it
# took 1.6 ms against ~1.1 ms direct, and the network ran 16.3-16.9 ms with it against 16.0-16.3
# without (2026-12-01); interleaved whole forwards with it against without (2026-12-02): ResNet-18
# batch 1 0.87x, ResNet-50 batch 1 0.95x.
WINOGRAD_MIN_TILES = 32
# Training transforms the weight at every call (it changes at every step); at 512 x 512 channels
# that transform (16 MB, plus 9 MB of reordered taps) put ResNet-50's training peak memory above
# eager's, so training's Winograd stops at C * K = 256 * 256. Inference transforms once (cached).
WINOGRAD_TRAIN_MAX_WEIGHTS = 256 * 256
# Where oneDNN has AVX-512, training's Winograd (with its per-call weight transform) runs on maps of
# 8x8 and more. It was 14x14 until 2026-12-07: fwd+bwd against F.conv2d's, interleaved, on the Xeon: (16, 64, 56, 56)
# 1.15x, (16, 128, 28, 28) 1.10x, (16, 256, 14, 14) 1.08x, but ResNet-20's (128, 64, 8, 8)
# 1.02x (bench/test_ops.py: 0.99x) (2026-12-01); on the Zen 4 that shape's forward / input
# gradient took 1.08 / 0.98 of oneDNN's time. On AVX2 it paid everywhere (1.22-1.24x). On a 2-core
# Zen 5 (2026-12-07) the ResNet-20 b128 step took 1.04-1.06x as long with 14 as with 8 (interleaved
# steps, 25 pairs, twice; bench/test_ops.py's (128, 64, 8, 8) fwd+bwd 1.19x PyTorch's): maps from
# 8x8 on.
WINOGRAD_TRAIN_AVX512_MIN_MAP = 8
# Our AVX2 weight gradient (csrc/cpu/conv3x3_train.cpp): a vector of 8 input channels lies within
# one tap (C % 8 == 0), the register tile holds 4 output channels (K % 4 == 0), and beyond 128
# input channels the tiles sweep too few pixels per load of their accumulators: oneDNN's is faster
# there (ResNet-50's 256- and 512-channel 3x3s on the Zen 3: 56-95 against 106-125 GFLOP/s). On
# AVX2 CPUs it ran ResNet-20's at 150-190 GFLOP/s where oneDNN's reached 105-140; where oneDNN has
# AVX-512 its weight gradient is faster than ours at every shape measured (ours took 1.09-2.12x
# its time on ResNet-20's, 0.99-1.28x on ResNet-50's; Zen 4, 2026-12-01), so ours runs on
# AVX2-only CPUs.
WEIGHT_GRAD_MAX_CHANNELS = 128


# Our implicit-GEMM convolution (csrc/cpu/conv_gemm.cpp: 6 x 16 AVX2 register tiles with the
# bias, residual and ReLU in their epilogue) runs the 1x1 convolutions in place of oneDNN's on CPUs
# whose best vector ISA is AVX2: on the Zen 3 (2 cores) 1.03-1.21x oneDNN's on ResNet-50's shapes
# (bench/test_ops.py), the whole network 0.98-1.08x (interleaved, batch 1 and 8, within this
# machine's noise). Its 3x3 convolutions are not routed: on the stride-2 ones and layer4's at
# batch 1 they ran 0.87-1.12x oneDNN's alone, but inside ResNet-50 and ResNet-18 at batch 1 the
# networks took 1.01-1.04x longer with them (2026-12-02). Where oneDNN has AVX-512 its
# convolutions keep running (not measured against ours).
GEMM_APPLIES = CPU_CAPABILITY == "AVX2"
# Where oneDNN has AVX-512, our GEMM (its AVX-512 tiles, gemm_wide_tiles) runs the 1x1
# convolutions with at most this many output pixels (N * OH * OW): at batch 1 on the Xeon (2 cores,
# AVX-512 with two FMA units) the whole network with them against oneDNN's, interleaved
# (2026-12-02): ResNet-50 1.034-1.044x, ResNet-101 1.045x, ResNet-18 (its 3 projections) 0.99x
# (noise); with the 3136-pixel maps of layer1 too, 1.040x. At batch 8 the 1568-pixel and larger
# maps lose (all 1x1s by ours: 0.93x) and layer4's 392 pixels alone are neutral (1.003-1.006x).
GEMM_AVX512_MAX_PIXELS = 784
# The depth (kernel^2 * C) of one slice of our GEMM (KC in csrc/cpu/conv_gemm.cpp): up to it, a
# block end's GEMM may write its output into the residual's storage (conv_bias_act_); deeper, a
# slice's partial sums would pass through the output before the residual is added.
GEMM_SLICE = 256


# Winograd's 16 products (tiles x C times C x K each) by our GEMM's register tiles (gemm_rows in
# csrc/cpu/conv_gemm.cpp) instead of MKL's sgemm (at::bmm), where the CPU has AVX-512 and both
# channel counts are at least this (and K a multiple of 16). MKL takes its AVX2 path on AMD's
# CPUs: on the Zen 4 (one thread) at::bmm ran those products at 50-75 GFLOP/s, the AVX-512 tiles
# at 83-96 with 64 channels or more, but at 26-54 with 16 or 32 (a 64-wide tile mostly empty).
# Interleaved whole forwards with them against without (Zen 4, 2 cores, 2026-12-03): ResNet-50
# b1 1.063x, b8 1.035x; ResNet-18 b1 1.139x; ResNet-56 b128 1.082x. Their sums are blocked by 64
# channels, so their error against float64 is 0.99-1.17x the direct convolution's (MKL's: 1.2-1.6x).
# Training's Winograd (forward and input gradient, conv3x3_train_plan) runs them too, where the rule
# holds for C and K both ways: interleaved training steps with them against without (Zen 4,
# 2026-12-03): ResNet-50 b16 1.065x (2.84 against 3.16 s), ResNet-18 b16 1.016x.
# With the tiles, inference's Winograd also runs the 32-channel 3x3s (WINOGRAD_MIN_CHANNELS is 64
# for at::bmm's products): interleaved whole forwards with them against oneDNN's (Zen 4,
# 2026-12-03): ResNet-56 b1 1.138x, 1.165x; b8 1.051x; b128 1.049x, 1.028x, 1.000x, 1.047x;
# ResNet-20 b1 1.111x, b128 0.997x. From 16 channels: ResNet-56 b128 0.920x. In training (where
# the map is 14x14 or more: WINOGRAD_TRAIN_AVX512_MIN_MAP) ResNet-20 b128 steps 1.045x, 1.043x,
# with the default training run's test error within its seeds' spread (CHANGELOG).
# Not measured on an Intel CPU, where MKL runs its AVX-512 sgemm.
WINOGRAD_TILES_MIN_CHANNELS = 32
WINOGRAD_TILES = _AVX512


def winograd_tiles(in_channels: int, out_channels: int) -> bool:
    """Whether conv3x3_bias_act runs its 16 products by our register tiles (see
    WINOGRAD_TILES_MIN_CHANNELS) rather than at::bmm."""
    return (
        WINOGRAD_TILES
        and in_channels >= WINOGRAD_TILES_MIN_CHANNELS
        and out_channels >= WINOGRAD_TILES_MIN_CHANNELS
        and out_channels % 16 == 0
    )


def gemm_wide_tiles() -> bool:
    """Whether ``conv_bias_act`` runs its AVX-512 register tiles (6 pixels x 64 channels: each
    input value loaded serves four 16-lane FMAs) rather than AVX2's (6 x 16): where the CPU has
    AVX-512. On the Zen 4 (2 cores) they ran ResNet-50's 1x1 shapes at 189-202 GFLOP/s alone where
    the AVX2 tiles made the network 9% slower than with oneDNN's (2026-12-02)."""
    return _AVX512


def gemm_applies(conv: nn.Module, x: Tensor) -> bool:
    """Whether an inference convolution of ``x`` runs by our GEMM (see GEMM_APPLIES and
    GEMM_AVX512_MAX_PIXELS): a 1x1, no padding, the same stride both ways."""
    return (
        (
            GEMM_APPLIES
            or (
                _AVX512
                and x.shape[0] * ((x.shape[2] - 1) // conv.stride[0] + 1) * ((x.shape[3] - 1) // conv.stride[0] + 1)
                <= GEMM_AVX512_MAX_PIXELS
            )
        )
        and conv.kernel_size == (1, 1)
        and conv.stride[0] == conv.stride[1]
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _is_3x3_pad1(conv: nn.Module) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def is_conv3x3(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` of the residual nets' 3x3 kind: padding 1, no bias, dilation 1, one
    group, zero padding, the same stride (1 or 2) both ways."""
    return (
        type(conv) is nn.Conv2d
        and _is_3x3_pad1(conv)
        and conv.bias is None
        and conv.stride in ((1, 1), (2, 2))
    )


def winograd_applies(in_channels: int, out_channels: int, stride: int, training: bool, map_size: int = 0) -> bool:
    """Whether a 3x3, padding-1 convolution runs by Winograd F(2x2, 3x3) (see the constants);
    ``map_size``: the smaller side of the input map (training on AVX-512 CPUs looks at it).
    From WINOGRAD_TILES_MIN_CHANNELS where :func:`winograd_tiles` runs the products (in training
    the input gradient's too: C and K swapped)."""
    c, k = in_channels, out_channels
    return (
        stride == 1
        and (
            (c >= WINOGRAD_MIN_CHANNELS and k >= WINOGRAD_MIN_CHANNELS)
            or (winograd_tiles(c, k) and (not training or winograd_tiles(k, c)))
        )
        and c % 8 == 0
        and k % 8 == 0
        and (not training or c * k <= WINOGRAD_TRAIN_MAX_WEIGHTS)
        and (not training or not _AVX512 or map_size >= WINOGRAD_TRAIN_AVX512_MIN_MAP)
    )


def weight_grad_kernel_applies(in_channels: int, out_channels: int) -> bool:
    """Whether the 3x3 weight gradient is our AVX2 kernel's (see WEIGHT_GRAD_MAX_CHANNELS); on a
    CPU without AVX2 the kernel hands it to ATen's."""
    return (
        not _AVX512
        and in_channels % 8 == 0
        and in_channels <= WEIGHT_GRAD_MAX_CHANNELS
        and out_channels % 4 == 0
    )


# The stride-1 3x3 weight gradient by Winograd F(2x2, 3x3) (csrc/cpu/winograd.cpp: 16 multiplies per
# 2x2 outputs and channel pair where the direct one does 36), on AVX-512 CPUs with channel counts
# multiples of 16, from WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS in and out, up to training's Winograd
# weight count (its per-thread sums are 16 x C x K floats). Against oneDNN's, interleaved, four runs
# (2-core AMD EPYC Zen 5, whose oneDNN forward reaches 410-490 GFLOP/s, 2026-12-07;
# bench/test_ops.py::test_conv3x3_weight_grad_winograd): ResNet-20's (128, 32, 16, 16) 1.30-1.41x,
# (128, 64, 8, 8) 1.29-1.42x; ResNet-50's at batch 16 (64, 56, 56) 1.67-1.97x, (256, 14, 14)
# 1.00-1.26x; but (128, 16, 32, 32) 0.57-0.79x: with 16 channels the transforms, not the products,
# take most of the time. ResNet-20 b128 steps without it took 1.04-1.06x as long.
WINOGRAD_WEIGHT_GRAD = True
WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS = 32


def weight_grad_winograd_applies(in_channels: int, out_channels: int, stride: int) -> bool:
    """Whether the 3x3 weight gradient runs by Winograd (see WINOGRAD_WEIGHT_GRAD)."""
    c, k = in_channels, out_channels
    return (
        WINOGRAD_WEIGHT_GRAD
        and _AVX512
        and stride == 1
        and c % 16 == 0
        and k % 16 == 0
        and min(c, k) >= WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS
        and c * k <= WINOGRAD_TRAIN_MAX_WEIGHTS
    )


# The stride-1 3x3 forward and input gradient in training by our direct AVX-512 kernel
# (csrc/cpu/conv3x3_direct.cpp: a register tile of 16 pixels x 16 output channels, one FMA with its
# input broadcast from memory per pixel, channel and tap) where oneDNN's is slow and Winograd does
# not run: channel counts multiples of 16, up to DIRECT_MAX_CHANNELS in and out (ResNet-20's and
# the CIFAR nets' first stage). On a 2-core Zen 5 (2026-12-07), interleaved: on ResNet-20's
# (128, 16, 32, 32) alone the forward 1.19-1.29x oneDNN's, the input gradient 1.24-1.32x, and
# 1.34x / 1.49x with fill_band's plain loads (bench/test_ops.py::test_conv3x3_direct); ResNet-20
# b128 steps with it against without 1.048x, 1.057x, 1.077x, 1.105x. With it on the 32- and 64-channel 3x3s instead of Winograd: steps 0.987x
# and 0.917x, hence 16. Its weight gradient is not ours (a direct one ran 0.83-0.90x oneDNN's).
# At stride 2 (the forward, and the input gradient, conv3x3_input_grad, as a transposed
# convolution: even and odd rows and columns of dx take different taps) on the CIFAR nets' two
# downsampling 3x3s (16 -> 32 and 32 -> 64 channels, hence DIRECT_STRIDE2_MAX_CHANNELS), where
# oneDNN's backward-data runs at half its forward's speed. bench/test_ops.py::
# test_conv3x3_direct_stride2 on a 2-core Zen 5 (2026-12-08, four runs): 16 -> 32 forward
# 0.99-1.51x oneDNN's, input gradient 1.73-1.89x; 32 -> 64 forward 0.93-1.00x, input gradient
# 1.44-1.50x. In ResNet-20 b128 steps (dispatch-mode timings, both orders of the pair) the two
# input gradients took 3.3 ms against oneDNN's 8.3 and the steps 0.97x the time.
DIRECT_CONV3X3 = True
DIRECT_MAX_CHANNELS = 16
DIRECT_STRIDE2_MAX_CHANNELS = 64


def direct_applies(in_channels: int, out_channels: int, stride: int) -> bool:
    """Whether a training 3x3 convolution's forward and input gradient run by our direct kernel
    (see DIRECT_CONV3X3); the rule is symmetric in C and K, as the input gradient swaps them."""
    c, k = in_channels, out_channels
    return (
        DIRECT_CONV3X3
        and _AVX512
        and stride in (1, 2)
        and c % 16 == 0
        and k % 16 == 0
        and 0 < max(c, k) <= (DIRECT_MAX_CHANNELS if stride == 1 else DIRECT_STRIDE2_MAX_CHANNELS)
    )


# Issue 18's fusion across the convolution in training, on GPUs: a residual block's convolutions
# by ``norm_conv`` (Triton), each BatchNorm's statistics reduced in its convolution's epilogue and
# its scale, shift and ReLU applied in the next one's prologue, the backward fused the same way.
# Off by default until a GPU has measured it faster than cuDNN's convolutions and the fused
# BatchNorm (bench/test_gpu.py::test_gpu_norm_conv_*; none has yet): RESNET_FAST_NORM_CONV=1
# turns it on. Read once (torch.compile does not trace the environment).
NORM_CONV_TRAINING = os.environ.get("RESNET_FAST_NORM_CONV", "0") == "1"


def _norm_conv_conv(conv: nn.Module) -> bool:
    """A residual net's convolution that norm_conv runs: no bias, one group, dilation 1, a square
    kernel with padding kernel // 2 (the 1x1s: 0; the 3x3s: 1), the same stride both ways."""
    return (
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.kernel_size in ((1, 1), (3, 3))
        and conv.padding == (conv.kernel_size[0] // 2,) * 2
        and conv.stride[0] == conv.stride[1]
    )


def norm_conv_convs(block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """A residual block's convolutions and BatchNorms in order: (conv1, conv2) and (bn1, bn2) in a
    basic block, with conv3 and bn3 in a bottleneck."""
    n = 3 if hasattr(block, "conv3") else 2
    return [getattr(block, f"conv{i}") for i in range(1, n + 1)], [getattr(block, f"bn{i}") for i in range(1, n + 1)]


def norm_conv_block_applies(block: nn.Module, x: Tensor) -> bool:
    """Whether a residual block (:class:`resnet_fast.nn.BasicBlock`, :class:`resnet_fast.nn.Bottleneck`)
    trains through ``norm_conv`` (:func:`resnet_fast.nn.functional.norm_conv_block`):
    NORM_CONV_TRAINING on, the Triton path for x's device (a GPU, or CPU tensors under
    TRITON_INTERPRET=1), float32 or float64, every BatchNorm in training mode with affine
    parameters (batch statistics; a frozen or eval BatchNorm keeps the unfused path), the residual
    nets' 1x1 and 3x3 convolutions, nothing stepping aside (hooks, other module types, a capture)."""
    if not NORM_CONV_TRAINING or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        return False
    if impl_for("batch_norm_act", x.device) != "triton":
        return False
    convs, bns = norm_conv_convs(block)
    return (
        not steps_aside(*convs, *bns)
        and all(_norm_conv_conv(c) for c in convs)
        and all(bn.training and bn.weight is not None and bn.bias is not None for bn in bns)
    )


class Conv3x3Plan(NamedTuple):
    """How ``resnet_fast::conv3x3_train`` runs one convolution: the forward (and, at stride 1, the
    input gradient, which is a stride-1 convolution too) by Winograd, by our direct kernel or by ATen's, the weight
    gradient by our kernel or by ATen's; Winograd's 16 products by our register tiles (where
    :func:`winograd_tiles` holds for the forward's channels and the input gradient's, swapped) or by
    at::bmm."""

    winograd: bool
    weight_grad_kernel: bool
    winograd_tiles: bool = False
    weight_grad_winograd: bool = False
    direct: bool = False

    def op_kwargs(self) -> dict:
        """The op's keyword arguments for this plan (``winograd`` and ``weight_grad_kernel`` are
        positional)."""
        return {
            "winograd_tiles": self.winograd_tiles,
            "weight_grad_winograd": self.weight_grad_winograd,
            "direct": self.direct,
        }


def conv3x3_train_plan(x: Tensor, weight: Tensor, stride: int, source_impl: str | None = None) -> Conv3x3Plan | None:
    """The plan of a 3x3, padding-1, bias-free convolution whose weight gets a gradient, or None
    where our op adds nothing to PyTorch's convolution: not float32 on the CPU path, another
    stride, no weight gradient to compute, or neither Winograd nor our weight gradient pays here
    and x was not made by the fused CPU BatchNorm (``source_impl``, the implementation that made
    x = relu(bn(.)) where the caller knows it). Our op's gains are the weight gradient, on wide maps
    Winograd's forward and input gradient, and keeping the BatchNorm's input rather than x
    (:func:`recomputes_conv_input`): for that alone it runs with ATen's convolutions, plan
    (False, False), e.g. wherever oneDNN has AVX-512 on ResNet-20's maps and on 512-channel ones."""
    if (
        x.dtype != torch.float32
        or weight.dtype != torch.float32
        or stride not in (1, 2)
        or x.dim() != 4
        or weight.dim() != 4
        or tuple(weight.shape[2:]) != (3, 3)
        or x.shape[1] != weight.shape[1]
        or not (weight.requires_grad and torch.is_grad_enabled())
        or impl_for("conv3x3_train", x.device) != "cpu"
    ):
        return None
    k, c = weight.shape[0], weight.shape[1]
    winograd = winograd_applies(c, k, stride, training=True, map_size=min(x.shape[2], x.shape[3]))
    plan = Conv3x3Plan(
        winograd,
        weight_grad_kernel_applies(c, k),
        winograd and winograd_tiles(c, k) and winograd_tiles(k, c),
        weight_grad_winograd_applies(c, k, stride),
        not winograd and direct_applies(c, k, stride),
    )
    return plan if any(plan) or (RECOMPUTE_CONV_INPUT and source_impl == "cpu") else None


# A training 3x3 convolution whose input is relu(bn(x)) from the fused CPU BatchNorm (no residual:
# the first unit of a basic block, the 1x1 reduce of a bottleneck) keeps for its backward the
# BatchNorm's input x, which the BatchNorm's own backward keeps anyway, instead of its input: one
# activation fewer per block alive from the forward to the backward; the weight gradient
# recomputes the input from x (inside our kernel, where it runs; a pass before ATen's elsewhere).
RECOMPUTE_CONV_INPUT = True


def recomputes_conv_input(bn_impl: str, conv_plan: "Conv3x3Plan | None") -> bool:
    """Whether the 3x3 training convolution run by ``conv_plan`` (our op) recomputes its input from
    the BatchNorm run by ``bn_impl`` (the CPU kernel's output, reproduced bit for bit)."""
    return RECOMPUTE_CONV_INPUT and bn_impl == "cpu" and conv_plan is not None


def conv1x1_recomputes_input(x: Tensor, conv: nn.Module, bn_impl: str) -> bool:
    """Whether a bottleneck's 1x1 convolution in training runs ``resnet_fast::conv1x1_train``, which
    recomputes its input from the BatchNorm run by ``bn_impl`` (its only gain: an activation not kept;
    the forward and its speed are ATen's): a plain bias-free 1x1 ``nn.Conv2d`` on float32 CPU
    tensors whose weight gets a gradient."""
    return (
        RECOMPUTE_CONV_INPUT
        and bn_impl == "cpu"
        and type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.bias is None
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.stride[0] == conv.stride[1]
        and conv.padding_mode == "zeros"
        and x.dtype == torch.float32
        and conv.weight.dtype == torch.float32
        and conv.weight.requires_grad
        and torch.is_grad_enabled()
        and impl_for("conv1x1_train", x.device) == "cpu"
    )


# A convolution + BatchNorm whose input is kept anyway keeps that input, not the convolution's output,
# which its backward recomputes (conv_bn_act_train). A network's stem: its input is the images, held
# by the caller; with 3 input channels the convolution costs little next to the tensor it spares
# (ResNet-50 at batch 16: 12 ms of a 3 s step for 51 MB kept from the forward to the backward;
# ResNet-20 at batch 128: 1 ms of 250 ms for 8 MiB). A projection shortcut: its input is the
# block's, which the block's first convolution keeps; recomputing it costs one more 1x1 convolution
# per stage.
RECOMPUTE_STEM_CONV = True
RECOMPUTE_PROJECTION_CONV = True


def recomputes_conv_output(x: Tensor, conv: nn.Module, bn: nn.Module, unit: str) -> bool:
    """Whether ``bn(conv(x))`` (``unit``: "stem", a network's first unit, ReLU after it; or
    "projection", a projection shortcut) runs ``resnet_fast::conv_bn_act_train``: training (the
    BatchNorm in train mode, with its affine parameters, a gradient to compute) on float32/float64
    CPU tensors of the fused path, a plain bias-free ``nn.Conv2d`` with a square kernel, one stride
    and one padding, and neither module stepping aside (hooks, other types)."""
    if unit not in ("stem", "projection"):
        raise ValueError(f"recomputes_conv_output: unit must be 'stem' or 'projection', got {unit!r}")
    return (
        (RECOMPUTE_STEM_CONV if unit == "stem" else RECOMPUTE_PROJECTION_CONV)
        and torch.is_grad_enabled()
        and not steps_aside(conv, bn)
        and bn.training
        and bn.weight is not None
        and bn.bias is not None
        and any(t.requires_grad for t in (x, conv.weight, bn.weight, bn.bias))
        and conv.bias is None
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.stride[0] == conv.stride[1]
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and conv.weight.dtype == x.dtype
        and bn.weight.dtype == bn.bias.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        and impl_for("conv_bn_act_train", x.device) == "cpu"
        and batch_norm_act_impl(x, bn.weight, bn.bias) == "cpu"
    )


def _inference_tensors(conv: nn.Module, bn: nn.Module) -> bool:
    """Parameters or statistics made under ``torch.inference_mode`` (a model built there): they
    have no version counter, so a folded copy could not notice an in-place change to them."""
    return (
        conv.weight.is_inference()
        or bn.weight.is_inference()
        or bn.running_var.is_inference()
        or bn.running_mean.is_inference()
        or bn.bias.is_inference()
        or (conv.bias is not None and conv.bias.is_inference())
    )


def conv_bn_inference_plan(x: Tensor, conv: nn.Module, bn: nn.Module) -> str | None:
    """How a convolution followed by its BatchNorm runs in inference, with BatchNorm folded into
    the convolution's weights (cached), or None where folding does not apply (training, anything
    to differentiate, hooks, other module types, BatchNorm without running statistics or affine
    parameters, parameters made under torch.inference_mode, torch.compile tracing, which folds
    by itself with freezing):

    * ``"winograd"``: the fused CPU path's wide stride-1 3x3 convolutions (``conv3x3_bias_act``);
    * ``"gemm"``: its 1x1 convolutions on AVX2 CPUs, and those of small maps on AVX-512 ones
      (``conv_bias_act``, see :func:`gemm_applies`);
    * ``"onednn"``: the other CPU convolutions: oneDNN with the residual add and ReLU as post-ops
      (``torch.ops.mkldnn._convolution_pointwise``, which needs float32 channels_last);
    * ``"epilogue"``: GPUs (and Triton's interpreter): cuDNN's convolution, then ``bias_act``."""
    if not (
        not bn.training
        and not torch.compiler.is_compiling()
        and type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
        and bn.weight is not None
        and x.dim() == 4
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad or bn.weight.requires_grad))
        and not steps_aside(conv, bn)
        and not _inference_tensors(conv, bn)
    ):
        return None
    impl = impl_for("batch_norm_act", x.device)
    if impl == "cpu" and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last):
        winograd = (
            _is_3x3_pad1(conv)
            and conv.stride == (1, 1)
            and x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2) >= WINOGRAD_MIN_TILES
            and impl_for("conv3x3_bias_act", x.device) == "cpu"
            and winograd_applies(conv.in_channels, conv.out_channels, 1, training=False)
        )
        if winograd:
            return "winograd"
        if gemm_applies(conv, x) and impl_for("conv_bias_act", x.device) == "cpu":
            return "gemm"
        return "onednn"
    if impl in ("triton", "cuda") and x.dtype in KERNEL_DTYPES[impl]:
        return "epilogue"
    return None


def max_pool2d_impl(
    x: Tensor, ceil_mode: bool = False, dilation=1, return_indices: bool = False, kernel_size=(3, 3)
) -> str:
    """``"cpu"``: our pooling without argmax indices (``resnet_fast::max_pool2d``), for
    floating-point channels_last CPU inputs that need no gradient, dilation 1, floor mode (ATen's
    CPU pooling writes an int64 index per output, 12.8 MB after ResNet-50's stem at batch 8, that
    only a backward reads: the stem's pooling 7.0 -> 3.8 ms). ``"cpu_train"``: where a gradient is
    needed, our pooling that keeps one byte per output for its backward
    (``resnet_fast::max_pool2d_train``: float32/float64, windows of at most 256 values, either
    layout) instead of PyTorch's input and int64 indices. ``"eager"``: PyTorch's pooling (GPUs,
    the indices asked for, integer and half inputs, NCHW in inference)."""
    if (
        return_indices
        or ceil_mode
        or dilation not in (1, (1, 1), [1, 1])
        or x.dim() != 4
        or not x.is_floating_point()
    ):
        return "eager"
    if x.requires_grad and torch.is_grad_enabled():
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if (
            x.dtype in (torch.float32, torch.float64)
            and k[0] * k[1] <= 256
            and impl_for("max_pool2d_train", x.device) == "cpu"
        ):
            return "cpu_train"
        return "eager"
    if suggest_memory_format(x) != torch.channels_last or impl_for("max_pool2d", x.device) != "cpu":
        return "eager"
    return "cpu"


# pool_linear runs heads whose linear weight has at least this many values: there the weight's
# stream is the cost, and ours beat PyTorch's ops (alone, Zen 4, 2 cores: 1.7-2.3x at ImageNet's
# 512 and 2048 -> 1000, batch 1 and 8); CIFAR's 64 -> 10 at batch 128 ran 0.79-0.84x (the pooling
# and the ops' fixed costs, with nothing to stream).
POOL_LINEAR_MIN_WEIGHTS = 1 << 16


def pool_linear_applies(x: Tensor, pool: nn.Module, fc: nn.Module) -> bool:
    """Whether a network's head, ``fc(flatten(pool(x), 1))``, runs as our op ``pool_linear``
    (global average pooling and the linear layer by our GEMM, the weight packed once): an exact
    ``nn.AdaptiveAvgPool2d`` to 1x1 and ``nn.Linear`` without hooks, nothing to differentiate, no
    autocast, no capture (:func:`formulas_only`) or torch.compile tracing, a float32 channels_last CPU input of
    the linear layer's width, and parameters that have a version counter (not made under
    torch.inference_mode: a packed copy could not see an in-place change to them), and a weight of
    at least POOL_LINEAR_MIN_WEIGHTS values. On the Zen 4
    (2 cores), in a planned forward at batch 1, PyTorch's two ops took 0.64-0.74 ms in ResNet-50
    (pooling 0.13-0.15, MKL's sgemv 0.50-0.59) and 0.41-0.46 in ResNet-18; ours 0.28-0.41 and 0.15-0.17."""
    return (
        type(pool) is nn.AdaptiveAvgPool2d
        and pool.output_size in (1, (1, 1), [1, 1])
        and type(fc) is nn.Linear
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")  # (autocast runs linear in bfloat16)
        and not (_global_hooks() or formulas_only() or has_hooks(pool) or has_hooks(fc))
        and x.dim() == 4
        and x.dtype == torch.float32
        and fc.weight.dtype == torch.float32
        and x.shape[1] == fc.in_features
        and fc.in_features * fc.out_features >= POOL_LINEAR_MIN_WEIGHTS
        and x.shape[2] * x.shape[3] > 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and (x.requires_grad or fc.weight.requires_grad
                                              or (fc.bias is not None and fc.bias.requires_grad)))
        and not fc.weight.is_inference()
        and not (fc.bias is not None and fc.bias.is_inference())
        and impl_for("pool_linear", x.device) == "cpu"
    )


# -- layouts ----------------------------------------------------------------------------------

_MKLDNN = torch.backends.mkldnn.is_available()  # (read once: torch.compile does not trace it)


def conv_weight_format() -> torch.memory_format:
    """The memory format a new model's convolution weights are created in: channels_last when
    the fused CPU kernels will run it (oneDNN then convolves without reordering the weights at
    every call: ResNet-20 training about 10% faster), else PyTorch's default, so that a model built
    under the eager backend computes exactly what torchvision's does. Values, shapes and state_dict
    keys are the same either way; only the strides differ. Decided when the model is built:
    switching backends afterwards changes which kernels run, not the weights' strides."""
    if _backend.get_backend() in ("auto", "cpu") and _backend.has_kernel("batch_norm_act", "cpu"):
        return torch.channels_last
    return torch.contiguous_format


def internal_layout(x: Tensor, stem: nn.Conv2d) -> torch.memory_format | None:
    """The layout the network runs in, or None to take the input as it is. The fused kernels are
    fastest on channels_last (oneDNN's convolutions too), so the stem switches to it whenever they
    run; the logits that come out are the same 2-D tensor either way.

    Training a float32 net on the CPU, the batch goes in as it is: oneDNN convolves an NCHW input
    with the channels_last stem weights into a channels_last output, and no converted copy of the
    batch stays alive as the stem's saved input (9.6 MB at ResNet-50 batch 16: the difference
    between our peak memory and eager channels_last's)."""
    if not fused_path(x.device):
        return None
    if (
        stem.training
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and stem.weight.is_contiguous(memory_format=torch.channels_last)
        and _MKLDNN
    ):
        return None
    return torch.channels_last


def may_donate_residuals(model: nn.Module) -> bool:
    """Whether a network's inference forward may write each block end's output into the storage
    of its residual (the block input, which nothing reads again), as torch.compile's freezing
    does: eval mode, nothing to differentiate, not under torch.compile or a capture, and no hook
    anywhere (a hook could keep a block's input or output, which a later block would overwrite)."""
    return (
        not torch.compiler.is_compiling()
        and not formulas_only()
        and not model.training
        and not torch.is_grad_enabled()
        and not _global_hooks()
        and not any(has_hooks(m) for m in model.modules())
    )


# A whole network's inference forward on the CPU kernels is recorded once per input key and
# replayed (resnet_fast._plan): ResNet-50 at batch 1 spent about 4 of its 50 ms in Python between
# the kernels, ResNet-18 1.6 of 25 ms (2-core Zen 4, 2026-12-02). False: every forward runs the
# modules (the per-layer profile, bench/profile_layers.py, times their calls).
PLAN_FORWARD = True


def plans_forward(model: nn.Module, x) -> bool:
    """Whether a whole network's forward may run by its plan (:mod:`resnet_fast._plan`, which
    also checks the module tree: known module types, no hooks): inference (eval mode, no
    gradients), a CPU tensor on the C++ kernels, no autocast, nothing capturing or compiling, no
    global module hook."""
    return (
        PLAN_FORWARD
        and isinstance(x, Tensor)
        and not model.training
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not _global_hooks()
        and not formulas_only()
        and not torch.is_autocast_enabled("cpu")
        and impl_for("batch_norm_act", x.device) == "cpu"
    )
