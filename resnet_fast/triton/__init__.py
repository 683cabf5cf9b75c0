"""The Triton implementation of the fused ops, as custom ops ``torch.ops.resnet_fast_triton.*``.

Their schemas are the C++ library's own (csrc/ops.cpp, read from ``torch.ops.resnet_fast``), their
argument checks the C++ ones (the ``resnet_fast::check_<op>`` ops), and their fake kernels and
autograd those of resnet_fast/ops/<op>.py, so torch.compile traces them without a graph break and
the models switch between implementations by namespace alone. The kernels and their launchers
are in :mod:`.batch_norm_act`, :mod:`.zero_pad_shortcut` and :mod:`.norm_conv`. Imported by :mod:`resnet_fast.ops`
when Triton can run (a CUDA device, or ``TRITON_INTERPRET=1`` set before import for CPU tensors).
"""

from __future__ import annotations

import importlib

import torch

from .. import _backend
from . import batch_norm_act as _bn
from . import norm_conv as _nc
from . import zero_pad_shortcut as _zp
from ._common import INTERPRET

NAMESPACE = "resnet_fast_triton"

# op -> launcher; the op's schema comes from the C++ library.
LAUNCHERS = {
    "zero_pad_shortcut": _zp.zero_pad_shortcut,
    "zero_pad_shortcut_backward": _zp.zero_pad_shortcut_backward,
    "batch_norm_act": _bn.batch_norm_act,
    "batch_norm_act_backward": _bn.batch_norm_act_backward,
    "bias_act": _bn.bias_act,
    "norm_conv": _nc.norm_conv,
    "norm_conv_backward": _nc.norm_conv_backward,
}


def schema_of(op: str) -> str:
    """The C++ op's schema without its namespace, e.g. ``bias_act(Tensor x, ...) -> Tensor``."""
    return str(getattr(torch.ops.resnet_fast, op).default._schema).split("::", 1)[1]


def _implementation(op: str):
    launch = LAUNCHERS[op]
    check = getattr(torch.ops.resnet_fast, f"check_{op}")

    def run(*args):
        for t in args:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not INTERPRET:
                raise RuntimeError(
                    "resnet_fast_triton ops run CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set before import"
                )
        check(*args)
        return launch(*args)

    run.__name__ = op
    return run


_lib = torch.library.Library(NAMESPACE, "DEF")
for _op in LAUNCHERS:
    _lib.define(schema_of(_op))
    for _key in ("CUDA", "CPU"):
        _lib.impl(_op, _implementation(_op), _key)

# What every namespace gets, and the autograd that the extension's ops have in C++. (The op
# modules by name: resnet_fast.ops exports functions of the same names.)
_batch_norm_act_op = importlib.import_module("resnet_fast.ops.batch_norm_act")
_bias_act_op = importlib.import_module("resnet_fast.ops.bias_act")
_zero_pad_shortcut_op = importlib.import_module("resnet_fast.ops.zero_pad_shortcut")
_norm_conv_op = importlib.import_module("resnet_fast.ops.norm_conv")
_batch_norm_act_op.register_fakes(NAMESPACE)
_batch_norm_act_op.register_double_backward(NAMESPACE)
_batch_norm_act_op.register_autograd(NAMESPACE)
_bias_act_op.register(NAMESPACE)
_zero_pad_shortcut_op.register_fakes(NAMESPACE)
_zero_pad_shortcut_op.register_double_backward(NAMESPACE)
_zero_pad_shortcut_op.register_autograd(NAMESPACE)
_norm_conv_op.register_fakes(NAMESPACE)
_norm_conv_op.register_autograd(NAMESPACE)

# The fused ops (those the README's table lists) that run here.
_backend._triton_loaded(tuple(op for op in LAUNCHERS if op in _backend.FUSED_OPS))

__all__ = ["LAUNCHERS", "NAMESPACE", "schema_of"]
