"""python -m resnet_fast.train: the recipes' pieces, the files it writes, resume, DDP, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from resnet_fast import train as T
from resnet_fast.checkpoint import FORMAT as CHECKPOINT_FORMAT

from .test_data import write_cifar10, write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short runs: 1347 digits at batch 128 make 10 iterations an epoch.
SHORT = ["--dataset", "digits", "--arch", "resnet20", "--batch-size", "128", "--workers", "0", "--device", "cpu"]


def cfg_for(*argv: str) -> T.Config:
    return T.make_config(T.build_parser().parse_args(list(argv)), world_size=1)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


# ------------------------------------------------------------------ recipes


def test_cifar_recipe_defaults_are_the_papers():
    cfg = cfg_for("--dataset", "cifar10", "--data-dir", "x")
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert cfg.iterations == 64_000 and cfg.val_size == 5000 and cfg.pad == 4 and cfg.crop_size == 32
    s = T.Schedule(cfg)
    assert s.milestones == [32_000, 48_000]
    assert [s.lr(i) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert not cfg.warmup and cfg_for("--arch", "resnet110").warmup and cfg_for("--arch", "resnet1202").warmup
    assert not cfg_for("--arch", "resnet56").warmup and not cfg_for("--arch", "resnet110", "--no-warmup").warmup


def test_milestones_scale_with_the_run_and_are_logged():
    cfg = cfg_for("--iterations", "1000")
    s = T.Schedule(cfg)
    assert s.milestones == [500, 750]
    text = s.describe(cfg)
    assert "500, 750" in text and "32000 and 48000 of 64000" in text
    assert T.Schedule(cfg_for("--iterations", "1000", "--milestones", "0.3,0.6,0.9")).milestones == [300, 600, 900]
    with pytest.raises(SystemExit):
        cfg_for("--milestones", "0.8,0.5")


def test_warmup_holds_lr_001_until_training_error_below_80_percent():
    cfg = cfg_for("--arch", "resnet110", "--iterations", "1000")
    s = T.Schedule(cfg)
    it = 0
    for _ in range(50):  # error stuck at 95%: still warming up
        assert s.lr(it) == 0.01
        s.after_iteration(it, 0.95)
        it += 1
    for _ in range(T.WARMUP_WINDOW):
        s.after_iteration(it, 0.6)
        it += 1
    # The mean error of the last 20 iterations drops below 80% with the 9th 60% batch: 11 * 0.95 + 9 * 0.6 = 15.85 < 16.
    assert not s.warming and s.lr(it) == 0.1 and s.warmup_ended_at == 50 + 9
    s.after_iteration(it, 0.99)  # once over, it stays over
    assert s.lr(it) == 0.1 and s.lr(600) == 0.01


def test_plateau_divides_lr_by_10_after_patience_epochs():
    cfg = cfg_for("--dataset", "imagefolder", "--data-dir", "x", "--plateau-patience", "2")
    assert cfg.recipe == "imagenet" and cfg.batch_size == 256 and cfg.iterations == 600_000 and cfg.arch == "resnet50"
    assert (cfg.crop_size, cfg.scale_min, cfg.scale_max) == (224, 256, 480)
    s = T.Schedule(cfg)
    for err, lr in ((0.5, 0.1), (0.4, 0.1), (0.41, 0.1), (0.4, 0.01), (0.3, 0.01), (0.3, 0.01), (0.3, 0.001)):
        s.after_epoch(err)
        assert s.lr(0) == pytest.approx(lr)
    state = s.state_dict()
    s2 = T.Schedule(cfg)
    s2.load_state_dict(state)
    assert s2.lr(0) == s.lr(0) and s2.best == s.best


@pytest.mark.parametrize("module", ["resnet_fast.train", "resnet_fast.evaluate"])
def test_help_prints_the_options(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--data-dir" in out and "--out" in out


def test_bad_configurations_are_refused():
    for argv, message in (
        (["--batch-size", "1"], "at least 2"),
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--dataset", "imagefolder", "--data-dir", "x", "--crop-size", "300"], "does not fit"),
        (["--scale-min", "500", "--scale-max", "400"], "larger than"),
        (["--amp", "--device", "cpu"], "CUDA"),
        (["--epochs", "0"], "positive"),
    ):
        with pytest.raises(T.UsageError, match=message):
            cfg_for(*argv)
    with pytest.raises(T.UsageError, match="divisible"):
        T.make_config(T.build_parser().parse_args(["--batch-size", "33"]), world_size=2)


# ------------------------------------------------------------------ a run and its files


def rows_of(out) -> list[dict]:
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Two epochs of ResNet-20 on digits, run in this process."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    assert T.main(SHORT + ["--epochs", "2", "--out", out, "--seed", "1"]) == 0
    return out


def test_a_run_writes_checkpoint_log_curves_and_metrics(short_run):
    out = short_run
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == ["checkpoint.pt", "curves.png", "log.csv", "metrics.json"]
    rows = rows_of(out)
    assert [int(r["iteration"]) for r in rows] == [10, 20] and list(rows[0]) == list(T.LOG_FIELDS)
    assert float(rows[0]["lr"]) == 0.1 and float(rows[1]["lr"]) == 0.001  # milestones 10 and 15 of 20
    assert all(0 <= float(r["train_error"]) <= 1 and float(r["images_per_s"]) > 0 for r in rows)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert 0 <= metrics["top5_error"] <= metrics["top1_error"] <= 1
    assert metrics["top1_error"] == float(rows[-1]["test_error"]) and metrics["iterations"] == 20
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["arch"] == "resnet20" and ckpt["epoch"] == 2
    assert ckpt["normalizer"]["mean"].shape == (3, 32, 32)  # the per-pixel mean image
    # The checkpoint is also weights for the model factories.
    import resnet_fast

    model = resnet_fast.resnet20(weights=os.path.join(out, "checkpoint.pt"))
    assert torch.equal(model.fc.weight, ckpt["model"]["fc.weight"])


def test_training_learns_the_digits(short_run):
    """20 iterations already move ResNet-20 well off chance (90% error) on held-out digits."""
    rows = rows_of(short_run)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["train_error"]) < 0.75


def test_resume_reproduces_the_uninterrupted_run(short_run, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real_save = T.save_checkpoint
    calls = []

    def crash_after_first(path, state):
        real_save(path, state)
        calls.append(path)
        raise KeyboardInterrupt("simulated crash after the first epoch")

    monkeypatch.setattr(T, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        T.main(SHORT + ["--epochs", "2", "--out", out, "--seed", "1"])
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    assert T.main(["--resume", os.path.join(out, "checkpoint.pt"), "--workers", "0"]) == 0
    assert comparable(rows_of(out)) == comparable(rows_of(short_run))
    a = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(short_run, "checkpoint.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_and_resume(short_run, tmp_path):
    """SIGKILL after the first checkpoint, resume in a new process: the same run as uninterrupted."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "resnet_fast.train", *SHORT, "--epochs", "2", "--out", out, "--seed", "1"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = os.path.join(out, "log.csv")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and len(rows_of(out)) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)  # whole, whenever the kill came
    assert ckpt["epoch"] >= 1
    res = subprocess.run(
        [sys.executable, "-m", "resnet_fast.train", "--resume", os.path.join(out, "checkpoint.pt"), "--workers", "0"],
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert comparable(rows_of(out)) == comparable(rows_of(short_run))
    m1 = json.load(open(os.path.join(out, "metrics.json")))
    m2 = json.load(open(os.path.join(short_run, "metrics.json")))
    assert (m1["top1_error"], m1["top5_error"]) == (m2["top1_error"], m2["top5_error"])


def test_checkpoint_writes_are_atomic(short_run, tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    T.save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "value": torch.arange(3)})
    before = open(path, "rb").read()

    def torn_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint(path, {"value": torch.arange(5)})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "resnet_fast.train", *SHORT, "--batch-size", "64", "--iterations", "6", "--out", out,
    ]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "2 processes" in res.stdout and res.stdout.count("done:") == 1  # rank 0 reports and writes
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["processes"] == 2 and metrics["iterations"] == 6
    rows = rows_of(out)
    assert len(rows) == 1 and int(rows[0]["iteration"]) == 6


