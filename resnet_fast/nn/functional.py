"""Module-level entry points of the fused ops: they take the model's own modules, so that the
models keep torchvision's module tree and state_dict while running fused code."""

from __future__ import annotations

import contextvars
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing

from .. import _backend, ops


def _runs_own_forward(bn: nn.Module) -> bool:
    # A norm layer that is not exactly nn.BatchNorm2d (a user's norm_layer, a subclass with
    # its own forward, SyncBatchNorm), or one with hooks, runs its own forward unfused. So does
    # every layer under torch.fx symbolic tracing (torchvision's create_feature_extractor), which
    # then records torchvision's own graph of module calls.
    return type(bn) is not nn.BatchNorm2d or bool(bn._forward_hooks or bn._forward_pre_hooks) or is_fx_tracing()


def bn_act(
    x: Tensor, bn: nn.Module, residual: Tensor | None = None, relu: bool = True, residual_stride: int = 1
) -> Tensor:
    """``relu(bn(x) + residual)`` with exactly nn.BatchNorm2d's semantics (batch statistics in
    training, running statistics in eval, momentum=None as a cumulative average,
    ``num_batches_tracked``, ``track_running_stats``), through the fused op.

    A residual with fewer channels than ``x`` or a ``residual_stride`` > 1 is the option-A
    shortcut: subsampled and zero-padded, read in place by the fused kernel."""
    if _runs_own_forward(bn):
        # (Under torch.fx tracing the shortcut module has already produced the full residual.)
        if residual is not None and not is_fx_tracing() and (residual_stride != 1 or residual.shape[1] != x.shape[1]):
            residual = ops.zero_pad_shortcut(residual, x.shape[1], residual_stride)
        y = bn(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W) to {bn}, got shape {tuple(x.shape)}")
    # The same momentum bookkeeping as torch.nn.modules.batchnorm._BatchNorm.forward.
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return ops.batch_norm_act(
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
    )


def _conv(x: Tensor, conv: nn.Module) -> Tensor:
    """``conv(x)``; the residual nets' 3x3 convolutions (padding 1, no bias) go through
    :func:`resnet_fast.ops.conv3x3`, whose weight gradient is ours on the CPU."""
    if (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and conv.stride[0] == conv.stride[1]
        and not (conv._forward_hooks or conv._forward_pre_hooks or is_fx_tracing())
    ):
        return ops.conv3x3(x, conv.weight, conv.stride[0])
    return conv(x)


# -- inference: BatchNorm folded into the convolution ----------------------------------------

# conv module -> (key, folded weight (prepacked for oneDNN), folded bias). Weakly keyed, so the
# cache lives exactly as long as the model and never travels with it (pickle, deepcopy).
_FOLDED: "weakref.WeakKeyDictionary[nn.Conv2d, tuple]" = weakref.WeakKeyDictionary()


def _fold_path(x: Tensor, conv: nn.Module, bn: nn.Module) -> str | None:
    """How inference with BatchNorm folded into the convolution runs here, or None when it does
    not apply (training, something to differentiate, hooks, other modules, torch.compile tracing):
    "mkldnn" on the fused CPU path (oneDNN convolution with post-ops), "winograd" there for the
    wide stride-1 3x3 convolutions (ops.conv3x3_bias_act), "epilogue" on GPUs (cuDNN
    convolution, then the bias_act kernel; also Triton's interpreter on CPU tensors)."""
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
        and not (conv._forward_hooks or conv._forward_pre_hooks or bn._forward_hooks or bn._forward_pre_hooks)
    ):
        return None
    impl = _backend.resolve("batch_norm_act", x.device)
    if impl == "cpu" and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last):
        return "winograd" if _winograd_applies(conv) else "mkldnn"
    if impl in ("triton", "cuda") and x.is_floating_point():
        return "epilogue"
    return None


