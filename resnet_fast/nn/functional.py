"""Module-level entry points of the fused ops: they take the model's own modules, so that the
models keep torchvision's module tree and state_dict while running fused code. Which kernels run
is :mod:`resnet_fast._routing`'s decision; these functions carry it out."""

from __future__ import annotations

import contextvars
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _memory, _routing, ops
from ..ops.batch_norm_act import check_batch_stats_shape, update_running_stats


def _unfused_bn_act(x: Tensor, bn: nn.Module, residual: Tensor | None, relu: bool, residual_stride: int) -> Tensor:
    """``relu(bn(x) + residual)`` through the module itself (its hooks fire), with torchvision's
    in-place add and ReLU: a hook that keeps the BatchNorm's output sees it change as
    torchvision's does."""
    if residual is not None and (residual_stride != 1 or residual.shape[1] != x.shape[1]):
        residual = ops.zero_pad_shortcut(residual, x.shape[1], residual_stride)
    y = bn(x)
    if residual is not None:
        y += residual
    return torch.relu_(y) if relu else y


class ConvInput(NamedTuple):
    """How the fused BatchNorm made an activation ``relu(bn(x))`` (no residual): its input, parameters,
    the statistics it normalised with and the implementation that ran. The training 3x3 convolution
    that reads the activation keeps these for its backward instead of the activation
    (:func:`resnet_fast._routing.recomputes_conv_input`). From a network's stem
    (:func:`stem_conv_bn_relu_source`), ``x`` is the stem's input and ``conv_weight``,
    ``conv_stride``, ``conv_padding`` its convolution, whose output the BatchNorm normalised."""

    x: Tensor
    weight: Tensor
    bias: Tensor
    mean: Tensor
    var: Tensor
    eps: float
    training: bool
    impl: str
    conv_weight: Tensor | None = None
    conv_stride: int = 1
    conv_padding: int = 0


def bn_act(
    x: Tensor, bn: nn.Module, residual: Tensor | None = None, relu: bool = True, residual_stride: int = 1
) -> Tensor:
    """``relu(bn(x) + residual)`` with exactly nn.BatchNorm2d's semantics (batch statistics in
    training, running statistics in eval, momentum=None as a cumulative average,
    ``num_batches_tracked``, ``track_running_stats``), through the fused op.

    A residual with fewer channels than ``x`` or a ``residual_stride`` > 1 is the option-A
    shortcut: subsampled and zero-padded, read in place by the fused kernel. A BatchNorm that
    :func:`resnet_fast._routing.steps_aside` (another norm layer, hooks) runs its own forward."""
    return _bn_act(x, bn, residual, relu, residual_stride)[0]


def bn_relu_source(x: Tensor, bn: nn.Module) -> tuple[Tensor, ConvInput | None]:
    """``relu(bn(x))`` as :func:`bn_act`, and how it was made (:class:`ConvInput`) where the
    fused op made it (None where the BatchNorm ran its own forward or the formula)."""
    return _bn_act(x, bn, None, True, 1, source=True)


