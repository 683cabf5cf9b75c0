"""The paper's networks: the ImageNet ResNets (torchvision names) and the CIFAR nets."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from . import cifar, resnet
from .cifar import *  # noqa: F401,F403
from .resnet import *  # noqa: F401,F403

_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "plain18": resnet.plain18,
    "plain34": resnet.plain34,
    "resnet20": cifar.resnet20,
    "resnet32": cifar.resnet32,
    "resnet44": cifar.resnet44,
    "resnet56": cifar.resnet56,
    "resnet110": cifar.resnet110,
    "resnet1202": cifar.resnet1202,
    "plain20": cifar.plain20,
    "plain32": cifar.plain32,
    "plain44": cifar.plain44,
    "plain56": cifar.plain56,
    "plain110": cifar.plain110,
}
CIFAR_ARCHS = tuple(name for name, f in _ARCHS.items() if f.__module__ == cifar.__name__)
IMAGENET_ARCHS = tuple(name for name in _ARCHS if name not in CIFAR_ARCHS)


def list_models() -> list[str]:
    """The names :func:`get_model` accepts."""
    return list(_ARCHS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the architecture ``name`` (see :func:`list_models`) with the factory's keyword arguments."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _ARCHS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(_ARCHS)}")
    return _ARCHS[key](**kwargs)


def count_multiply_adds(model: nn.Module, input_size: tuple[int, int, int, int] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward pass through the convolutions and fully-connected layers,
    the paper's FLOPs (Table 1 counts these)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += output.numel() * k

    def linear_hook(m: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += output.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(input_size, dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // input_size[0]


__all__ = [*resnet.__all__, *cifar.__all__, "CIFAR_ARCHS", "IMAGENET_ARCHS", "count_multiply_adds", "get_model", "list_models"]
