"""``python -m resnet_fast.evaluate``: top-1 and top-5 error of a trained network, with the
paper's test views.

- single view (default): the shorter side resized to ``--resize-size``, the centre ``--crop-size``
  square (ImageNet: 256 and 224; the 32x32 CIFAR and digits images go in as they are);
- ``--ten-crop``: the four corners and the centre ``--crop-size`` crops and their horizontal flips,
  softmax scores averaged (section 3.4, "standard 10-crop testing");
- ``--scales 224,256,384,480,640``: the fully-convolutional multi-scale test: the shorter side
  resized to each scale, the whole image through the network, softmax scores averaged over the
  scales and both flips.

The model comes from a ``resnet_fast.train`` checkpoint (``--checkpoint``, which also carries the
mean image the network was trained with) or from torchvision's weights (``--weights IMAGENET1K_V1``
with ``--arch resnet50``, normalised as torchvision's weights expect).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as D
from ._cli import UsageError, exit_code, pick_device, write_json
from .checkpoint import Checkpoint
from .models import IMAGENET_ARCHS, get_model, list_models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------


def ten_crops(images: Tensor, crop: int) -> list[Tensor]:
    """The 10 views of section 3.4 for a batch (N, C, H, W): top-left, top-right, bottom-left,
    bottom-right and centre ``crop`` x ``crop`` crops, then the same five of the flipped batch
    (torchvision's ``ten_crop`` order)."""
    h, w = images.shape[-2:]
    if crop > h or crop > w:
        raise ValueError(f"a {crop}x{crop} crop does not fit a {h}x{w} image")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))  # torchvision's centre
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), (top, left)]
    flipped = images.flip(-1)
    return [im[..., i : i + crop, j : j + crop] for im in (images, flipped) for i, j in corners]


def scaled(images: Tensor, side: int) -> Tensor:
    """A uint8 batch with its shorter side resized to ``side`` (aspect ratio kept, antialiased)."""
    from torchvision.transforms.v2 import functional as TF

    if min(images.shape[-2:]) == side:
        return images
    return TF.resize(images, side, antialias=True)


def probabilities(model: nn.Module, views: Iterable[Tensor], normalizer: D.Normalizer, amp: bool = False) -> Tensor:
    """Softmax scores of ``model`` averaged over ``views`` (uint8 batches of the same images)."""
    total = None
    count = 0
    for v in views:
        x = normalizer(v)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and x.is_cuda):
            p = F.softmax(model(x).float(), dim=1)
        total = p if total is None else total + p
        count += 1
    return total / count


def make_predictor(mode: str, crop_size: int | None = None, scales: Sequence[int] = ()) -> Callable:
    """``predict(model, uint8 batch, normalizer) -> probabilities`` for ``mode`` in single,
    ten-crop, multi-scale."""
    if mode == "single":
        return lambda model, x, norm, amp=False: probabilities(model, [x], norm, amp)
    if mode == "ten-crop":

        def ten(model, x, norm, amp=False):
            return probabilities(model, ten_crops(x, crop_size or min(x.shape[-2:])), norm, amp)

        return ten
    if mode == "multi-scale":
        if not scales:
            raise ValueError("multi-scale testing needs at least one scale")

        def multi(model, x, norm, amp=False):
            views = []
            for s in scales:
                v = scaled(x, s)
                views += [v, v.flip(-1)]
            return probabilities(model, views, norm, amp)

        return multi
    raise ValueError(f"unknown test mode {mode!r}; expected single, ten-crop or multi-scale")


# --------------------------------------------------------------------------------------------
# Scoring a dataset
# --------------------------------------------------------------------------------------------


def count_errors(probs: Tensor, labels: Tensor, k: int = 5) -> tuple[int, int]:
    """(top-1 mistakes, top-k mistakes) of a batch; k is capped at the number of classes."""
    k = min(k, probs.shape[1])
    topk = probs.topk(k, dim=1).indices
    hit = topk == labels[:, None]
    return int((~hit[:, 0]).sum()), int((~hit.any(dim=1)).sum())


