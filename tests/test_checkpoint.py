"""The training checkpoint type that train and evaluate share (resnet_fast.checkpoint)."""

import pytest
import torch

import resnet_fast
from resnet_fast._cli import UsageError
from resnet_fast.checkpoint import FORMAT, Checkpoint


def small():
    model = resnet_fast.resnet20()
    return Checkpoint(arch="resnet20", num_classes=10, model=model.state_dict(),
                      normalizer={"mean": torch.zeros(3, 32, 32), "std": torch.ones(3)})


def test_round_trip_through_a_file(tmp_path):
    ckpt = small()
    path = str(tmp_path / "c.pt")
    ckpt.save(path)
    back = Checkpoint.load(path)
    assert back.arch == "resnet20" and back.num_classes == 10 and not back.resumable
    assert all(torch.equal(back.model[k], v) for k, v in ckpt.model.items())
    assert torch.load(path, weights_only=True)["format"] == FORMAT
    model = back.build_model(path)
    assert torch.equal(model.fc.weight, ckpt.model["fc.weight"])


def test_foreign_incomplete_and_mismatched_checkpoints_are_refused(tmp_path):
    with pytest.raises(UsageError, match="is not a resnet_fast.train checkpoint"):
        Checkpoint.from_dict({"model": {}}, "x.pt")
    with pytest.raises(UsageError, match="is incomplete: no normalizer"):
        Checkpoint.from_dict({"format": FORMAT, "arch": "resnet20", "num_classes": 10, "model": {}}, "x.pt")
    ckpt = small()
    ckpt.arch = "resnet32"
    with pytest.raises(UsageError, match="does not fit resnet32"):
        ckpt.build_model("x.pt")
    with pytest.raises(UsageError, match="does not exist"):
        Checkpoint.load(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UsageError, match="corrupt or not a torch file"):
        Checkpoint.load(str(tmp_path / "junk.pt"))
