"""A whole network's inference forward, planned: its ops recorded once, then replayed.

At batch 1 a forward of ResNet-50 on the CPU spends about 4 ms of its 50 in Python between the
kernels (module calls, the routing's questions, the folded-weight cache's checks; ResNet-18:
1.6 of 25 ms; 2-core Zen 4, 2026-12-02). ONNX Runtime and OpenVINO pay nothing of the kind: they
run a graph planned once. So does this module, without asking anything of the user:

* **Record.** The first inference forward of a model for an input of a given shape, layout and
  dtype runs as usual under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees
  every op it dispatches (the folded convolutions, pooling, the classifier). Each op's tensors are
  the input, an earlier op's output (a *slot*), or a *constant* (a folded weight, a bias, the
  classifier's weight). An op that reads no slot (the BatchNorm folding of a first call) is
  computed there and then, and its outputs become constants.
* **Replay.** Later forwards with the same input key run the recorded ops on the new input,
  each slot released after its last reader (the same peak memory as the unplanned forward),
  with no module call and no routing: the outputs are bitwise those of the unplanned forward,
  which is the same sequence of ops.
* **Stay exact.** A plan is used only while nothing it depends on has changed. Before each
  replay the model's tree is walked once (about 0.1 ms for ResNet-50): the identity, type and
  mode of every module, the identity and version (``Tensor._version``, bumped by any in-place
  change: an optimiser step, ``load_state_dict``, ``fill_``) of every parameter and buffer, and
  the plain attributes of every module (``eps``, ``stride``, ...); any difference records anew.
  A tree with a module of any other type (a user's module could do anything in Python), a hook
  anywhere, training mode, gradients, autocast, torch.compile or a capture in progress never plans
  (:func:`resnet_fast._routing.plans_forward` and :func:`_tree_fingerprint`). A recording that saw
  an op write into a constant, or one that returns a Python value (data-dependent control flow),
  is not kept.

Plans live in a weakly keyed table (they never travel with the model: pickle, deepcopy,
state_dict) and at most :data:`MAX_PLANS` input keys per model are kept.
"""

from __future__ import annotations

import operator
import time
import weakref
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _backend, _routing

MAX_PLANS = 8  # input keys (shape, layout, dtype, mode) per model

_PLANS: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()

# The module types whose inference forward is known to be a pure function of its tensors and of
# the attributes named here (compared before each replay): resnet_fast's own (registered where
# they are defined) and these of torch.nn.
KNOWN_MODULES: dict[type, operator.attrgetter | None] = {}


def register_module_type(*attributes: str):
    """A class decorator: ``cls``'s inference forward is a pure function of its parameters,
    buffers, submodules and these attributes (no Python side effects), so that a tree holding it
    may be planned."""

    def register(cls: type) -> type:
        KNOWN_MODULES[cls] = operator.attrgetter(*attributes) if attributes else None
        return cls

    return register


