"""What the command lines (``resnet_fast.train``, ``resnet_fast.evaluate``) share: the error type for
bad input and its exit code, the device option, and files written so that a crash never leaves
a torn one."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

import torch

from . import data as D


class UsageError(ValueError):
    """A bad option, file or checkpoint: the command line prints it and exits with code 2."""


def exit_code(run: Callable[[Sequence[str] | None], int], prog: str, argv: Sequence[str] | None) -> int:
    """``run(argv)``, with bad input (a UsageError or DataError) printed as one line and exit code 2."""
    try:
        return run(argv)
    except (UsageError, D.DataError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def pick_device(name: str | None) -> torch.device:
    """``--device``: cpu, cuda or cuda:N; None for cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected cpu or cuda")
    return device


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file beside ``path``, then renames it over ``path``:
    a crash at any moment leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)