def tensor_batches(dataset: D.TensorSet, indices: Sequence[int], batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    index = torch.as_tensor(list(indices), dtype=torch.long)
    for chunk in index.split(batch_size):
        yield dataset.images[chunk], dataset.labels[chunk]


def stack_or_list(batch):
    """DataLoader collate: images of one size are stacked, images of different sizes stay a list."""
    images = [b[0] for b in batch]
    labels = torch.tensor([b[-1] for b in batch])
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), labels
    return images, labels


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[tuple[Tensor | list[Tensor], Tensor]],
    normalizer: D.Normalizer,
    predict: Callable,
    device: torch.device,
    amp: bool = False,
    progress: Callable | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 mistakes and count over ``batches`` (summed over processes when distributed)."""
    was_training = model.training
    model.eval()
    wrong1 = wrong5 = n = 0
    try:
        for images, labels in batches:
            labels = labels.to(device)
            if isinstance(images, list):  # whole images of different sizes: one at a time
                probs = torch.cat([predict(model, im[None].to(device), normalizer, amp) for im in images])
            else:
                probs = predict(model, images.to(device, non_blocking=True), normalizer, amp)
            w1, w5 = count_errors(probs, labels)
            wrong1, wrong5, n = wrong1 + w1, wrong5 + w5, n + len(labels)
            if progress is not None:
                progress(len(labels))
    finally:
        model.train(was_training)
    counts = torch.tensor([wrong1, wrong5, n], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        counts = counts.to(backend_device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    wrong1, wrong5, n = counts.tolist()
    if n == 0:
        raise ValueError("nothing to evaluate: the test set is empty")
    return {"top1_error": wrong1 / n, "top5_error": wrong5 / n, "images": int(n)}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet_fast.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", choices=list_models(), help="architecture (default: the checkpoint's)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a resnet_fast.train checkpoint (*.pt)")
    src.add_argument("--weights", help="torchvision weights for --arch, e.g. IMAGENET1K_V1 or DEFAULT")
    p.add_argument("--dataset", choices=D.DATASETS, default=None, help="default: the checkpoint's, or imagefolder")
    p.add_argument("--data-dir", default=None, help="cifar10: the folder holding cifar-10-batches-py; imagefolder: the folder holding val/")
    p.add_argument("--out", default=None, help="folder for metrics.json (default: print only)")
    p.add_argument("--resize-size", type=int, default=None, help="shorter side of the single view (ImageNet default 256)")
    p.add_argument("--crop-size", type=int, default=None, help="crop of the single and 10-crop views (ImageNet default 224)")
    views = p.add_mutually_exclusive_group()
    views.add_argument("--ten-crop", action="store_true", help="10-crop testing")
    views.add_argument("--scales", type=int_list, default=None, help="multi-scale testing, e.g. 224,256,384,480,640")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    return p


def test_batches(dataset: str, data_dir: str | None, resize_size, crop_size, whole_images: bool, batch_size: int,
                 workers: int, device: torch.device, rank: int = 0, world_size: int = 1, classes: int | None = None):
    """(number of test images, an iterable of uint8 batches and labels, class count) for a dataset's test split."""
    if dataset == "imagefolder":
        _, val_dir, names = D.find_image_folders(data_dir)
        view = D.ResizeCenterCrop(resize_size, None if whole_images else crop_size)
        files = D.ImageFiles(val_dir, names, view)
        subset = torch.utils.data.Subset(files, list(D.shard(len(files), rank, world_size)))
        loader = torch.utils.data.DataLoader(
            subset, batch_size=batch_size, num_workers=workers, collate_fn=stack_or_list,
            pin_memory=device.type == "cuda", persistent_workers=False,
        )
        return len(files), loader, len(names)
    _, test = D.load_digits() if dataset == "digits" else D.load_cifar10(data_dir)
    if resize_size or (crop_size and not whole_images):
        test = D.TensorSet(D.resize_tensor(test.images, resize_size, None if whole_images else crop_size), test.labels, test.classes)
    return len(test), tensor_batches(test, D.shard(len(test), rank, world_size), batch_size), len(test.classes)


def load_model(args: argparse.Namespace) -> tuple[nn.Module, D.Normalizer, str, str, int]:
    """(model, normalizer, arch, dataset, classes) from --checkpoint (which carries its mean image
    and dataset) or from --weights (normalised as torchvision's weights expect)."""
    if args.checkpoint:
        ckpt = Checkpoint.load(args.checkpoint)
        if args.arch and args.arch != ckpt.arch:
            raise UsageError(f"--arch {args.arch} does not match the checkpoint, which holds {ckpt.arch}")
        dataset = args.dataset or (ckpt.config or {}).get("dataset", "imagefolder")
        normalizer = D.Normalizer.from_state_dict(ckpt.normalizer)
        return ckpt.build_model(args.checkpoint), normalizer, ckpt.arch, dataset, int(ckpt.num_classes)
    if not args.arch:
        raise UsageError("--weights needs --arch (one of " + ", ".join(IMAGENET_ARCHS) + ")")
    try:
        model = get_model(args.arch, weights=args.weights)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    normalizer = D.Normalizer(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    return model, normalizer, args.arch, args.dataset or "imagefolder", model.fc.out_features


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    if args.amp and device.type != "cuda":
        raise UsageError("--amp needs a CUDA device")
    for name in ("resize_size", "crop_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")

    model, normalizer, arch, dataset, num_classes = load_model(args)
    imagenet_like = dataset == "imagefolder"
    resize_size = args.resize_size or (256 if imagenet_like else None)
    crop_size = args.crop_size or (224 if imagenet_like else None)
    if args.scales:
        mode, whole = "multi-scale", True
    elif args.ten_crop:
        mode, whole = "ten-crop", True
    else:
        mode, whole = "single", False
    predict = make_predictor(mode, crop_size, args.scales or ())

    n, batches, classes = test_batches(
        dataset, args.data_dir, resize_size, crop_size, whole, args.batch_size, args.workers, device,
    )
    if classes != num_classes:
        raise UsageError(f"the model has {num_classes} outputs but the {dataset} test set has {classes} classes")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=n, desc=f"{arch} {mode}", unit="img", disable=None, leave=False) as bar:
        result = score(model, batches, normalizer, predict, device, args.amp, progress=bar.update)
    elapsed = time.perf_counter() - t0
    views = {"single": 1, "ten-crop": 10, "multi-scale": 2 * len(args.scales or ())}[mode]
    metrics = {
        "top1_error": result["top1_error"],
        "top5_error": result["top5_error"],
        "images": result["images"],
        "arch": arch,
        "dataset": dataset,
        "test": mode,
        "views_per_image": views,
        "resize_size": resize_size,
        "crop_size": crop_size,
        "scales": args.scales,
        "source": args.checkpoint or f"torchvision {args.weights}",
        "seconds": round(elapsed, 2),
    }
    print(
        f"{arch} on {dataset} ({result['images']} images, {mode} test): "
        f"top-1 error {100 * result['top1_error']:.2f}%, top-5 error {100 * result['top5_error']:.2f}% "
        f"({elapsed:.1f} s)"
    )
    if args.out:
        path = os.path.join(args.out, "metrics.json")
        write_json(path, metrics)
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, "python -m resnet_fast.evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
