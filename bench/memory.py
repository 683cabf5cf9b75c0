"""Peak resident memory of training steps, measured in a fresh process per configuration.

Usage: python bench/memory.py {resnet_fast,eager_nchw,eager_channels_last} ARCH BATCH [SIZE]
Prints the peak growth in MiB of the process over 3 training steps (its high-water mark minus
its resident size just before the first step).
"""

import os
import sys

import torch

import resnet_fast


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def high_water_mib() -> float:
    """VmHWM, the peak resident size of this process's memory. (Not ru_maxrss: Linux carries that
    across exec, so a child of a large pytest process would start from the parent's size.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def main() -> None:
    mode, arch, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else (32 if arch in resnet_fast.CIFAR_ARCHS else 224)
    torch.manual_seed(0)
    if mode != "resnet_fast":
        resnet_fast.set_backend("eager")
    model = resnet_fast.get_model(arch)
    x = torch.randn(batch, 3, size, size)
    if mode == "eager_channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.fc.out_features, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reset_high_water()
    before = rss_mib()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    peak = high_water_mib()
    print(f"{peak - before:.1f}")


if __name__ == "__main__":
    main()
