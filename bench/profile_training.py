"""Where a CPU training step's time goes, op by op, forward / backward / optimiser apart.

    python bench/profile_training.py --arch resnet20 --batch 128
    python bench/profile_training.py --arch resnet20 --batch 128 --keep-activations

The step is the bench's (bench/test_models.py: SGD with momentum, cross-entropy, channels
stay as the model chooses). torch.profiler's self time of each op over a few steps after a
warm-up, per step in ms, grouped by the phase it ran in: the backward is everything under
autograd's engine, the optimiser its step. ``--keep-activations`` turns off
:data:`resnet_fast._routing.RECOMPUTE_CONV_INPUT` (each block's second 3x3 convolution keeps its
input) for a before/after. Run it on a quiet machine: it measures, it does not interleave.

The closing lines put the step's convolutions beside a floor: the multiply-adds of their three
passes (the forward, the input gradient, except the stem's, whose input needs none, and the
weight gradient; :func:`step_macs`), Winograd F(2x2, 3x3) where ``conv3x3_train``'s plan runs
the forward and the input gradient by it, at the rate our GEMM reaches in cache
(``profile_layers.gemm_rate``). A step cannot go below its floor plus what is not a convolution
without fewer multiplies.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import resnet_fast
from resnet_fast import _routing

import profile_layers

# The ops whose self time is a training step's convolutions (oneDNN's passes; our Winograd, direct
# kernel and weight gradient); everything else is "the rest".
CONV_OPS = (
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "resnet_fast::conv3x3_train",
    "resnet_fast::conv3x3_input_grad",
    "resnet_fast::conv3x3_weight_grad",
)
# Ops named for a convolution whose own time is not one: dispatch and autograd wrappers, and our
# ops that call ATen's convolution (profiled under its own name) and whose own time is their
# BatchNorm pass (conv_bn_act_train's forward and recomputation, conv1x1_train's recomputed input).
NOT_CONV_OPS = (
    "aten::conv2d",
    "aten::convolution",
    "aten::_convolution",
    "resnet_fast::conv_bn_act_train",
    "resnet_fast::conv1x1_train",
)


def names_a_convolution(name: str) -> bool:
    """Whether an op's name says it is one (tests/test_profile_training.py holds each such op seen
    in a step to CONV_OPS or NOT_CONV_OPS, so that a new one does not fall into the rest unseen)."""
    return name.startswith(("aten::", "resnet_fast::")) and "conv" in name


def phase_of(event) -> str:
    e = event
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if e.name == "optimizer step":
            return "optimizer"
        e = e.cpu_parent
    return "forward"


def step_macs(arch: str, x_shape) -> tuple[int, int]:
    """(the direct convolutions' multiply-adds, the multiplies run) of a training step of ``arch``
    on an input of ``x_shape``: each convolution's forward, input gradient (none for the first,
    whose input is the images) and weight gradient; the forward and a stride-1 input gradient by
    Winograd's 16 per 2x2 tile where :func:`resnet_fast._routing.conv3x3_train_plan` runs them so,
    and the weight gradient where that plan has ``weight_grad_winograd``."""
    with resnet_fast.use_backend("eager"):
        model = resnet_fast.get_model(arch)
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, i: shapes.append((m, tuple(i[0].shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with resnet_fast.use_backend("eager"), torch.no_grad():
        model(torch.randn(x_shape))
    for h in hooks:
        h.remove()
    direct = run = 0
    for i, (conv, shape) in enumerate(shapes):
        key = profile_layers.layer_key(shape, conv, False)
        d, tiled = profile_layers.layer_macs(key, shape[0], "winograd")
        winograd = wgrad_winograd = False
        if conv.kernel_size == (3, 3):
            with torch.enable_grad():
                weight = torch.empty(conv.weight.shape, requires_grad=True)
                plan = _routing.conv3x3_train_plan(torch.empty(shape), weight, conv.stride[0], "cpu")
            winograd = plan is not None and plan.winograd
            wgrad_winograd = plan is not None and plan.weight_grad_winograd
        direct += (3 if i > 0 else 2) * d
        run += tiled if winograd else d  # forward
        if i > 0:  # input gradient: a stride-1 convolution where the forward is one
            run += tiled if winograd and conv.stride[0] == 1 else d
        run += tiled if wgrad_winograd else d  # weight gradient
    return direct, run


def profile_step(model, x, y, steps: int) -> dict[str, collections.Counter]:
    """Each op's self time in ms per training step (SGD with momentum, cross-entropy), by phase,
    over ``steps`` steps after two of warm-up."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("optimizer step"):
            opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by_phase: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in prof.events():
        if e.name == "optimizer step":
            continue
        by_phase[phase_of(e)][e.name] += e.self_cpu_time_total / 1e3 / steps
    return by_phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--keep-activations", action="store_true")
    ap.add_argument("--top", type=int, default=12, help="ops listed per phase")
    args = ap.parse_args()
    _routing.RECOMPUTE_CONV_INPUT = not args.keep_activations
    torch.manual_seed(0)
    model = resnet_fast.get_model(args.arch)
    size = 32 if args.arch in resnet_fast.CIFAR_ARCHS else 224
    x = torch.randn(args.batch, 3, size, size)
    y = torch.randint(0, model.fc.out_features, (args.batch,))

    by_phase = profile_step(model, x, y, args.steps)
    total = sum(sum(c.values()) for c in by_phase.values())
    print(f"{args.arch} training step, batch {args.batch}, recompute {_routing.RECOMPUTE_CONV_INPUT}: "
          f"{total:.1f} ms of op self time per step ({torch.get_num_threads()} threads, torch {torch.__version__})")
    for phase in ("forward", "backward", "optimizer"):
        ops = by_phase.get(phase, collections.Counter())
        phase_ms = sum(ops.values())
        print(f"\n{phase}: {phase_ms:.1f} ms ({100 * phase_ms / total:.1f}%)")
        for name, ms in ops.most_common(args.top):
            print(f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {name}")
    conv_ms = sum(ms for ops in by_phase.values() for name, ms in ops.items() if name in CONV_OPS)
    direct, run = step_macs(args.arch, tuple(x.shape))
    rate = profile_layers.gemm_rate()
    floor_ms = 2 * run / rate / 1e6
    print(f"\nconvolutions: {direct / 1e9:.2f} G multiply-adds direct, {run / 1e9:.2f} G run (three passes); "
          f"{conv_ms:.1f} ms ({2 * run / conv_ms / 1e6:.0f} GFLOP/s of the run), the rest {total - conv_ms:.1f} ms")
    print(f"floor: the run multiply-adds at our GEMM's in-cache {rate:.0f} GFLOP/s take {floor_ms:.1f} ms; "
          f"with the rest as it is, {floor_ms + total - conv_ms:.1f} ms")


if __name__ == "__main__":
    main()
