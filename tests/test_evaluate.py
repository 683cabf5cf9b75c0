"""python -m resnet_fast.evaluate: the paper's test views against direct computations, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import resnet_fast
from resnet_fast import data as D
from resnet_fast import evaluate as E
from resnet_fast import train as T

from .test_data import write_image_folder
from .test_train import SHORT, exit_code_and_stderr, run_cli


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = resnet_fast.resnet20(num_classes=10).eval()
    # Train-mode BN statistics of random weights are degenerate; make the scores depend on the input.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.fill_(0.5)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_ten_crops_are_torchvisions_ten_crop(images):
    ours = E.ten_crops(images, 28)
    theirs = TF.ten_crop(images, [28, 28])
    assert len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not fit"):
        E.ten_crops(images, 41)


def test_ten_crop_scores_are_the_mean_softmax_of_the_ten_views(model, images):
    norm = D.Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25))
    got = E.make_predictor("ten-crop", 28)(model, images, norm)
    views = []
    for top, left in ((0, 0), (0, 8), (12, 0), (12, 8), (6, 4)):
        crop = images[:, :, top : top + 28, left : left + 28]
        views += [crop, crop.flip(-1)]  # the flip of a crop is the mirrored crop of the flipped image
    with torch.no_grad():
        direct = torch.stack([F.softmax(model((v.float() / 255 - 0.5) / 0.25), 1) for v in views]).mean(0)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)
    assert got.sum(1).sub(1).abs().max() < 1e-5


def test_multi_scale_scores_average_whole_images_over_scales_and_flips(model, images):
    norm = D.Normalizer(torch.full((3,), 0.4))
    got = E.make_predictor("multi-scale", scales=(32, 48))(model, images, norm)
    probs = []
    with torch.no_grad():
        for side in (32, 48):
            h, w = images.shape[-2:]
            size = (int(side * h / w), side) if w < h else (side, int(side * w / h))
            v = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            v = v.round().clamp(0, 255).to(torch.uint8)
            assert min(v.shape[-2:]) == side  # the shorter side at the scale, aspect ratio kept
            for view in (v, v.flip(-1)):
                probs.append(F.softmax(model(view.float() / 255 - 0.4), 1))
    torch.testing.assert_close(got, torch.stack(probs).mean(0), rtol=1e-4, atol=1e-4)


def test_count_errors():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert E.count_errors(probs, labels, k=1) == (2, 2)
    assert E.count_errors(probs, labels, k=2) == (2, 1)
    assert E.count_errors(probs, labels) == (2, 0)  # k capped at the 3 classes


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "run")
    assert T.main(SHORT + ["--iterations", "10", "--out", out]) == 0
    return out


def test_evaluate_reproduces_the_training_runs_test_error(digits_run, tmp_path, capsys):
    ckpt = os.path.join(digits_run, "checkpoint.pt")
    out = str(tmp_path / "e")
    assert E.main(["--checkpoint", ckpt, "--out", out, "--workers", "0"]) == 0
    got = json.load(open(os.path.join(out, "metrics.json")))
    trained = json.load(open(os.path.join(digits_run, "metrics.json")))
    assert got["dataset"] == "digits" and got["images"] == 450
    assert got["top1_error"] == pytest.approx(trained["top1_error"], abs=1e-6)
    assert got["top5_error"] == pytest.approx(trained["top5_error"], abs=1e-6)
    assert "top-1 error" in capsys.readouterr().out
    assert E.main(["--checkpoint", ckpt, "--out", out, "--ten-crop", "--crop-size", "28", "--workers", "0"]) == 0
    assert json.load(open(os.path.join(out, "metrics.json")))["views_per_image"] == 10
    assert E.main(["--checkpoint", ckpt, "--out", out, "--scales", "32,40", "--workers", "0"]) == 0
    multi = json.load(open(os.path.join(out, "metrics.json")))
    assert multi["test"] == "multi-scale" and multi["views_per_image"] == 4 and 0 <= multi["top1_error"] <= 1


def test_evaluate_on_an_image_folder_with_every_view(tmp_path):
    write_image_folder(str(tmp_path / "data"), per_class=6)
    run = str(tmp_path / "run")
    assert T.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--arch", "resnet18", "--batch-size", "4",
                   "--iterations", "3", "--crop-size", "48", "--scale-min", "56", "--scale-max", "64", "--resize-size", "56",
                   "--workers", "0", "--out", run]) == 0
    ckpt = os.path.join(run, "checkpoint.pt")
    common = ["--checkpoint", ckpt, "--data-dir", str(tmp_path / "data"), "--workers", "0", "--batch-size", "5"]
    for extra, views in (([], 1), (["--ten-crop"], 10), (["--scales", "48,64"], 4)):
        out = str(tmp_path / f"e{views}")
        assert E.main(common + ["--resize-size", "56", "--crop-size", "48", "--out", out] + extra) == 0
        m = json.load(open(os.path.join(out, "metrics.json")))
        assert m["images"] == 12 and m["views_per_image"] == views and m["top5_error"] == 0.0  # 2 classes


def test_evaluate_bad_input_exits_2(digits_run, tmp_path, capsys):
    ckpt = os.path.join(digits_run, "checkpoint.pt")
    plain = tmp_path / "plain.pt"
    torch.save(resnet_fast.resnet20().state_dict(), plain)
    write_image_folder(str(tmp_path / "data"), per_class=1)
    cases = [
        (["--checkpoint", ckpt, "--arch", "resnet32"], "does not match the checkpoint"),
        (["--checkpoint", str(plain)], "not a resnet_fast.train checkpoint"),
        (["--checkpoint", str(tmp_path / "none.pt")], "does not exist"),
        (["--weights", "IMAGENET1K_V1"], "needs --arch"),
        (["--arch", "resnet18", "--weights", str(plain)], "do not fit resnet18"),
        (["--arch", "resnet18", "--weights", "NOPE"], "neither a file"),
        # torchvision-style 1000-class weights on a 2-class folder
        (["--arch", "resnet18", "--weights", str(tmp_path / "r18.pt"), "--data-dir", str(tmp_path / "data")], "1000 outputs"),
        (["--checkpoint", ckpt, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere")], "does not exist"),
        (["--checkpoint", ckpt, "--scales", "0,32"], "positive integers"),
    ]
    torch.save(resnet_fast.resnet18().state_dict(), tmp_path / "r18.pt")
    for args, message in cases:
        code, err = exit_code_and_stderr(E.main, args + ["--workers", "0"], capsys)
        assert code == 2 and message in err, (args, err[-2000:])
    res = run_cli(["--checkpoint", str(plain)], module="resnet_fast.evaluate")  # the real process, end to end
    assert res.returncode == 2 and "not a resnet_fast.train checkpoint" in res.stderr and "Traceback" not in res.stderr
