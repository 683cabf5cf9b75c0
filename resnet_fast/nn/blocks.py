"""The building blocks of the paper's networks, with torchvision's module names and
state_dict keys, running the fused ops.

Each module has two bodies (:class:`FusedModule`): the fused one, and the formula, which calls
the submodules in torchvision's order (``_forward_formula``: torchvision's own forward). The
formula runs where the model is being captured for another runtime
(:func:`resnet_fast._routing.formulas_only`: torch.jit.trace, torch.export, ONNX export, torch.fx)
and is what ``torch.jit.script`` compiles, so that a captured model holds PyTorch's ops only and
runs without resnet_fast.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _plan, _routing, ops
from .functional import ConvInput, conv_bn_act, conv_bn_relu_source, norm_conv_block, projection_bn


class FusedModule(nn.Module):
    """A module with two bodies: ``_forward_fused`` (the fused ops) and ``_forward_formula``
    (PyTorch's own modules in torchvision's order). The formula runs under ``torch.jit.script``,
    which compiles it alone, and wherever :func:`resnet_fast._routing.formulas_only` says the model is
    being captured for another runtime."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_formula(x)
        return self._forward_unless_captured(x)

    @torch.jit.unused
    def _forward_unless_captured(self, x: Tensor) -> Tensor:
        if _routing.formulas_only():
            return self._forward_formula(x)
        return self._forward_fused(x)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (no bias: a BatchNorm follows)."""
    return nn.Conv2d(
        in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (no bias: a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


@_plan.register_module_type("in_channels", "out_channels", "stride")
class ZeroPadShortcut(FusedModule):
    """The paper's option-A shortcut (section 3.3): identity subsampled by ``stride``, with the
    ``out_channels - in_channels`` extra channels filled with zeros. Parameter-free."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut: out_channels ({out_channels}) < in_channels ({in_channels})")
        if stride < 1:
            raise ValueError(f"ZeroPadShortcut: expected stride >= 1, got {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def _forward_fused(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ZeroPadShortcut: expected an input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return ops.zero_pad_shortcut(x, self.out_channels, self.stride)

    def _forward_formula(self, x: Tensor) -> Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], [0, 0, 0, 0, 0, self.out_channels - self.in_channels])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


@_plan.register_module_type(*_plan._POOL)
class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, repr and behaviour) that, on the CPU kernels' path, computes
    only the window maxima where no gradient is needed, and in training keeps one byte per output
    for its backward rather than its input and int64 indices (:func:`resnet_fast.ops.max_pool2d`,
    :func:`resnet_fast._routing.max_pool2d_impl`)."""

    def forward(self, input: Tensor):
        if torch.jit.is_scripting():
            return self._forward_formula(input)
        return self._forward_fused(input)

    @torch.jit.unused
    def _forward_fused(self, input: Tensor):
        if _routing.formulas_only():
            return self._forward_formula(input)
        impl = _routing.max_pool2d_impl(input, self.ceil_mode, self.dilation, self.return_indices, self.kernel_size)
        if impl == "eager":
            return self._forward_formula(input)
        return ops.max_pool2d(input, self.kernel_size, self.stride, self.padding)

    def _forward_formula(self, input: Tensor):  # nn.MaxPool2d.forward
        return F.max_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.dilation,
            ceil_mode=self.ceil_mode, return_indices=self.return_indices,
        )


def shortcut_of(downsample: nn.Module | None, x: Tensor) -> tuple[Tensor, int]:
    """The residual term of a block and the stride to read it with. An option-A shortcut is
    not run: the fused kernel reads the block input in place, subsampled and zero-padded."""
    if downsample is None:
        return x, 1
    if _routing.has_hooks(downsample):
        return downsample(x), 1
    if type(downsample) is ZeroPadShortcut:
        return x, downsample.stride
    if type(downsample) is nn.Sequential and len(downsample) == 2:  # a projection: conv, then BN
        return projection_bn(x, downsample[0], downsample[1]), 1
    return downsample(x), 1


@_plan.register_module_type("stride", "residual", "downsample")
class BasicBlock(FusedModule):
    """Two 3x3 convolutions (Fig. 2 left); ``residual=False`` gives the plain nets' block."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        if downsample is not None and not residual:
            raise ValueError("a block without a residual connection has no shortcut to downsample")
        # The stride sits on the first 3x3 convolution, as in the paper.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    def _forward_fused(self, x: Tensor, input_source: ConvInput | None = None) -> Tensor:
        """``input_source``: how x was made, where the network's forward knows it (the stem's
        output, :func:`resnet_fast.nn.functional.stem_conv_bn_relu_source`)."""
        if _routing.norm_conv_block_applies(self, x):
            identity, stride = shortcut_of(self.downsample, x) if self.residual else (None, 1)
            return norm_conv_block(x, *_routing.norm_conv_convs(self), identity, stride)
        out, source = conv_bn_relu_source(x, self.conv1, self.bn1, input_source)
        if not self.residual:
            return conv_bn_act(out, self.conv2, self.bn2, input_source=source)
        identity, stride = shortcut_of(self.downsample, x)
        return conv_bn_act(out, self.conv2, self.bn2, residual=identity, residual_stride=stride, input_source=source)

    def _forward_formula(self, x: Tensor) -> Tensor:  # torchvision's BasicBlock.forward
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.residual:
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
        out = self.relu(out)
        return out


@_plan.register_module_type("stride", "residual", "downsample")
class Bottleneck(FusedModule):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right).

    torchvision (ResNet v1.5) puts the stride on the 3x3 convolution; the paper puts it on the
    first 1x1 (``stride_in_1x1=True``), which gives the paper's Table 1 FLOPs.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        residual: bool = True,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if downsample is not None and not residual:
            raise ValueError("a block without a residual connection has no shortcut to downsample")
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    def _forward_fused(self, x: Tensor) -> Tensor:
        if _routing.norm_conv_block_applies(self, x):
            identity, stride = shortcut_of(self.downsample, x) if self.residual else (None, 1)
            return norm_conv_block(x, *_routing.norm_conv_convs(self), identity, stride)
        out, source = conv_bn_relu_source(x, self.conv1, self.bn1)
        out, source = conv_bn_relu_source(out, self.conv2, self.bn2, source)
        if not self.residual:
            return conv_bn_act(out, self.conv3, self.bn3, input_source=source)
        identity, stride = shortcut_of(self.downsample, x)
        return conv_bn_act(out, self.conv3, self.bn3, residual=identity, residual_stride=stride, input_source=source)

    def _forward_formula(self, x: Tensor) -> Tensor:  # torchvision's Bottleneck.forward
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.residual:
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
        out = self.relu(out)
        return out


SHORTCUTS = ("A", "B", "C")


def make_shortcut(
    option: str,
    inplanes: int,
    outplanes: int,
    stride: int,
    norm_layer: Callable[..., nn.Module],
) -> nn.Module | None:
    """The shortcut of one block under the paper's options (section 4.1, Table 3):

    * A: identity; zero-padding where the dimensions increase (parameter-free);
    * B: identity; a 1x1 projection (conv + BN) where the dimensions increase;
    * C: a projection on every shortcut.

    Returns None for the identity (torchvision's ``downsample=None``).
    """
    if option not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {option!r}; expected one of {', '.join(SHORTCUTS)}")
    changes = stride != 1 or inplanes != outplanes
    if option == "C" or (option == "B" and changes):
        return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))
    if option == "A" and changes:
        return ZeroPadShortcut(inplanes, outplanes, stride)
    return None
