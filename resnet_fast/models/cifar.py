"""The CIFAR-10 networks of He et al. 2015, section 4.2, and their plain counterparts.

A 3x3 convolution with 16 filters, then 3 stages of n basic blocks (2n layers each) on maps
of 32, 16 and 8 pixels with 16, 32 and 64 filters, subsampling by stride-2 convolutions, then
global average pooling and a 10-way fully-connected layer: 6n + 2 weighted layers. The
shortcuts are identities, with zero-padding where the dimensions increase (option A), so the
residual nets have exactly as many parameters as the plain ones (Table 6).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import _plan, _routing
from ..nn.blocks import SHORTCUTS, BasicBlock, FusedModule, ZeroPadShortcut, make_shortcut
from ..nn.functional import pool_linear, run_owning_residuals, stem_conv_bn_relu_source
from ._common import check_input, choose_layout, to_internal_layout, he_init, load_into, resolve_weights, zero_init_last_bn

__all__ = [
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
    "plain20",
    "plain32",
    "plain44",
    "plain56",
    "plain110",
]


@_plan.register_module_type("_downsamplings")
class CifarResNet(FusedModule):
    """ResNet (or plain net, ``residual=False``) of ``depth = 6n + 2`` layers for 32x32 images.

    Args:
        depth: 20, 32, 44, 56, 110, 1202 in the paper; any 6n + 2 works.
        num_classes: size of the classifier (10 for CIFAR-10).
        shortcut: "A" (the paper's choice on CIFAR), "B" or "C".
        residual: False builds the plain net of the same depth.
        zero_init_residual: start every residual branch's last BN at zero.
        norm_layer: defaults to nn.BatchNorm2d.
        widths: filters per stage, (16, 32, 64) in the paper.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        shortcut: str = "A",
        residual: bool = True,
        zero_init_residual: bool = False,
        norm_layer: Callable[..., nn.Module] | None = None,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 1202), got {depth!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; expected one of {', '.join(SHORTCUTS)}")
        if len(widths) != 3:
            raise ValueError(f"widths must give the filters of the 3 stages, got {widths!r}")
        norm_layer = norm_layer or nn.BatchNorm2d
        n = (depth - 2) // 6
        self.depth, self.shortcut, self.residual = depth, shortcut, residual
        self._downsamplings = 2

        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = make_shortcut(shortcut, inplanes, planes, stride, norm_layer) if residual else None
                blocks.append(
                    BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm_layer, residual=residual)
                )
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)

        he_init(self)
        if zero_init_residual and residual:
            zero_init_last_bn(self)
        choose_layout(self)

    def _forward_fused(self, x: Tensor) -> Tensor:
        # In inference, replayed from its recording where resnet_fast._plan allows it.
        return _plan.forward(self, x, self._forward_modules)

    def _forward_modules(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels, self._downsamplings)
        x = to_internal_layout(x, self.conv1)
        # The blocks' inputs are this forward's own tensors: block ends may reuse them.
        x = run_owning_residuals(self, lambda t: self.layer3(self.layer2(self._stem_and_layer1(t))), x)
        return pool_linear(x, self.avgpool, self.fc)  # fc(flatten(avgpool(x), 1)), in one op in inference

    def _stem_and_layer1(self, x: Tensor) -> Tensor:
        """``self.layer1(relu(self.bn1(self.conv1(x))))``. Where the stem says how it made its
        output (``source``, in training) and nothing else keeps that output (an identity or
        option-A shortcut), the first block gets it, called by its fused body where skipping the
        modules' ``__call__`` goes unnoticed (:func:`resnet_fast._routing.may_bypass_call`): its
        first 3x3 convolution then recomputes the stem's output from the images for its weight
        gradient instead of keeping it (8 MiB at batch 128). No frame here holds that output
        beyond the first block (``x`` is rebound), so it is freed there."""
        x, source = stem_conv_bn_relu_source(x, self.conv1, self.bn1)
        layer = self.layer1
        first = layer[0] if type(layer) is nn.Sequential and len(layer) > 0 else None
        if (
            source is None
            or type(first) is not BasicBlock
            or not (first.downsample is None or type(first.downsample) is ZeroPadShortcut)
            or not _routing.may_bypass_call(layer, first)
        ):
            return layer(x)
        x = first._forward_fused(x, source)
        for block in list(layer)[1:]:
            x = block(x)
        return x

    def _forward_formula(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def extra_repr(self) -> str:
        kind = "ResNet" if self.residual else "plain net"
        return f"depth={self.depth} ({kind}, shortcut option {self.shortcut})"


def _cifar(arch: str, depth: int, residual: bool, weights: Any, **kwargs: Any) -> CifarResNet:
    state_dict = resolve_weights(weights, None, arch)
    model = CifarResNet(depth, residual=residual, **kwargs)
    if state_dict is not None:
        load_into(model, state_dict, arch)
    return model


def _factory(depth: int, residual: bool):
    arch = f"{'resnet' if residual else 'plain'}{depth}"

    def build(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> CifarResNet:
        return _cifar(arch, depth, residual, weights, **kwargs)

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (
        f"The {depth}-layer CIFAR-10 {'ResNet' if residual else 'plain net'} of He et al. 2015, section 4.2. "
        "``weights``: a path to a state_dict file (or a state_dict); keyword arguments go to CifarResNet."
    )
    return build


resnet20 = _factory(20, True)
resnet32 = _factory(32, True)
resnet44 = _factory(44, True)
resnet56 = _factory(56, True)
resnet110 = _factory(110, True)
resnet1202 = _factory(1202, True)
plain20 = _factory(20, False)
plain32 = _factory(32, False)
plain44 = _factory(44, False)
plain56 = _factory(56, False)
plain110 = _factory(110, False)
