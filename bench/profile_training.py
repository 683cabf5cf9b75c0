"""Where a CPU training step's time goes, op by op, forward / backward / optimiser apart.

    python bench/profile_training.py --arch resnet20 --batch 128
    python bench/profile_training.py --arch resnet20 --batch 128 --keep-activations

The step is the bench's (bench/test_models.py: SGD with momentum, cross-entropy, channels
stay as the model chooses). torch.profiler's self time of each op over a few steps after a
warm-up, per step in ms, grouped by the phase it ran in: the backward is everything under
autograd's engine, the optimiser its step. ``--keep-activations`` turns off
:data:`resnet_fast._routing.RECOMPUTE_CONV_INPUT` (each block's second 3x3 convolution keeps its
input) for a before/after. Run it on a quiet machine: it measures, it does not interleave.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import resnet_fast
from resnet_fast import _routing


def phase_of(event) -> str:
    e = event
    while e is not None:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if e.name == "optimizer step":
            return "optimizer"
        e = e.cpu_parent
    return "forward"


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
        for _ in range(args.steps):
            step()
    by_phase: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in prof.events():
        if e.name == "optimizer step":
            continue
        by_phase[phase_of(e)][e.name] += e.self_cpu_time_total / 1e3 / args.steps  # ms per step
    total = sum(sum(c.values()) for c in by_phase.values())
    print(f"{args.arch} training step, batch {args.batch}, recompute {_routing.RECOMPUTE_CONV_INPUT}: "
          f"{total:.1f} ms of op self time per step ({torch.get_num_threads()} threads, torch {torch.__version__})")
    for phase in ("forward", "backward", "optimizer"):
        ops = by_phase.get(phase, collections.Counter())
        phase_ms = sum(ops.values())
        print(f"\n{phase}: {phase_ms:.1f} ms ({100 * phase_ms / total:.1f}%)")
        for name, ms in ops.most_common(args.top):
            print(f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
