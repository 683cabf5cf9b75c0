"""The backend switch and what is built: which implementations exist on this machine.

Backends:

* ``auto`` (default): the best implementation for the tensor's device: the C++ kernels for
  CPU tensors, Triton (else the CUDA C++ kernels) for CUDA tensors, the formula where none is built.
* ``eager``: every op runs its pure-PyTorch formula (:mod:`resnet_fast.ops.reference`).
* ``cpu`` / ``cuda``: the C++ / CUDA C++ kernels of the compiled extension.
* ``triton``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Choose with the environment variable ``RESNET_FAST_BACKEND`` (read at import) or
:func:`set_backend`. Which implementation then runs for a given op, tensor and module is
decided in :mod:`resnet_fast._routing`, from the state kept here.

Every function here is plain Python on module state computed at import, so that
``torch.compile`` traces through it without a graph break.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "eager", "cpu", "cuda", "triton")

# The fused ops, as the README's op table lists them (their backward ops and helpers are not
# listed). Which of them have kernels where is read from the dispatcher below.
FUSED_OPS = ("zero_pad_shortcut", "batch_norm_act", "bias_act", "max_pool2d", "conv3x3_train", "conv3x3_bias_act",
             "conv_bias_act", "conv1x1_train", "max_pool2d_train", "conv_bn_act_train", "pool_linear")

# -- the compiled extension -------------------------------------------------------------------

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.resnet_fast.*)

    _extension_error: str | None = None
except Exception as exc:  # ImportError, or an OSError from a broken build
    _extension_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "resnet_fast: the compiled extension resnet_fast._C could not be loaded "
        f"({_extension_error}); every op falls back to its eager PyTorch formula, which is "
        f"slower. Rebuild it against the installed torch ({torch.__version__}) with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_available() -> bool:
    """True when the compiled extension ``resnet_fast._C`` is loaded."""
    return _extension_error is None


def extension_error() -> str | None:
    """Why the compiled extension could not be loaded, or None when it is."""
    return _extension_error


def _registered(op: str, key: str) -> bool:
    if _extension_error is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{op}", key)
    except RuntimeError:  # the op does not exist in this build
        return False


# -- Triton ---------------------------------------------------------------------------------

# TRITON_INTERPRET=1 (set before import) runs Triton kernels on CPU tensors, in numpy.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_CUDA_DEVICE = torch.cuda.is_available()


def _triton_problem() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if _extension_error is not None:
        return f"the Triton ops take their schemas from the compiled extension, which is not loaded ({_extension_error})"
    if not (_CUDA_DEVICE or TRITON_INTERPRET):
        return (
            "Triton kernels need a CUDA device (none here); set TRITON_INTERPRET=1 before importing "
            "resnet_fast to run them on CPU tensors in Triton's interpreter"
        )
    if not _CUDA_DEVICE:
        return _interpreter_problem()
    return None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())


def _interpreter_problem() -> str | None:
    """Triton before 3.7 (torch 2.11's 3.6) converts a kernel's scalar arguments with int() of a
    1-element array, which NumPy 2.4 made an error: its interpreter cannot run a loop bound by one."""
    from importlib import metadata

    try:
        triton_version, numpy_version = metadata.version("triton"), metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return None
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter cannot run these kernels with NumPy {numpy_version} (it takes int() "
            "of 1-element arrays, an error since NumPy 2.4): install numpy<2.4, or triton 3.7 or newer, to run them "
            "on CPU tensors"
        )
    return None


_triton_error = _triton_problem()
_TRITON_OPS: tuple[str, ...] = ()  # filled in by resnet_fast.triton when it loads


def _triton_loaded(ops: tuple[str, ...]) -> None:
    """Called by resnet_fast.triton once its ops are defined."""
    global _TRITON_OPS
    _TRITON_OPS = tuple(ops)
    _refresh()


def _disable_triton(reason: str) -> None:
    """Called when resnet_fast.triton fails to import (a triton release it does not support)."""
    global _triton_error, _TRITON_OPS
    _triton_error, _TRITON_OPS = reason, ()
    _refresh()


def triton_available() -> bool:
    """True when the Triton kernels can run: a CUDA device, or TRITON_INTERPRET=1 for CPU tensors."""
    return _triton_error is None


def triton_error() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    return _triton_error


# {op: {"cpu", "cuda", "triton": bool}} for every fused op.
_KERNELS: dict[str, dict[str, bool]] = {}


def _refresh() -> None:
    for op in FUSED_OPS:
        _KERNELS[op] = {
            "cpu": _registered(op, "CPU"),
            "cuda": _registered(op, "CUDA"),
            "triton": _triton_error is None and op in _TRITON_OPS,
        }


_refresh()


def kernels() -> dict[str, dict[str, bool]]:
    """Which fused op has kernels where: ``{op: {"cpu": built, "cuda": built, "triton": usable}}``."""
    return {op: dict(v) for op, v in _KERNELS.items()}


def has_kernel(op: str, impl: str) -> bool:
    """Whether ``op`` has a kernel in implementation ``impl`` (cpu, cuda or triton)."""
    return _KERNELS.get(op, {}).get(impl, False)


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    return any(v["cuda"] for v in _KERNELS.values())


# -- choosing a backend -----------------------------------------------------------------------


def _unavailable_reason(name: str) -> str | None:
    if name in ("auto", "eager"):
        return None
    if name in ("cpu", "cuda") and _extension_error is not None:
        return f"the compiled extension is not loaded ({_extension_error})"
    if name == "cuda":
        if not cuda_kernels_built():
            return "the extension was built without its CUDA sources (no CUDA toolkit, or RESNET_FAST_CUDA=0)"
        if not _CUDA_DEVICE:
            return "torch sees no CUDA device"
    if name == "triton":
        return _triton_error
    return None


def _checked(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown resnet_fast backend {name!r}; expected one of {', '.join(BACKENDS)}")
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"resnet_fast backend {name!r} is not available here: {reason}")
    return name


def available_backends() -> list[str]:
    """The backends :func:`set_backend` accepts on this machine and build."""
    return [b for b in BACKENDS if _unavailable_reason(b) is None]


_current = _checked(os.environ.get("RESNET_FAST_BACKEND", "auto").strip() or "auto")


def get_backend() -> str:
    """The name of the current backend."""
    return _current


def set_backend(name: str) -> str:
    """Selects the backend for every fused op; returns the previous one's name.

    Raises ValueError for an unknown name and RuntimeError for one that is not available.
    """
    global _current
    previous, _current = _current, _checked(name)
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("eager"): ...`` runs the block with that backend, then restores it."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def ops_for(impl: str):
    """The op namespace of an implementation: the Triton ops (``torch.ops.resnet_fast_triton``,
    defined in resnet_fast/triton/) or the C++/CUDA ones (``torch.ops.resnet_fast``); both have
    the same schemas."""
    return torch.ops.resnet_fast_triton if impl == "triton" else torch.ops.resnet_fast
