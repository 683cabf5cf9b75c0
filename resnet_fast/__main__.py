"""``python -m resnet_fast``: an end-to-end check of this install.

Builds ResNet-50 next to torchvision's with the same weights and compares their outputs, then
trains the paper's CIFAR ResNet-20 for a few steps on a fixed random batch (the loss must
fall) and reports the throughput of each, with the backend and kernels that ran.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torchvision

import resnet_fast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_fast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="ResNet-20 training steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="ResNet-20 batch size (default 64)")
    parser.add_argument("--backend", default=None, help=f"one of {', '.join(resnet_fast.BACKENDS)}")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be at least 1 and --batch-size at least 2")
    if args.backend is not None:
        try:
            resnet_fast.set_backend(args.backend)
        except (ValueError, RuntimeError) as exc:
            parser.error(str(exc))

    torch.manual_seed(0)
    print(f"resnet_fast {resnet_fast.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"backend: {resnet_fast.get_backend()} (available: {', '.join(resnet_fast.available_backends())})")
    if resnet_fast.extension_available():
        kernels = {op: [d for d, built in v.items() if built] for op, v in resnet_fast.kernels().items()}
        print(f"extension: loaded; kernels: {kernels}")
    else:
        print(f"extension: NOT loaded ({resnet_fast.extension_error()}); running the eager formulas")

    # 1. Drop-in: same weights as torchvision, same outputs.
    tv = torchvision.models.resnet50().eval()
    ours = resnet_fast.ResNet50().eval()
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = ours(x)
        dt = time.perf_counter() - t0
        diff = (out - tv(x)).abs().max().item()
    print(f"ResNet-50 inference, batch 2: {2 / dt:.1f} img/s; max |resnet_fast - torchvision| = {diff:.2e}")

    # 2. Training: the loss of a fixed batch must fall.
    model = resnet_fast.resnet20()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    dt = time.perf_counter() - t0
    print(
        f"ResNet-20 training, batch {args.batch_size}: {args.steps * args.batch_size / dt:.0f} img/s; "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    ok = diff < 1e-3 and losses[-1] < losses[0]
    print("OK" if ok else "FAILED: outputs differ from torchvision or the loss did not fall")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
