"""The GPU case on paper: a memory-traffic model of the fused ops in a ResNet-50 step.

    python bench/traffic.py [--arch resnet50] [--batch 256] [--image 224]

BatchNorm, the residual add and ReLU do a handful of flops per element, so on a GPU their time
is the bytes they move divided by the memory bandwidth. For every BatchNorm of the network this
counts the bytes eager PyTorch moves (one kernel per op: BN, add, ReLU, and their backward) and
the bytes of our fused kernels, and turns them into time at a stated bandwidth.

Assumptions (per BatchNorm site with E = N*C*H*W elements of b bytes):
- Eager training: BN forward reads x twice (statistics, then normalise) and writes y (3E); the
  add reads two tensors and writes one (3E); ReLU in place reads and writes (2E). Backward: ReLU
  reads the gradient and its output, writes a gradient (3E); the add passes the gradient on (0);
  BN reads dy and x for its sums, then dy and x again to write dx (5E).
- Fused training (resnet_fast): forward reads x for the statistics, then x (+ the residual) to
  write y: 3E (+1E). Backward reads dy, y and x for the sums (writing dz when the residual needs
  it), then dy, y, x (or dz, x) to write dx: 7E with ReLU, 5E without.
- Inference: eager runs BN (2E), add (3E), ReLU (2E) after the convolution; fused folds BN into
  the convolution and runs one epilogue reading the convolution's output (+ the residual) and
  writing y: 2E (+1E).
- Per-channel vectors, the convolutions themselves, and caches are not counted; every pass is
  assumed to stream from DRAM at the full bandwidth (an upper bound on what either side reaches).
  Bandwidths: H100 SXM 3.35 TB/s, A100 80GB 2.0 TB/s.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

BANDWIDTH = {"H100 SXM (3.35 TB/s)": 3.35e12, "A100 80GB (2.0 TB/s)": 2.0e12}


@dataclass
class Site:
    name: str
    elements: int
    relu: bool
    residual: bool

    @property
    def kind(self) -> str:
        if self.residual:
            return "BN + add + ReLU (block end)"
        return "BN + ReLU" if self.relu else "BN (projection shortcut)"


def passes(site: Site, training: bool, fused: bool) -> int:
    """Tensor passes (reads + writes of E elements) of one site; see the module docstring."""
    if not training:
        if fused:
            return 2 + site.residual
        return 2 + 3 * site.residual + 2 * site.relu
    if fused:
        forward = 3 + site.residual
        backward = 7 if (site.relu or site.residual) else 5
        return forward + backward
    forward = 3 + 3 * site.residual + 2 * site.relu
    backward = 5 + 3 * site.relu
    return forward + backward


def sites_of(arch: str, batch: int, image: int) -> list[Site]:
    """Every BatchNorm of a resnet_fast model with its output size at this batch and image size,
    and whether a residual add and a ReLU follow it (from the module structure)."""
    import resnet_fast
    from resnet_fast.nn.blocks import BasicBlock, Bottleneck

    with resnet_fast.use_backend("eager"):
        model = resnet_fast.get_model(arch).eval()
        ends, projections = set(), set()
        for m in model.modules():
            if isinstance(m, Bottleneck):
                ends.add(m.bn3)
            elif isinstance(m, BasicBlock):
                ends.add(m.bn2)
            if isinstance(m, (BasicBlock, Bottleneck)) and isinstance(m.downsample, nn.Sequential):
                projections.update(x for x in m.downsample if isinstance(x, nn.BatchNorm2d))
        found: list[Site] = []
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                def hook(mod, inputs, output, name=name):
                    found.append(Site(name, output[0].numel() * batch, mod not in projections, mod in ends))

                hooks.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.zeros(1, 3, image, image))
        for h in hooks:
            h.remove()
    return found


def table(arch: str = "resnet50", batch: int = 256, image: int = 224) -> str:
    """The model's tables (markdown): bytes per kind of site, and the time they imply."""
    sites = sites_of(arch, batch, image)
    lines = [f"Memory-traffic model, {arch}, batch {batch}, {image}x{image} (bench/traffic.py; assumptions in its docstring)", ""]
    for training in (True, False):
        what = "training step (forward + backward)" if training else "inference"
        lines += [f"**{what}**", "", "| sites | count | eager GB (fp32) | fused GB (fp32) | saved |", "|---|---|---|---|---|"]
        kinds: dict[str, list[Site]] = {}
        for s in sites:
            kinds.setdefault(s.kind, []).append(s)
        tot_e = tot_f = 0
        for kind, group in kinds.items():
            e = sum(passes(s, training, False) * s.elements * 4 for s in group)
            f = sum(passes(s, training, True) * s.elements * 4 for s in group)
            tot_e, tot_f = tot_e + e, tot_f + f
            lines.append(f"| {kind} | {len(group)} | {e / 1e9:.2f} | {f / 1e9:.2f} | {1 - f / e:.0%} |")
        lines.append(f"| **all** | {len(sites)} | {tot_e / 1e9:.2f} | {tot_f / 1e9:.2f} | {1 - tot_f / tot_e:.0%} |")
        lines += ["", "| GPU | dtype | eager ms | fused ms | saved ms per step |", "|---|---|---|---|---|"]
        for gpu, bw in BANDWIDTH.items():
            for dtype, size in (("fp32", 4), ("bf16 (AMP)", 2)):
                e_ms, f_ms = tot_e * size / 4 / bw * 1e3, tot_f * size / 4 / bw * 1e3
                lines.append(f"| {gpu} | {dtype} | {e_ms:.1f} | {f_ms:.1f} | {e_ms - f_ms:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image", type=int, default=224)
    args = p.parse_args(argv)
    print(table(args.arch, args.batch, args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
