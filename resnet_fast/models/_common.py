"""What the ImageNet and CIFAR families share: input checks, weight loading, He initialisation."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models._api import WeightsEnum

from .. import _routing
from ..nn.blocks import BasicBlock, Bottleneck


def check_input(model: nn.Module, x: Tensor, in_channels: int, downsamplings: int) -> None:
    """Raises ValueError with what was expected when ``x`` cannot go through ``model``."""
    name = type(model).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor of shape (N, {in_channels}, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} expects a 4-D input (N, {in_channels}, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{name} expects {in_channels} input channels (N, {in_channels}, H, W), got shape {tuple(x.shape)}"
        )
    h, w = x.shape[2], x.shape[3]
    if h < 1 or w < 1:
        raise ValueError(f"{name} expects an image of at least 1x1 pixels, got {h}x{w}")
    if model.training and x.shape[0] > 0:
        # Each stride-2 stage halves the map, rounding up. A 1x1 map at batch 1 leaves one value
        # per channel to the last BatchNorm, whose batch statistics are then undefined.
        fh, fw = h, w
        for _ in range(downsamplings):
            fh, fw = (fh + 1) // 2, (fw + 1) // 2
        if x.shape[0] * fh * fw == 1:
            side = 2 ** (downsamplings - 1) + 1
            raise ValueError(
                f"an image of {h}x{w} is too small for training {name} at batch size 1: its last stage sees a "
                f"1x1 map, one value per channel, and BatchNorm needs more than one in training; use a batch "
                f"of at least 2 or images of at least {side}x{side} (or call model.eval())"
            )


def choose_layout(model: nn.Module) -> None:
    """Creates the convolution weights in :func:`resnet_fast._routing.conv_weight_format`
    (channels_last when the fused CPU kernels will run the model)."""
    fmt = _routing.conv_weight_format()
    if fmt != torch.contiguous_format:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)


def to_internal_layout(x: Tensor, stem: nn.Conv2d) -> Tensor:
    """``x`` in the layout the network runs in (:func:`resnet_fast._routing.internal_layout`)."""
    fmt = _routing.internal_layout(x, stem)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state_dict from a file: a plain state_dict or one of our training checkpoints."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {os.fspath(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read weights from {os.fspath(path)!r}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        # A training checkpoint: ours (resnet_fast.checkpoint.Checkpoint, whose weights are its
        # "model") or one of torchvision's reference scripts ({"model": ..., "optimizer": ...}).
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{os.fspath(path)!r} holds no state_dict (a mapping of names to tensors)")
    return dict(obj)


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], arch: str) -> None:
    """``model.load_state_dict(state_dict)``, strict, with an error that says what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in own
        if k in state_dict and own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        hint = ""
        if any(m.startswith("fc.") for m in mismatched):
            hint = " (a classifier of another size: pass num_classes=...)"
        raise ValueError(
            f"these weights do not fit {arch}{hint}; they look like another architecture or configuration. "
            + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


def resolve_weights(weights: Any, enum_cls: type[WeightsEnum] | None, arch: str):
    """None, a torchvision weights enum (or its name, e.g. "IMAGENET1K_V2" or "DEFAULT"), a path
    to a state_dict file, or a state_dict. Returns None, a WeightsEnum, or a state_dict."""
    if weights is None:
        return None
    if isinstance(weights, WeightsEnum):
        if enum_cls is None:
            raise ValueError(f"{arch} has no torchvision weights; pass a path to a state_dict file")
        return enum_cls.verify(weights)
    if isinstance(weights, Mapping):
        return dict(weights)
    if isinstance(weights, (str, os.PathLike)):
        if not isinstance(weights, str) or os.path.exists(weights) or enum_cls is None:
            return load_state_dict_file(weights)
        try:
            return enum_cls.verify(weights)
        except (ValueError, KeyError) as exc:
            names = ", ".join(w.name for w in enum_cls)
            raise ValueError(
                f"weights={weights!r} for {arch} is neither a file nor one of {enum_cls.__name__}'s names ({names}, DEFAULT)"
            ) from exc
    raise TypeError(
        f"weights for {arch} must be None, a torchvision weights enum, a path or a state_dict, got {type(weights).__name__}"
    )


def he_init(model: nn.Module) -> None:
    """He et al.'s initialisation for ReLU nets, as torchvision does it: convolutions
    kaiming-normal (fan_out), BatchNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def zero_init_last_bn(model: nn.Module) -> None:
    """Zero-initialise the last BN of each residual branch, so that each residual block starts
    as an identity (improves accuracy by 0.2~0.3% according to https://arxiv.org/abs/1706.02677)."""
    for m in model.modules():
        last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
        if last is not None and getattr(last, "weight", None) is not None:
            nn.init.constant_(last.weight, 0)
