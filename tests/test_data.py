"""The data pipelines of resnet_fast.train / evaluate: loaders, splits, sampling, augmentation."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet_fast import data as D


# ------------------------------------------------------------------ helpers shared with test_train


def write_cifar10(root: str, per_batch: int = 20, seed: int = 0) -> np.ndarray:
    """A small CIFAR-10 in the real file format (python 2-style pickles of dicts with 'data' as
    uint8 (N, 3072), rows R-plane then G then B, and 'labels'). Returns the training data."""
    folder = os.path.join(root, D.CIFAR_FOLDER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = []
    for i in range(1, 7):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        name = "test_batch" if i == 6 else f"data_batch_{i}"
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [f"{j}.png" for j in range(per_batch)]}, f, protocol=2)
        if i < 6:
            train.append((data, labels))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return np.concatenate([d for d, _ in train])


def write_image_folder(root: str, classes=("cat", "dog"), per_class: int = 4, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                h, w = int(rng.integers(60, 100)), int(rng.integers(60, 100))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                pixels[..., c] = 255 - pixels[..., c] // 4  # a class cue: one bright channel
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


# ------------------------------------------------------------------ datasets


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = D.load_digits()
    assert train.images.shape == (1347, 3, 32, 32) and test.images.shape == (450, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey in RGB
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # a quarter of each digit (~180 each)
    again_train, again_test = D.load_digits()
    assert torch.equal(test.images, again_test.images) and torch.equal(train.labels, again_train.labels)
    flat = lambda s: {bytes(im.numpy().tobytes()) + bytes([int(l)]) for im, l in zip(s.images, s.labels)}
    assert len(flat(train) & flat(test)) <= 5  # sklearn's digits hold a few exact duplicates


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_reads_the_python_batches(tmp_path, point_at_folder):
    data = write_cifar10(str(tmp_path))
    root = os.path.join(tmp_path, D.CIFAR_FOLDER) if point_at_folder else str(tmp_path)
    train, test = D.load_cifar10(root)
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major.
    assert train.images[7, 1, 3, 5] == data[7, 1024 + 3 * 32 + 5]
    assert train.images[42, 2, 31, 0] == data[42, 2048 + 31 * 32]
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"


def test_cifar10_bad_layouts_say_what_was_expected(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_cifar10(str(tmp_path / "nope"))
    with pytest.raises(D.DataError, match="data_batch_1"):
        D.load_cifar10(str(tmp_path))
    write_cifar10(str(tmp_path))
    os.remove(tmp_path / D.CIFAR_FOLDER / "test_batch")
    with pytest.raises(D.DataError, match="test_batch.*missing"):
        D.load_cifar10(str(tmp_path))
    with open(tmp_path / D.CIFAR_FOLDER / "test_batch", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(D.DataError, match="not a python pickle"):
        D.load_cifar10(str(tmp_path))
    with open(tmp_path / D.CIFAR_FOLDER / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(D.DataError, match=r"\(N, 3072\)"):
        D.load_cifar10(str(tmp_path))


def test_validation_split():
    train, _ = D.load_digits()
    part, val = D.split_validation(train, 300, seed=1)
    assert len(part) == 1047 and len(val) == 300
    again, val2 = D.split_validation(train, 300, seed=1)
    assert torch.equal(val.images, val2.images)
    assert D.split_validation(train, 0)[1] is None
    with pytest.raises(D.DataError, match="leaves no training images"):
        D.split_validation(train, 5000)


def test_image_folder_layout_errors(tmp_path):
    write_image_folder(str(tmp_path))
    train_dir, val_dir, classes = D.find_image_folders(str(tmp_path))
    assert classes == ["cat", "dog"]
    files = D.ImageFiles(train_dir, classes, D.ResizeCenterCrop(64, 48))
    image, label = files[5]
    assert image.shape == (3, 48, 48) and image.dtype == torch.uint8 and label == 1
    os.makedirs(tmp_path / "val" / "emu")
    with pytest.raises(D.DataError, match="different classes"):
        D.find_image_folders(str(tmp_path))
    os.rename(tmp_path / "val", tmp_path / "validation")
    with pytest.raises(D.DataError, match="no val/ folder"):
        D.find_image_folders(str(tmp_path))
    empty = tmp_path / "empty"
    os.makedirs(empty / "train")
    os.makedirs(empty / "val")
    with pytest.raises(D.DataError, match="no class folders"):
        D.find_image_folders(str(empty))


# ------------------------------------------------------------------ sampling


def test_epoch_sampler_visits_each_sample_once_and_shards_the_global_batch():
    s = D.EpochSampler(103, 10, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 10  # the incomplete last batch is dropped
    seen = [i for b in batches for i, e in b]
    assert len(set(seen)) == 100 and all(e == 0 for b in batches for _, e in b)
    s.epoch = 1
    assert [i for b in s for i, _ in b] != seen  # a new order each epoch
    s.epoch = 0
    assert list(s) == batches  # ... and the same one for the same epoch
    ranks = [D.EpochSampler(103, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    for b, b0, b1 in zip(batches, *ranks):
        assert len(b0) == len(b1) == 5 and sorted(b0 + b1) == sorted(b)


# ------------------------------------------------------------------ augmentation and normalisation


def test_pad_crop_flip_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 6, generator=g)
    aug = D.CropFlip.draw(16, 2, g)
    assert aug.dy.min() >= 0 and aug.dy.max() <= 4 and 0 < aug.flip.sum() < 16
    out = D.pad_crop_flip(x, aug.dy, aug.dx, aug.flip, 2)
    for n in range(16):
        ref = F.pad(x[n], (2, 2, 2, 2))[:, aug.dy[n] : aug.dy[n] + 8, aug.dx[n] : aug.dx[n] + 6]
        if aug.flip[n]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[n], ref, rtol=0, atol=0)


def test_mean_image_and_normalizer():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean = D.mean_image(images)
    torch.testing.assert_close(mean, images.double().mean(0).float() / 255)
    norm = D.Normalizer(mean)
    torch.testing.assert_close(norm(images), images.float() / 255 - mean)
    assert norm(images).mean(0).abs().max() < 1e-5  # per-pixel mean subtraction
    # A view of another size meets the mean image resized to it.
    big = torch.randint(0, 256, (2, 3, 16, 12), dtype=torch.uint8)
    resized = F.interpolate(mean[None], size=(16, 12), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(norm(big), big.float() / 255 - resized)
    std = D.Normalizer(torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.5]))
    torch.testing.assert_close(std(big), (big.float() / 255 - torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1))
    assert D.Normalizer.from_state_dict(norm.state_dict()).mean.equal(mean)
    with pytest.raises(TypeError, match="uint8"):
        norm(images.float())
    with pytest.raises(ValueError, match="mean must have shape"):
        D.Normalizer(torch.zeros(4, 2, 2))


def test_pixel_pca_and_lighting():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(20, 1, 16, 16, generator=g)
    rgb = torch.cat([base, 0.5 * base + 0.1 * torch.rand(20, 1, 16, 16, generator=g), torch.rand(20, 1, 16, 16, generator=g) * 0.2], 1)
    images = (rgb * 255).round().to(torch.uint8)
    eigval, eigvec = D.pixel_pca(images)
    assert eigval[0] >= eigval[1] >= eigval[2] >= 0
    cov = torch.cov(images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255).float()
    torch.testing.assert_close(eigvec @ torch.diag(eigval) @ eigvec.T, cov, atol=1e-5, rtol=1e-4)
    x = torch.zeros(2, 3, 4, 4)
    alpha = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0]])
    out = D.lighting(x, alpha, eigval, eigvec)
    torch.testing.assert_close(out[0, :, 1, 2], eigvec @ (alpha[0] * eigval))
    assert out[1].abs().max() == 0


def test_scale_crop_flip_is_a_crop_of_the_rescaled_image():
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    pixels = np.random.default_rng(0).integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    t = D.ScaleCropFlip(crop_size=32, scale_min=40, scale_max=48)
    out, alpha = t(image, random.Random(5))
    again, alpha2 = t(image, random.Random(5))
    assert out.shape == (3, 32, 32) and torch.equal(out, again) and torch.equal(alpha, alpha2)
    # Replay the draws: the output is one crop (maybe flipped) of the image resized to the drawn side.
    rng = random.Random(5)
    side = rng.randint(40, 48)
    big = D.to_uint8(TF.resize(image, side, antialias=True))
    top, left = rng.randint(0, big.shape[1] - 32), rng.randint(0, big.shape[2] - 32)
    crop = big[:, top : top + 32, left : left + 32]
    assert torch.equal(out, crop.flip(-1) if rng.random() < 0.5 else crop)
    sides = {random.Random(s).randint(40, 48) for s in range(200)}
    assert sides == set(range(40, 49))  # uniform over [scale_min, scale_max]
