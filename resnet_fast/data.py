"""Datasets and the paper's data pipelines, shared by ``resnet_fast.train`` and ``resnet_fast.evaluate``.

Images travel as uint8 tensors (N, 3, H, W) until the batch reaches the device, where
:class:`Normalizer` turns them into floats (``x / 255``, minus the per-pixel mean image of the
training set). Every random choice of an epoch derives from ``(seed, epoch)`` and the position
of a sample in that epoch, never from a global random state: an epoch sees the same crops and
flips however many processes or workers share it, and a run resumed from a checkpoint sees the
same data as the run that wrote it.

- digits: scikit-learn's bundled handwritten digits, resized to 32x32 RGB (no download).
- cifar10: the standard python batches (``cifar-10-batches-py``).
- imagefolder: ``train/`` and ``val/`` class folders (the ImageNet layout).
"""

from __future__ import annotations

import math
import os
import pickle
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("digits", "cifar10", "imagefolder")
CIFAR_FOLDER = "cifar-10-batches-py"
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0  # the test split is fixed, whatever the training seed


class DataError(ValueError):
    """The data is missing or not laid out as expected (the command line turns it into exit code 2)."""


@dataclass
class TensorSet:
    """Images held in memory: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> "TensorSet":
        return TensorSet(self.images[index], self.labels[index], self.classes)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def load_digits(size: int = 32) -> tuple[TensorSet, TensorSet]:
    """scikit-learn's 1797 8x8 grey digits (values 0..16), resized to ``size`` x ``size`` RGB
    uint8; a fixed stratified quarter is the test split. Returns (train, test)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    grey = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    big = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    g = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):  # stratified: the same fraction of every digit
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(len(idx) * DIGITS_TEST_FRACTION)]] = True
    classes = [str(c) for c in range(10)]
    whole = TensorSet(images, labels, classes)
    return whole.subset(~test_mask), whole.subset(test_mask)


def find_cifar10(data_dir: str) -> str:
    """The folder that holds the CIFAR-10 python batches: ``data_dir`` itself or its
    ``cifar-10-batches-py`` (torchvision's root)."""
    if not data_dir:
        raise DataError("--dataset cifar10 needs --data-dir: the folder that holds cifar-10-batches-py")
    if not os.path.isdir(data_dir):
        raise DataError(f"data dir {data_dir!r} does not exist")
    for folder in (os.path.join(data_dir, CIFAR_FOLDER), data_dir):
        if os.path.isfile(os.path.join(folder, "data_batch_1")):
            return folder
    raise DataError(
        f"no CIFAR-10 python batches in {data_dir!r}: expected {CIFAR_FOLDER}/data_batch_1..5 and test_batch "
        "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted)"
    )


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file {path!r} is missing")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise DataError(f"CIFAR-10 file {path!r} is not a python pickle batch: {exc}") from exc
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR-10 file {path!r} holds a {type(entry).__name__}, expected a dict")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or ("labels" not in entry and "fine_labels" not in entry):
        raise DataError(f"CIFAR-10 file {path!r} has no 'data' and 'labels' entries (keys: {sorted(entry)})")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"CIFAR-10 file {path!r}: expected uint8 data of shape (N, 3072) and N labels, "
            f"got {data.dtype} {data.shape} and {len(labels)} labels"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(data_dir: str) -> tuple[TensorSet, TensorSet]:
    """The 50k training and 10k test images of CIFAR-10 from the python batches. Returns (train, test)."""
    folder = find_cifar10(data_dir)
    classes = [str(i) for i in range(10)]
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="latin1").get("label_names")
            if names and len(names) == 10:
                classes = [str(n) for n in names]
        except Exception as exc:
            raise DataError(f"CIFAR-10 file {meta!r} is unreadable: {exc}") from exc
    parts = [_read_cifar_batch(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
    test = _read_cifar_batch(os.path.join(folder, "test_batch"))

    def to_set(data: np.ndarray, labels: np.ndarray) -> TensorSet:
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"CIFAR-10 labels must lie in 0..9, got {labels.min()}..{labels.max()}")
        return TensorSet(torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels), classes)

    return (
        to_set(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])),
        to_set(*test),
    )