def _winograd_applies(conv: nn.Conv2d) -> bool:
    """A 3x3, stride-1 convolution that Winograd F(2x2, 3x3) runs faster than oneDNN here: 64
    channels or more in and out (ResNet-50's 3x3s: 1.25-1.7x; at 16 channels oneDNN is faster)."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.in_channels >= 64
        and conv.out_channels >= 64
        and conv.in_channels % 8 == 0
        and conv.out_channels % 8 == 0
        and _backend.resolve("conv3x3_bias_act", conv.weight.device) == "cpu"
    )


def _folded_weights(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, path: str) -> tuple[Tensor, Tensor]:
    tensors = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        tensors.append(conv.bias)
    # Any change to a parameter or statistic (optimiser step, load_state_dict, .to()) bumps its
    # version or moves its storage, and so invalidates the cache. oneDNN's prepacked weights also
    # depend on the input's shape.
    shape = tuple(x.shape) if path == "mkldnn" else (x.dtype, x.is_contiguous(memory_format=torch.channels_last))
    key = (path, id(bn), bn.eps, shape, tuple((t._version, t.data_ptr()) for t in tensors))
    hit = _FOLDED.get(conv)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.no_grad():
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = (conv.weight * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
        if path == "winograd":
            weight = ops.winograd_weight(weight)
        elif path == "mkldnn":
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


# Set by a whole network's forward (models/) while its intermediate tensors are its own: a block
# end may then write its output into the storage of its residual (the block's input or its
# projection), as torch.compile's freezing does, sparing a fresh output buffer per block.
_DONATE_RESIDUALS = contextvars.ContextVar("resnet_fast_donate_residuals", default=False)


def run_owning_residuals(model: nn.Module, fn, x: Tensor) -> Tensor:
    """``fn(x)`` (a network's blocks) with residual donation when that is safe: eval mode,
    nothing to differentiate, not under torch.compile or torch.fx, and no forward hook anywhere
    (a hook could keep a block's input or output, which a later block would overwrite). Only a
    network's own forward uses this, so a block called directly never writes into the caller's
    tensor."""
    safe = (
        not torch.compiler.is_compiling()
        and not is_fx_tracing()
        and not model.training
        and not torch.is_grad_enabled()
        and not torch.nn.modules.module._global_forward_hooks
        and not torch.nn.modules.module._global_forward_pre_hooks
        and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    )
    if not safe:
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
) -> Tensor:
    """``relu(bn(conv(x)) + residual)``. In inference (eval mode, nothing requiring a gradient),
    BatchNorm is folded into the convolution's weights once (cached): on the CPU kernels' path the
    residual add and ReLU run as oneDNN post-ops of the convolution (or, for the wide stride-1 3x3
    ones, as the epilogue of our Winograd convolution), on GPUs as the bias_act
    epilogue kernel after cuDNN's convolution. Otherwise (training) the convolution runs as is,
    a 3x3 one with our weight gradient (:func:`resnet_fast.ops.conv3x3`), and :func:`bn_act`
    fuses the rest."""
    path = None if is_fx_tracing() else _fold_path(x, conv, bn)
    if path is None:
        return bn_act(_conv(x, conv), bn, residual, relu, residual_stride)
    weight, bias = _folded_weights(x, conv, bn, path)
    if path == "epilogue":
        y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return ops.bias_act(y, bias, residual, relu, residual_stride)
    if residual is not None and (residual_stride != 1 or residual.shape[1] != conv.out_channels):
        residual = ops.zero_pad_shortcut(residual, conv.out_channels, residual_stride)
    if path == "winograd":
        return ops.conv3x3_bias_act(x, weight, bias, residual, relu)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "relu" if relu else "none", [None], "")
    residual = residual.contiguous(memory_format=torch.channels_last)
    if _DONATE_RESIDUALS.get() and residual.dtype == x.dtype and residual.shape[1] == conv.out_channels:
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, x, weight, bias, *args, "add", None, "relu" if relu else None, [], ""
        )
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, *args, "add", None, "relu" if relu else None, [], ""
    )
