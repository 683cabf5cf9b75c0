"""The ImageNet ResNets of He et al. 2015 (Table 1), a drop-in for ``torchvision.models.resnet``.

With default arguments a model has torchvision's architecture, module names and state_dict,
so torchvision's weights load strictly and give the same outputs. Keyword arguments beyond
torchvision's give the paper's own variants:

* ``shortcut="A" | "B" | "C"`` (section 3.3): zero-padding, projection where the dimensions
  increase (torchvision's choice, the default), or projection everywhere;
* ``stride_in_1x1=True``: the paper's bottleneck, with the stride on its first 1x1
  convolution (torchvision's "v1.5" puts it on the 3x3), which gives Table 1's FLOPs;
* ``residual=False``: the plain networks of Table 2.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models._api import WeightsEnum
from torchvision.models._utils import _ovewrite_named_param

from .. import _plan
from ..nn.blocks import SHORTCUTS, BasicBlock, Bottleneck, FusedModule, MaxPool2d, make_shortcut
from ..nn.functional import pool_linear, run_owning_residuals, stem_conv_bn_act
from ._common import check_input, choose_layout, to_internal_layout, he_init, load_into, resolve_weights, zero_init_last_bn

__all__ = [
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "plain18",
    "plain34",
]


@_plan.register_module_type("_downsamplings")
class ResNet(FusedModule):
    """The ImageNet ResNet (He et al. 2015, Table 1), with torchvision's constructor.

    Args:
        block: :class:`BasicBlock` (18, 34 layers) or :class:`Bottleneck` (50, 101, 152).
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]`` for ResNet-50.
        num_classes, zero_init_residual, groups, width_per_group, replace_stride_with_dilation,
        norm_layer: as in ``torchvision.models.ResNet``.
        shortcut: the paper's shortcut option, "A", "B" (default, as torchvision) or "C".
        stride_in_1x1: put a bottleneck's stride on its first 1x1 convolution (the paper).
        residual: False builds the plain counterpart (no shortcuts).
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        shortcut: str = "B",
        stride_in_1x1: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(
                f"block must be resnet_fast.nn.BasicBlock or resnet_fast.nn.Bottleneck, got {getattr(block, '__name__', block)!r}"
            )
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, e.g. [3, 4, 6, 3], got {layers!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; expected one of {', '.join(SHORTCUTS)}")
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError("stride_in_1x1 applies to Bottleneck blocks only (a BasicBlock has no 1x1 convolution)")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.shortcut = shortcut
        self.stride_in_1x1 = stride_in_1x1
        self.residual = residual

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace
            # the 2x2 stride with a dilated convolution instead
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        # conv1 and maxpool halve twice; each stage after the first halves once unless dilated.
        self._downsamplings = 2 + sum(not d for d in replace_stride_with_dilation)
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        he_init(self)
        if zero_init_residual:
            zero_init_last_bn(self)
        choose_layout(self)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        extra: dict[str, Any] = {"residual": self.residual}
        if block is Bottleneck:
            extra["stride_in_1x1"] = self.stride_in_1x1

        def shortcut(inplanes: int, s: int) -> nn.Module | None:
            if not self.residual:
                return None
            return make_shortcut(self.shortcut, inplanes, planes * block.expansion, s, norm_layer)

        layers = [
            block(
                self.inplanes,
                planes,
                stride,
                shortcut(self.inplanes, stride),
                self.groups,
                self.base_width,
                previous_dilation,
                norm_layer,
                **extra,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    downsample=shortcut(self.inplanes, 1),
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                    **extra,
                )
            )
        return nn.Sequential(*layers)

    def _forward_fused(self, x: Tensor) -> Tensor:
        # In inference, replayed from its recording where resnet_fast._plan allows it.
        return _plan.forward(self, x, self._forward_modules)

    def _forward_modules(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels, self._downsamplings)
        x = to_internal_layout(x, self.conv1)
        x = stem_conv_bn_act(x, self.conv1, self.bn1)
        x = self.maxpool(x)

        # The blocks' inputs are this forward's own tensors: block ends may reuse them.
        x = run_owning_residuals(self, lambda t: self.layer4(self.layer3(self.layer2(self.layer1(t)))), x)
        return pool_linear(x, self.avgpool, self.fc)  # fc(flatten(avgpool(x), 1)), in one op in inference

    def _forward_formula(self, x: Tensor) -> Tensor:  # torchvision's ResNet._forward_impl
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def _resnet(
    arch: str,
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    weights: Any,
    enum_cls: type[WeightsEnum] | None,
    progress: bool,
    **kwargs: Any,
) -> ResNet:
    weights = resolve_weights(weights, enum_cls, arch)
    if isinstance(weights, WeightsEnum):
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if isinstance(weights, WeightsEnum):
        load_into(model, weights.get_state_dict(progress=progress, check_hash=True), arch)
    elif weights is not None:
        load_into(model, weights, arch)
    return model


def ResNet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (Table 1). ``weights``: ``torchvision.models.ResNet18_Weights``, its name, or a state_dict path."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, tv_resnet.ResNet18_Weights, progress, **kwargs)


def ResNet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (Table 1). ``weights``: ``torchvision.models.ResNet34_Weights``, its name, or a state_dict path."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, tv_resnet.ResNet34_Weights, progress, **kwargs)


def ResNet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 (Table 1). ``weights``: ``torchvision.models.ResNet50_Weights``, its name, or a state_dict path."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, tv_resnet.ResNet50_Weights, progress, **kwargs)


def ResNet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 (Table 1). ``weights``: ``torchvision.models.ResNet101_Weights``, its name, or a state_dict path."""
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, tv_resnet.ResNet101_Weights, progress, **kwargs)


def ResNet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 (Table 1). ``weights``: ``torchvision.models.ResNet152_Weights``, its name, or a state_dict path."""
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, tv_resnet.ResNet152_Weights, progress, **kwargs)


def plain18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """The 18-layer plain net of Table 2: ResNet-18 without shortcuts."""
    return _resnet("plain18", BasicBlock, [2, 2, 2, 2], weights, None, progress, residual=False, **kwargs)


def plain34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """The 34-layer plain net of Table 2 and Fig. 3: ResNet-34 without shortcuts."""
    return _resnet("plain34", BasicBlock, [3, 4, 6, 3], weights, None, progress, residual=False, **kwargs)


# torchvision's lowercase names.
resnet18, resnet34, resnet50, resnet101, resnet152 = ResNet18, ResNet34, ResNet50, ResNet101, ResNet152