def split_validation(train: TensorSet, val_size: int, seed: int = 0) -> tuple[TensorSet, TensorSet | None]:
    """Holds ``val_size`` random training images out (the paper's 45k/5k split of CIFAR-10)."""
    if val_size <= 0:
        return train, None
    if val_size >= len(train):
        raise DataError(f"--val-size {val_size} leaves no training images (the training set has {len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[val_size:].sort().values), train.subset(perm[:val_size].sort().values)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_image_folders(data_dir: str) -> tuple[str, str, list[str]]:
    """Checks the ImageNet layout: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` with the same classes."""
    if not data_dir:
        raise DataError("--dataset imagefolder needs --data-dir: a folder with train/ and val/ class folders")
    if not os.path.isdir(data_dir):
        raise DataError(f"data dir {data_dir!r} does not exist")
    found = {}
    for split in ("train", "val"):
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise DataError(f"{data_dir!r} has no {split}/ folder; expected {split}/<class name>/<image files>")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise DataError(f"{root!r} holds no class folders; expected {split}/<class name>/<image files>")
        found[split] = classes
    if found["train"] != found["val"]:
        only_train = sorted(set(found["train"]) - set(found["val"]))[:5]
        only_val = sorted(set(found["val"]) - set(found["train"]))[:5]
        raise DataError(
            f"train/ and val/ of {data_dir!r} have different classes (only in train: {only_train}, only in val: {only_val})"
        )
    return os.path.join(data_dir, "train"), os.path.join(data_dir, "val"), found["train"]


class ImageFiles(torch.utils.data.Dataset):
    """The image files of a class-folder tree. ``transform(pil_image, rng)`` gets a
    ``random.Random`` seeded from ``(seed, epoch, index)``: indices come from :class:`EpochSampler`
    as ``(index, epoch)`` pairs, so workers need no shared state to be deterministic."""

    def __init__(self, root: str, classes: list[str], transform, seed: int = 0) -> None:
        self.classes = classes
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
                for fname in sorted(files):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, fname), label))
        if not self.samples:
            raise DataError(f"{root!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        rng = random.Random(sample_seed(self.seed, epoch, index))
        image = open_rgb(path)
        out = self.transform(image, rng)
        return (*out, label) if isinstance(out, tuple) else (out, label)


def open_rgb(path: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise DataError(f"cannot read image {path!r}: {exc}") from exc


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


# --------------------------------------------------------------------------------------------
# Which samples an epoch visits
# --------------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class EpochSampler(torch.utils.data.Sampler):
    """Batches of ``(index, epoch)`` for this process: a permutation drawn from ``(seed, epoch)``,
    cut into global batches of ``batch_size`` (the last incomplete one dropped), each shared out
    among ``world_size`` processes (rank r takes every world_size-th sample)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)).tolist()
        for b in range(len(self)):
            batch = perm[b * self.batch_size : (b + 1) * self.batch_size][self.rank :: self.world_size]
            yield [(i, self.epoch) for i in batch]


def shard(n: int, rank: int, world_size: int) -> range:
    """The samples of an evaluation that process ``rank`` scores (each exactly once overall)."""
    return range(rank, n, world_size)


# --------------------------------------------------------------------------------------------
# Normalisation and the CIFAR augmentation (on batches, on the device)
# --------------------------------------------------------------------------------------------


class Normalizer:
    """``(x / 255 - mean) / std`` for uint8 batches. ``mean`` is (3, H, W) (the paper's per-pixel
    mean image) or (3, 1, 1) (a per-channel mean, e.g. torchvision's weights); a mean image meets
    views of another size resized to them (multi-scale testing feeds whole images)."""

    def __init__(self, mean: Tensor, std: Tensor | None = None) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if mean.dim() == 1:
            mean = mean.view(-1, 1, 1)
        if mean.dim() != 3 or mean.shape[0] != 3:
            raise ValueError(f"the mean must have shape (3,), (3, 1, 1) or (3, H, W), got {tuple(mean.shape)}")
        std = torch.ones(3, 1, 1) if std is None else torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.mean, self.std = mean, std
        self._cache: dict = {}

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        if not isinstance(state, dict) or "mean" not in state:
            raise ValueError("the checkpoint has no normalisation (a 'mean' entry)")
        return cls(state["mean"], state.get("std"))

    def mean_for(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (h, w, str(device))
        if key not in self._cache:
            mean = self.mean
            if mean.shape[1:] != (1, 1) and mean.shape[1:] != (h, w):
                mean = F.interpolate(mean[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
            self._cache[key] = (mean.to(device), self.std.to(device))
        return self._cache[key]

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalizer expects uint8 images, got {images.dtype}")
        mean, std = self.mean_for(images.shape[-2], images.shape[-1], images.device)
        return (images.float().div_(255.0).sub_(mean)).div_(std)


def mean_image(images: Tensor) -> Tensor:
    """The per-pixel mean (3, H, W) of uint8 images, in [0, 1] units, accumulated in float64."""
    total = torch.zeros(images.shape[1:], dtype=torch.float64)
    for chunk in images.split(4096):
        total += chunk.double().sum(0)
    return (total / (255.0 * len(images))).float()


def pixel_pca(images: Tensor, max_pixels: int = 2_000_000) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the RGB covariance of the pixels of
    uint8 images, in [0, 1] units: what AlexNet's PCA lighting perturbs along."""
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1)
    if pixels.shape[1] > max_pixels:
        step = math.ceil(pixels.shape[1] / max_pixels)
        pixels = pixels[:, ::step]
    pixels = pixels.double() / 255.0
    cov = torch.cov(pixels)
    eigval, eigvec = torch.linalg.eigh(cov)
    order = eigval.argsort(descending=True)
    return eigval[order].clamp_min(0).float(), eigvec[:, order].float()


def lighting(x: Tensor, alpha: Tensor, eigval: Tensor, eigvec: Tensor) -> Tensor:
    """AlexNet's colour augmentation: adds ``eigvec @ (alpha * eigval)`` to every pixel of each
    image. ``x`` (N, 3, H, W) float in [0, 1] units; ``alpha`` (N, 3), drawn from N(0, 0.1)."""
    shift = (alpha.to(x.device) * eigval.to(x.device)) @ eigvec.to(x.device).T  # (N, 3)
    return x + shift[:, :, None, None].to(x.dtype)


@dataclass
class CropFlip:
    """The CIFAR augmentation of one epoch (section 4.2): for sample position p of the epoch's
    permutation, the top-left corner ``(dy[p], dx[p])`` in [0, 2 * pad] of a crop from the
    zero-padded image, and whether it is flipped horizontally."""

    dy: Tensor
    dx: Tensor
    flip: Tensor

    @classmethod
    def draw(cls, n: int, pad: int, generator: torch.Generator) -> "CropFlip":
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        return cls(dy, dx, flip)


def pad_crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int) -> Tensor:
    """``x`` (N, C, H, W) padded with ``pad`` zeros on each side, the H x W crop at (dy, dx) taken
    from each image, flipped where ``flip``: the paper's CIFAR augmentation, for a whole batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = dy.to(dev)[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols) + dx.to(dev)[:, None]  # (N, W)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# ImageNet views (PIL images in, uint8 tensors out)
# --------------------------------------------------------------------------------------------


def to_uint8(image) -> Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(image)


class ScaleCropFlip:
    """Section 3.4: the shorter side resized to a uniform integer in [scale_min, scale_max], a
    random crop_size square, flipped with probability 1/2; also the three N(0, 0.1) lighting
    coefficients of this sample (applied on the batch by :func:`lighting`)."""

    def __init__(self, crop_size: int, scale_min: int, scale_max: int, lighting_std: float = 0.1) -> None:
        self.crop_size, self.scale_min, self.scale_max, self.lighting_std = crop_size, scale_min, scale_max, lighting_std

    def __call__(self, image, rng: random.Random):
        from torchvision.transforms.v2 import functional as TF

        side = rng.randint(self.scale_min, self.scale_max)
        image = TF.resize(image, side, antialias=True)
        w, h = image.size
        if h < self.crop_size or w < self.crop_size:
            image = TF.resize(image, self.crop_size, antialias=True)
            w, h = image.size
        top, left = rng.randint(0, h - self.crop_size), rng.randint(0, w - self.crop_size)
        image = TF.crop(image, top, left, self.crop_size, self.crop_size)
        if rng.random() < 0.5:
            image = TF.horizontal_flip(image)
        alpha = torch.tensor([rng.gauss(0.0, self.lighting_std) for _ in range(3)])
        return to_uint8(image), alpha


class ResizeCenterCrop:
    """The single test view: the shorter side resized to ``resize_size``, the centre
    ``crop_size`` square (either may be None: keep the image as it is)."""

    def __init__(self, resize_size: int | None, crop_size: int | None) -> None:
        self.resize_size, self.crop_size = resize_size, crop_size

    def __call__(self, image, rng: random.Random | None = None) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        if self.resize_size:
            image = TF.resize(image, self.resize_size, antialias=True)
        if self.crop_size:
            image = TF.center_crop(image, self.crop_size)
        return to_uint8(image)


def resize_tensor(images: Tensor, resize_size: int | None, crop_size: int | None) -> Tensor:
    """:class:`ResizeCenterCrop` for a uint8 batch already in memory (CIFAR, digits)."""
    if resize_size and min(images.shape[-2:]) != resize_size:
        from torchvision.transforms.v2 import functional as TF

        images = TF.resize(images, resize_size, antialias=True)
    if crop_size and tuple(images.shape[-2:]) != (crop_size, crop_size):
        from torchvision.transforms.v2 import functional as TF

        images = TF.center_crop(images, crop_size)
    return images