# ------------------------------------------------------------------ bad input: exit code 2, nothing lost


def run_cli(args: list[str], module: str = "resnet_fast.train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=subprocess_env(), capture_output=True, text=True, timeout=600)


def exit_code_and_stderr(main, args: list[str], capsys) -> tuple[int, str]:
    """``main(args)`` in this process, as the command line would end: its exit code and stderr."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_input_exits_2_with_a_clear_message(short_run, tmp_path, capsys, monkeypatch):
    ckpt = os.path.join(short_run, "checkpoint.pt")
    before = open(ckpt, "rb").read()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(before[: len(before) // 2])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--arch", "resnet9"], "invalid choice"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing")], "does not exist"),
        (["--dataset", "cifar10", "--data-dir", str(empty)], "no CIFAR-10 python batches"),
        (["--dataset", "imagefolder", "--data-dir", str(empty)], "no train/ folder"),
        (["--resume", str(corrupt)], "corrupt"),
        (["--resume", str(tmp_path / "nothing.pt")], "does not exist"),
        (["--resume", ckpt, "--arch", "resnet32"], "--arch resnet32"),
        (SHORT + ["--epochs", "1", "--out", short_run], "already holds a run"),
    ]
    monkeypatch.chdir(tmp_path)  # where a default --out would go
    for args, message in cases:
        code, err = exit_code_and_stderr(T.main, args, capsys)
        assert code == 2 and message in err, (args, err[-2000:])
    assert open(ckpt, "rb").read() == before  # nothing overwritten
    assert not os.path.exists(tmp_path / "runs") and os.listdir(empty) == []
    res = run_cli(["--resume", str(corrupt)])  # the real process, end to end
    assert res.returncode == 2 and "corrupt" in res.stderr and "Traceback" not in res.stderr


def test_cifar10_and_imagefolder_runs(tmp_path):
    """The other two datasets end to end on tiny data in the real layouts (CIFAR: 45k/5k-style
    validation split; imagefolder: scale augmentation, PCA lighting, mean image, val/ as test)."""
    write_cifar10(str(tmp_path / "c"), per_batch=40)
    out = str(tmp_path / "cifar")
    assert T.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), "--val-size", "40", "--batch-size", "32",
                   "--iterations", "3", "--workers", "0", "--out", out]) == 0
    rows = rows_of(out)
    assert rows[0]["val_error"] != "" and int(rows[0]["iteration"]) == 3
    write_image_folder(str(tmp_path / "i"), per_class=6)
    out = str(tmp_path / "imagenet")
    assert T.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "i"), "--arch", "resnet18", "--batch-size", "4",
                   "--iterations", "4", "--crop-size", "48", "--scale-min", "56", "--scale-max", "72", "--resize-size", "56",
                   "--workers", "0", "--out", out]) == 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["normalizer"]["mean"].shape == (3, 48, 48) and ckpt["pca"][0].shape == (3,)
    assert ckpt["config"]["recipe"] == "imagenet" and ckpt["num_classes"] == 2