def _step_momentum(bn: nn.Module) -> tuple[float, bool, bool]:
    """The same momentum bookkeeping as torch.nn.modules.batchnorm._BatchNorm.forward, for one
    forward of ``bn``: (momentum, whether the batch's statistics normalise, whether the running
    statistics are read or updated)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return momentum, use_batch_stats, track


def _bn_act(
    x: Tensor, bn: nn.Module, residual: Tensor | None, relu: bool, residual_stride: int, source: bool = False
) -> tuple[Tensor, ConvInput | None]:
    if _routing.steps_aside(bn):
        return _unfused_bn_act(x, bn, residual, relu, residual_stride), None
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W) to {bn}, got shape {tuple(x.shape)}")
    momentum, use_batch_stats, track = _step_momentum(bn)
    y, mean, var = ops.batch_norm_act(
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
        return_stats=True,
    )
    if not source or mean is None:
        return y, None
    impl = _routing.batch_norm_act_impl(x, bn.weight, bn.bias)
    return y, ConvInput(x, bn.weight, bn.bias, mean, var, bn.eps, use_batch_stats, impl)


def _conv(x: Tensor, conv: nn.Module, source: ConvInput | None = None) -> Tensor:
    """``conv(x)``; the residual nets' 3x3 convolutions in training go through
    ``resnet_fast::conv3x3_train`` where :func:`resnet_fast._routing.conv3x3_train_plan` has a plan,
    given how x was made (``source``) where :func:`resnet_fast._routing.recomputes_conv_input`; a
    bottleneck's 1x1 through ``resnet_fast::conv1x1_train`` where
    :func:`resnet_fast._routing.conv1x1_recomputes_input`."""
    if (
        source is not None
        and source.conv_weight is None
        and not _routing.steps_aside(conv)
        and _routing.conv1x1_recomputes_input(x, conv, source.impl)
    ):
        s = source
        return torch.ops.resnet_fast.conv1x1_train(
            x, conv.weight, conv.stride[0], s.x, s.weight, s.bias, s.mean, s.var, s.eps, s.training
        )
    if not _routing.is_conv3x3(conv) or _routing.steps_aside(conv):
        return conv(x)
    plan = _routing.conv3x3_train_plan(x, conv.weight, conv.stride[0], None if source is None else source.impl)
    if plan is None:
        return conv(x)
    args = (x, conv.weight, conv.stride[0], plan.winograd, plan.weight_grad_kernel)
    if source is not None and _routing.recomputes_conv_input(source.impl, plan):
        s = source
        return torch.ops.resnet_fast.conv3x3_train(
            *args, s.x, s.weight, s.bias, s.mean, s.var, s.eps, s.training, s.conv_weight, s.conv_stride, s.conv_padding,
            **plan.op_kwargs(),
        )
    return torch.ops.resnet_fast.conv3x3_train(*args, **plan.op_kwargs())


# -- inference: BatchNorm folded into the convolution ----------------------------------------

# conv module -> (key, folded weight (prepacked for oneDNN, Winograd-transformed or packed for our
# GEMM), folded bias).
# Weakly keyed, so the cache lives exactly as long as the model and never travels with it
# (pickle, deepcopy).
_FOLDED: "weakref.WeakKeyDictionary[nn.Conv2d, tuple]" = weakref.WeakKeyDictionary()


def _folded_weights(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, path: str) -> tuple[Tensor, Tensor]:
    tensors = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        tensors.append(conv.bias)
    # Any change to a parameter or statistic (optimiser step, load_state_dict, .to()) bumps its
    # version or moves its storage, and so invalidates the cache. oneDNN's prepacked weights also
    # depend on the input's shape.
    shape = tuple(x.shape) if path == "onednn" else (x.dtype, x.is_contiguous(memory_format=torch.channels_last))
    key = (path, id(bn), bn.eps, shape, tuple((t._version, t.data_ptr()) for t in tensors))
    hit = _FOLDED.get(conv)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    if x.device.type == "cpu":
        _memory.keep_freed_memory()  # once per process: the next forwards' buffers reuse this one's
    with torch.no_grad():
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = (conv.weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
        if path == "winograd":
            weight = ops.winograd_weight(weight)
        elif path == "gemm":
            weight = ops.pack_conv_weight(weight)
        elif path == "onednn":
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight.contiguous(memory_format=torch.channels_last),
                list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape),
            )
        elif x.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        else:
            weight = weight.contiguous()
    _FOLDED[conv] = (key, weight, bias)
    return weight, bias


# linear module -> (key, packed weight, bias) for pool_linear; weakly keyed as _FOLDED.
_PACKED_FC: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def pool_linear(x: Tensor, pool: nn.Module, fc: nn.Module) -> Tensor:
    """A network's head, ``fc(torch.flatten(pool(x), 1))``: in inference on the CPU (see
    :func:`resnet_fast._routing.pool_linear_applies`) our op ``pool_linear``, with fc's weight
    packed once (cached until a parameter changes), else the modules themselves."""
    if not _routing.pool_linear_applies(x, pool, fc):
        return fc(torch.flatten(pool(x), 1))
    tensors = (fc.weight,) if fc.bias is None else (fc.weight, fc.bias)
    key = tuple((t._version, t.data_ptr()) for t in tensors)
    hit = _PACKED_FC.get(fc)
    if hit is None or hit[0] != key:
        bias = fc.bias.detach() if fc.bias is not None else fc.weight.new_zeros(fc.out_features)
        hit = (key, ops.pack_conv_weight(fc.weight[:, :, None, None]), bias)  # (packing detaches)
        _PACKED_FC[fc] = hit
    return ops.pool_linear(x, hit[1], hit[2])


# Set by a whole network's forward (models/) while its intermediate tensors are its own: a block
# end may then write its output into the storage of its residual (the block's input or its
# projection), as torch.compile's freezing does, sparing a fresh output buffer per block.
_DONATE_RESIDUALS = contextvars.ContextVar("resnet_fast_donate_residuals", default=False)


def run_owning_residuals(model: nn.Module, fn, x: Tensor) -> Tensor:
    """``fn(x)`` (a network's blocks) with residual donation where
    :func:`resnet_fast._routing.may_donate_residuals` allows it. Only a network's own forward uses
    this, so a block called directly never writes into the caller's tensor."""
    if not _routing.may_donate_residuals(model):
        return fn(x)
    token = _DONATE_RESIDUALS.set(True)
    try:
        return fn(x)
    finally:
        _DONATE_RESIDUALS.reset(token)


def conv_bn_act(
    x: Tensor,
    conv: nn.Module,
    bn: nn.Module,
    residual: Tensor | None = None,
    relu: bool = True,
    residual_stride: int = 1,
    input_source: ConvInput | None = None,
) -> Tensor:
    """``relu(bn(conv(x)) + residual)``. In inference (eval mode, nothing requiring a gradient),
    BatchNorm is folded into the convolution's weights once (cached) and the residual add and
    ReLU run as the convolution's epilogue, as :func:`resnet_fast._routing.conv_bn_inference_plan`
    decides. Otherwise (training) the convolution runs as is, a 3x3 one through our op (told how x
    was made where ``input_source`` says, from :func:`conv_bn_relu_source`), and :func:`bn_act`
    fuses the rest."""
    path = _routing.conv_bn_inference_plan(x, conv, bn)
    if path is None:
        return bn_act(_conv(x, conv, input_source), bn, residual, relu, residual_stride)
    weight, bias = _folded_weights(x, conv, bn, path)
    if path == "epilogue":
        y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return ops.bias_act(y, bias, residual, relu, residual_stride)
    if residual is not None and (residual_stride != 1 or residual.shape[1] != conv.out_channels):
        residual = ops.zero_pad_shortcut(residual, conv.out_channels, residual_stride)
    # A block end whose residual is the network's own writes its output into the residual's
    # storage, whichever kernel runs it: no fresh buffer whose lines are fetched from memory before
    # they are written. On the Zen 4 (2 cores) our GEMM's block-end 1x1s out of cache ran
    # 1.09-1.18x as fast that way as writing a new tensor (bench/test_ops.py::
    # test_block_end_in_place_inference); interleaved whole forwards with our ops' in-place forms
    # against without (2026-12-04): ResNet-18 b1 1.009x (1000 pairs), b8 1.011x; ResNet-50 b1
    # 1.0095x (800 pairs); ResNet-101 b1 1.000x; ResNet-56 b128 1.010x.
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    donate = (
        residual is not None
        and _DONATE_RESIDUALS.get()
        and residual.dtype == x.dtype
        and residual.data_ptr() != x.data_ptr()
    )
    if path == "winograd":
        if donate:
            return ops.conv3x3_bias_act_(residual, x, weight, bias, relu)
        return ops.conv3x3_bias_act(x, weight, bias, residual, relu)
    if path == "gemm":
        k, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if donate and k * k * conv.in_channels <= _routing.GEMM_SLICE:
            return ops.conv_bias_act_(residual, x, weight, bias, relu, k, stride, padding)
        return ops.conv_bias_act(x, weight, bias, residual, relu, k, stride, padding)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "relu" if relu else "none", [None], "")
    if donate:
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, bias, *args, "add", None, "relu" if relu else None, [], ""
        )
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, *args, "add", None, "relu" if relu else None, [], ""
    )


