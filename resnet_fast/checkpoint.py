"""The training checkpoint: one type that ``resnet_fast.train`` writes and resumes from and
``resnet_fast.evaluate`` (and the model factories' ``weights=``) read, so that its keys are
written down once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ._cli import UsageError, atomic_write

FORMAT = "resnet_fast.train/1"


@dataclass
class Checkpoint:
    """What a run saves after every epoch. ``model`` alone is a final model's weights (with
    ``arch``, ``num_classes`` and ``normalizer``, what evaluation needs); ``optimizer``,
    ``schedule`` and ``config`` make it resumable."""

    arch: str
    num_classes: int
    model: dict[str, Tensor]
    normalizer: dict[str, Tensor]
    classes: list = field(default_factory=list)
    optimizer: dict | None = None
    schedule: dict | None = None
    config: dict | None = None
    epoch: int = 0
    iteration: int = 0
    history: list = field(default_factory=list)
    pca: list | None = None
    train_time: float = 0.0

    REQUIRED = ("arch", "num_classes", "model", "normalizer")
    RESUMABLE = ("optimizer", "schedule", "config")

    @property
    def resumable(self) -> bool:
        return all(getattr(self, k) is not None for k in self.RESUMABLE)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        return out

    @classmethod
    def from_dict(cls, obj: Any, source: str = "the checkpoint") -> "Checkpoint":
        """A checked Checkpoint from a loaded dict; UsageError for anything else."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise UsageError(
                f"{source!r} is not a resnet_fast.train checkpoint (expected a dict with format {FORMAT!r}); "
                "for torchvision's weights use --weights"
            )
        missing = [k for k in cls.REQUIRED if k not in obj]
        if missing:
            raise UsageError(f"checkpoint {source!r} is incomplete: no {', '.join(missing)}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})

    @classmethod
    def load(cls, path: str) -> "Checkpoint":
        """A checkpoint file, checked: a clear UsageError for a missing, corrupt or foreign file."""
        if not os.path.isfile(path):
            raise UsageError(f"checkpoint {path!r} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"checkpoint {path!r} is corrupt or not a torch file: {exc}") from exc
        return cls.from_dict(obj, path)

    def save(self, path: str) -> None:
        """Written to a temporary file and renamed: a crash leaves the previous checkpoint whole."""
        save(path, self.to_dict())

    def build_model(self, source: str = "the checkpoint"):
        """The network, with these weights (UsageError where they do not fit the architecture)."""
        from .models import get_model

        model = get_model(self.arch, num_classes=int(self.num_classes))
        try:
            model.load_state_dict(self.model)
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"checkpoint {source!r} does not fit {self.arch}: {exc}") from exc
        return model


def save(path: str, state: dict) -> None:
    """``torch.save(state, path)``, atomically (see resnet_fast._cli.atomic_write)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