_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
for _cls, _attributes in (
    (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")),
    (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    (nn.ReLU, ("inplace",)),
    (nn.Linear, ("in_features", "out_features")),
    (nn.AdaptiveAvgPool2d, ("output_size",)),
    (nn.MaxPool2d, _POOL),
    (nn.Sequential, ()),
    (nn.Identity, ()),
):
    register_module_type(*_attributes)(_cls)


def _tree_fingerprint(model: nn.Module) -> tuple[list, list] | None:
    """What a plan of ``model`` depends on, as a list of plain values (ids, versions, modes,
    attributes), and the objects whose ids it holds (kept alive with the plan, so that no id can
    be reused by another object; the root is not kept: the plan table is keyed by it). None where
    the tree may not be planned: a module of an unknown type (an exact type: a subclass may do
    anything), a hook on any module, a forward patched onto an instance, or a parameter or buffer
    made under torch.inference_mode (it has no version counter: an in-place change to it could
    not be seen)."""
    try:
        return _walk(model)
    except RuntimeError:  # Tensor._version of an inference tensor
        return None


def _walk(model: nn.Module) -> tuple[list, list] | None:
    values: list = []
    keep: list = []
    stack = [model]
    known = KNOWN_MODULES
    while stack:
        mod = stack.pop()
        cls = type(mod)
        if cls not in known:
            return None
        d = mod.__dict__
        if _routing.has_hooks(mod):
            return None
        if "forward" in d:  # a forward patched onto the instance: the user's code
            return None
        if mod is not model:
            keep.append(mod)
        attributes = known[cls]
        # (len(d): an attribute added to the instance, such as a patched forward, changes it.)
        values += (id(mod), d["training"], len(d), attributes(mod) if attributes is not None else None)
        for group in (d["_parameters"], d["_buffers"]):
            values.append(len(group))
            for t in group.values():
                if t is None:
                    values.append(None)
                else:
                    keep.append(t)
                    values += (id(t), t._version)
        children = d["_modules"]
        values.append(len(children))
        for child in children.values():
            if child is None:
                values.append(None)
            else:
                stack.append(child)
    return values, keep


def _input_key(x: Tensor) -> tuple:
    return (
        tuple(x.shape), x.stride(), x.dtype, x.device, x.storage_offset(),
        torch.is_inference_mode_enabled(), _backend.get_backend(),
    )


class _Refused(Exception):
    """A recording that cannot become a plan (its reason in the message)."""


class _Recorder(TorchDispatchMode):
    """Sees the ops of one forward and turns them into steps over slots (see the module doc).
    Holds the intermediate tensors only weakly, so that the recorded forward frees them as the
    unplanned one does."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.produced: dict[int, tuple[weakref.ref, int]] = {}
        self.slots = 0
        self.steps: list[tuple] = []
        self.refused: str | None = None
        self._produce(x)

    def _produce(self, t: Tensor) -> int:
        index = self.slots
        self.slots += 1
        self.produced[id(t)] = (weakref.ref(t), index)
        return index

    def slot_of(self, t) -> int | None:
        if isinstance(t, Tensor):
            hit = self.produced.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.refused is None:
            try:
                self._record(func, args, kwargs, out)
            except _Refused as exc:
                self.refused = str(exc)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        outs, out_spec = tree_flatten(out)
        if any(not isinstance(o, Tensor) and o is not None for o in outs):
            raise _Refused(f"{func} returned a Python value (the forward may depend on tensor data)")
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                t = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name)
                if isinstance(t, Tensor) and self.slot_of(t) is None:
                    raise _Refused(f"{func} writes into a tensor that is not this forward's own")
        flat, spec = tree_flatten((args, kwargs))
        reads = {i: s for i, s in ((i, self.slot_of(a)) for i, a in enumerate(flat)) if s is not None}
        if not reads:
            return  # reads constants only: its outputs are constants (e.g. a first call's folding)
        top = [(p, s) for p, s in ((p, self.slot_of(a)) for p, a in enumerate(args)) if s is not None]
        # Most ops take their tensors as top-level positional arguments: those are filled in
        # place at replay, without rebuilding the argument tree.
        fast = list(args) if len(top) == len(reads) else None
        if fast is not None:
            for p, _ in top:
                fast[p] = None
        template = [None if i in reads else a for i, a in enumerate(flat)]
        out_slots = [self._produce(o) if isinstance(o, Tensor) else None for o in outs]
        single = out_slots[0] if out_spec.is_leaf() else None
        self.steps.append((func, template, spec, reads, fast, kwargs if fast is not None else None, top,
                           out_slots, single))


class Plan:
    """The recorded ops of one forward, as steps over slots (slot 0: the input)."""

    def __init__(self, steps: list[tuple], slots: int, output: int, fingerprint: list, keep: list) -> None:
        self.fingerprint = fingerprint
        self._keep = keep
        last_read = {0: -1}
        for i, step in enumerate(steps):
            for s in step[3].values():
                last_read[s] = i
        frees: list[list[int]] = [[] for _ in steps]
        for s, i in last_read.items():
            if s != output and i >= 0:
                frees[i].append(s)
        self._slots = slots
        self._output = output
        self._steps = [step + (free,) for step, free in zip(steps, frees)]

    def __call__(self, x: Tensor, times: list | None = None) -> Tensor:
        """The recorded forward on ``x``; where ``times`` is given, each step's (op, seconds) is
        appended to it (bench/profile_layers.py: the layers' times in what ``model(x)`` runs)."""
        env: list = [None] * self._slots
        env[0] = x
        for func, template, spec, reads, fast, kwargs, top, out_slots, single, free in self._steps:
            if times is not None:
                t0 = time.perf_counter()
            if fast is not None:
                a = list(fast)
                for p, s in top:
                    a[p] = env[s]
                out = func(*a, **kwargs)
            else:
                flat = list(template)
                for i, s in reads.items():
                    flat[i] = env[s]
                a, k = tree_unflatten(flat, spec)
                out = func(*a, **k)
            if single is not None:
                env[single] = out
            else:
                for s, o in zip(out_slots, tree_flatten(out)[0]):
                    if s is not None:
                        env[s] = o
            for s in free:
                env[s] = None
            if times is not None:
                times.append((func, time.perf_counter() - t0))
        return env[self._output]


def forward(model: nn.Module, x: Tensor, fn) -> Tensor:
    """``fn(x)`` (the model's fused forward), by its plan where one applies (see the module doc)."""
    if not _routing.plans_forward(model, x):
        return fn(x)
    tree = _tree_fingerprint(model)
    if tree is None:
        _PLANS.pop(model, None)  # (stale, and holding their constants)
        return fn(x)
    fingerprint, keep = tree
    key = _input_key(x)
    plans = _PLANS.get(model)
    if plans is not None:
        plan = plans.get(key)
        if plan is not None:
            if plan.fingerprint == fingerprint:
                plans.move_to_end(key)
                return plan(x)
            plans.clear()  # the model changed: every plan of it is stale
    if torch.autograd._profiler_enabled():
        # (The recorder's re-dispatch of each op would show every op twice in the profile; a
        # plan recorded before profiling is replayed under it, with the same ops.)
        return fn(x)
    recorder = _Recorder(x)
    with recorder:
        y = fn(x)
    output = recorder.slot_of(y)
    if recorder.refused is None and output is not None:
        # (The fingerprint again: the recorded forward may have changed what it depends on.)
        after = _tree_fingerprint(model)
        if after is not None and after[0] == fingerprint:
            plans = _PLANS.setdefault(model, OrderedDict())
            plans[key] = Plan(recorder.steps, recorder.slots, output, fingerprint, keep)
            while len(plans) > MAX_PLANS:
                plans.popitem(last=False)
    return y


def plan_of(model: nn.Module, x: Tensor) -> Plan | None:
    """The plan ``model(x)`` would replay now, if it has one (for diagnostics)."""
    tree = _tree_fingerprint(model) if _routing.plans_forward(model, x) else None
    plan = _PLANS.get(model, {}).get(_input_key(x)) if tree is not None else None
    return plan if plan is not None and plan.fingerprint == tree[0] else None


def plans_of(model: nn.Module) -> int:
    """How many input keys ``model`` has a plan for (for tests and diagnostics)."""
    return len(_PLANS.get(model, ()))