def _conv_bn_recomputed(x: Tensor, conv: nn.Module, bn: nn.Module, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``resnet_fast::conv_bn_act_train`` on the modules, with nn.BatchNorm2d's bookkeeping."""
    momentum, _, track = _step_momentum(bn)
    return ops.conv_bn_act_train(
        x,
        conv.weight,
        conv.stride[0],
        conv.padding[0],
        bn.weight,
        bn.bias,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        momentum,
        bn.eps,
        relu,
    )


def stem_conv_bn_act(x: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor:
    """A network's first unit, ``relu(bn(conv(x)))``, as :func:`conv_bn_act`; in training, where
    :func:`resnet_fast._routing.recomputes_conv_output` says so, through
    ``resnet_fast::conv_bn_act_train``, which keeps x (the images) for the backward rather than
    the convolution's output."""
    return stem_conv_bn_relu_source(x, conv, bn)[0]


def stem_conv_bn_relu_source(x: Tensor, conv: nn.Module, bn: nn.Module) -> tuple[Tensor, ConvInput | None]:
    """:func:`stem_conv_bn_act`, and how its output was made (:class:`ConvInput`, with the stem's
    convolution) where ``resnet_fast::conv_bn_act_train`` made it, else None: the first block's
    3x3 convolution then recomputes its input from the images instead of keeping it."""
    if not _routing.recomputes_conv_output(x, conv, bn, "stem"):
        return conv_bn_act(x, conv, bn), None
    y, mean, var = _conv_bn_recomputed(x, conv, bn, True)
    return y, ConvInput(x, bn.weight, bn.bias, mean, var, bn.eps, True, "cpu", conv.weight, conv.stride[0], conv.padding[0])


def projection_bn(x: Tensor, conv: nn.Module, bn: nn.Module) -> Tensor:
    """A projection shortcut, ``bn(conv(x))``, as :func:`conv_bn_act` without ReLU; in training,
    where :func:`resnet_fast._routing.recomputes_conv_output` says so, through
    ``resnet_fast::conv_bn_act_train``, which keeps x (the block's input, which the block's first
    convolution keeps too) for the backward rather than the convolution's output."""
    if not _routing.recomputes_conv_output(x, conv, bn, "projection"):
        return conv_bn_act(x, conv, bn, relu=False)
    return _conv_bn_recomputed(x, conv, bn, False)[0]


def _batch_scale_shift(bn: nn.Module, mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The scale and shift that normalise with a batch's mean and biased variance (differentiable
    in them: their gradients reach the convolution that reduced them), with nn.BatchNorm2d's
    bookkeeping: the running statistics (momentum, momentum=None as a cumulative average, the
    variance made unbiased) and ``num_batches_tracked``."""
    momentum, _, track = _step_momentum(bn)
    if track:
        update_running_stats(
            "triton", bn.running_mean, bn.running_var, mean.detach(), var.detach(), momentum, count
        )
    scale = bn.weight * torch.rsqrt(var.to(bn.weight.dtype) + bn.eps)
    return scale, bn.bias - mean.to(bn.weight.dtype) * scale


def norm_conv_block(
    x: Tensor, convs: list[nn.Module], bns: list[nn.Module], residual: Tensor | None, residual_stride: int = 1
) -> Tensor:
    """A residual block in training, ``relu(bnN(convN(...relu(bn1(conv1(x)))...)) + residual)``
    (a basic block's two convolutions, a bottleneck's three), across its convolutions (issue 18,
    GPUs; where :func:`resnet_fast._routing.norm_conv_block_applies`): each convolution reduces
    its output to its BatchNorm's batch statistics in its epilogue, and the next applies that
    BatchNorm's scale, shift and ReLU to it as it loads it (the normalised activations are never
    written); one elementwise pass applies the last BatchNorm with the residual and ReLU. The
    backward keeps x, each convolution's output and the block's output, and recomputes the
    normalised activations inside the convolutions' fused backward. ``residual``: as for
    :func:`bn_act` (a stride or fewer channels: the option-A shortcut)."""
    y, scale, shift = x, None, None
    for conv, bn in zip(convs, bns):
        y, mean, var = ops.norm_conv(y, conv.weight, conv.stride[0], conv.padding[0], scale, shift, scale is not None)
        check_batch_stats_shape(y.shape)
        scale, shift = _batch_scale_shift(bn, mean, var, y.numel() // max(y.shape[1], 1))
    out = torch.addcmul(shift.to(y.dtype).view(1, -1, 1, 1), y, scale.to(y.dtype).view(1, -1, 1, 1))
    if residual is not None:
        if residual_stride != 1 or residual.shape[1] != out.shape[1]:
            residual = ops.zero_pad_shortcut(residual, out.shape[1], residual_stride)
        out = out + residual
    return torch.relu(out)


def conv_bn_relu_source(
    x: Tensor, conv: nn.Module, bn: nn.Module, input_source: ConvInput | None = None
) -> tuple[Tensor, ConvInput | None]:
    """``relu(bn(conv(x)))`` as :func:`conv_bn_act` (``input_source``: how x was made), and, in
    training, how the fused BatchNorm made it (:class:`ConvInput`, else None): a unit whose output
    the block's next convolution reads, which passes it on as ``input_source``."""
    if _routing.conv_bn_inference_plan(x, conv, bn) is not None:
        return conv_bn_act(x, conv, bn), None
    return bn_relu_source(_conv(x, conv, input_source), bn)
