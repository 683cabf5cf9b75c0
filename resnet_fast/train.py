"""``python -m resnet_fast.train``: the paper's training recipes on the fused models.

With no arguments: CIFAR ResNet-20 on scikit-learn's bundled handwritten digits (32x32 RGB, a
held-out quarter as the test set), the CIFAR recipe with its schedule scaled to 30 epochs; a few
minutes on 2 CPU cores, no download.

- ``--recipe cifar`` (section 4.2): batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided
  by 10 at 32k and 48k iterations, stop at 64k; 45k/5k train/validation split; 4-pixel zero
  padding, random 32x32 crop, horizontal flip; per-pixel mean subtraction; He initialisation;
  nets of 110 layers and more warm up at lr 0.01 until the training error is below 80%.
  Other lengths scale the milestones with them (``--milestones``, fractions of the run, logged).
- ``--recipe imagenet`` (section 3.4): shorter side resized uniformly in [256, 480], random 224
  crop or its flip, per-pixel mean subtraction, AlexNet's PCA colour augmentation, batch 256,
  lr 0.1 divided by 10 when the validation error plateaus, up to 60x10^4 iterations.

``torchrun --nproc_per_node=N -m resnet_fast.train ...`` trains with DistributedDataParallel
(gloo on CPU, nccl on GPU); ``--batch-size`` is the global batch, shared among the processes.

In ``--out``: ``checkpoint.pt`` (written atomically after every epoch; ``--resume`` continues from
it and reproduces the uninterrupted run), ``log.csv``, ``curves.png`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as C
from . import data as D
from ._cli import UsageError, atomic_write, exit_code, pick_device, write_json
from .evaluate import make_predictor, score, stack_or_list, tensor_batches
from .models import get_model, list_models

RECIPES = {
    # section 4.2
    "cifar": dict(batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, iterations=64_000,
                  milestones=(32_000 / 64_000, 48_000 / 64_000), schedule="step", pad=4),
    # section 3.4
    "imagenet": dict(batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4, iterations=600_000,
                     milestones=(), schedule="plateau", pad=0),
}
DIGITS_EPOCHS = 30
WARMUP_LR = 0.01          # section 4.2, ResNet-110
WARMUP_ERROR = 0.80       # ... "until the training error is below 80%"
WARMUP_WINDOW = 20        # iterations over which that training error is measured
WARMUP_MIN_LAYERS = 110
CHECKPOINT = "checkpoint.pt"
# On --resume these may differ from the checkpoint's run (they do not change what is computed).
RESUME_FREE = ("data_dir", "workers", "device", "out")


@dataclass
class Config:
    """Everything that defines a run (saved in the checkpoint; --resume reuses it)."""

    arch: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    recipe: str = "cifar"
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    iterations: int = 0
    epochs: int | None = None
    milestones: tuple[float, ...] = ()
    schedule: str = "step"
    warmup: bool = False
    plateau_patience: int = 5
    val_size: int = 0
    pad: int = 4
    crop_size: int = 32
    scale_min: int = 256
    scale_max: int = 480
    resize_size: int = 256
    mean_images: int = 10_000
    seed: int = 0
    workers: int = 2
    device: str = "cpu"
    amp: bool = False
    out: str = ""


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


class Schedule:
    """The learning rate of each iteration: the step schedule of section 4.2 (lr / 10 at each
    milestone, fractions of the run) with the optional warm-up, or section 3.4's division by 10
    when the validation error stops improving for ``patience`` epochs."""

    def __init__(self, cfg: Config) -> None:
        self.base_lr = cfg.lr
        self.kind = cfg.schedule
        self.milestones = [round(f * cfg.iterations) for f in cfg.milestones]
        self.patience = cfg.plateau_patience
        self.warming = cfg.warmup
        self.recent: list[float] = []
        self.divisions = 0  # plateau: how many times the lr was divided
        self.best = math.inf
        self.bad_epochs = 0
        self.warmup_ended_at: int | None = None

    def lr(self, iteration: int) -> float:
        if self.warming:
            return WARMUP_LR
        if self.kind == "step":
            return self.base_lr / 10 ** sum(iteration >= m for m in self.milestones)
        return self.base_lr / 10**self.divisions

    def after_iteration(self, iteration: int, train_error: float) -> None:
        if not self.warming:
            return
        self.recent = (self.recent + [train_error])[-WARMUP_WINDOW:]
        if len(self.recent) == WARMUP_WINDOW and sum(self.recent) / WARMUP_WINDOW < WARMUP_ERROR:
            self.warming = False
            self.warmup_ended_at = iteration + 1

    def after_epoch(self, val_error: float | None) -> None:
        if self.kind != "plateau" or val_error is None:
            return
        if val_error < self.best - 1e-4:
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                self.divisions += 1
                self.bad_epochs = 0

    def describe(self, cfg: Config) -> str:
        if self.kind == "step":
            marks = ", ".join(str(m) for m in self.milestones) or "none"
            paper = " (the paper: 32000 and 48000 of 64000)" if cfg.recipe == "cifar" else ""
            text = (
                f"lr {self.base_lr:g}, divided by 10 at iterations {marks} "
                f"(fractions {', '.join(f'{f:g}' for f in cfg.milestones)} of {cfg.iterations}){paper}"
            )
        else:
            text = f"lr {self.base_lr:g}, divided by 10 when the validation error has not improved for {self.patience} epochs"
        if cfg.warmup:
            text += f"; warm-up at lr {WARMUP_LR:g} until the training error is below {WARMUP_ERROR:.0%}"
        return text

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("warming", "recent", "divisions", "best", "bad_epochs", "warmup_ended_at")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class Data:
    """The training, validation and test data of a run, and the batches of one epoch."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.local_batch = cfg.batch_size // world_size
        if cfg.dataset == "imagefolder":
            train_dir, val_dir, names = D.find_image_folders(cfg.data_dir)
            self.classes, self.train_dir = names, train_dir
            self.train = D.ImageFiles(train_dir, names, D.ScaleCropFlip(cfg.crop_size, cfg.scale_min, cfg.scale_max), cfg.seed)
            self.test = D.ImageFiles(val_dir, names, D.ResizeCenterCrop(cfg.resize_size, cfg.crop_size))
            self.val = None
            self.in_memory = False
        else:
            train, test = D.load_digits() if cfg.dataset == "digits" else D.load_cifar10(cfg.data_dir)
            self.train, self.val = D.split_validation(train, cfg.val_size, seed=cfg.seed)
            self.test = test
            self.classes = train.classes
            self.in_memory = True
            if device.type == "cuda":  # CIFAR is 150 MB of uint8: keep it on the GPU, augment there
                self.train = D.TensorSet(self.train.images.to(device), self.train.labels.to(device), self.classes)
        if len(self.train) < cfg.batch_size:
            raise D.DataError(
                f"the training set has {len(self.train)} images, fewer than one batch of {cfg.batch_size}"
            )
        self.sampler = D.EpochSampler(len(self.train), cfg.batch_size, cfg.seed, rank, world_size)

    def __len__(self) -> int:
        return len(self.sampler)

    def statistics(self) -> tuple[D.Normalizer, tuple[Tensor, Tensor] | None]:
        """The mean image of the training set (and, for the ImageNet recipe, the pixel PCA)."""
        if self.in_memory:
            return D.Normalizer(D.mean_image(self.train.images)), None
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(self.train), generator=g)[: cfg.mean_images].sort().values.tolist()
        view = D.ImageFiles(self.train_dir, self.classes, D.ResizeCenterCrop(cfg.resize_size, cfg.crop_size))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(view, pick), batch_size=64, num_workers=cfg.workers, collate_fn=stack_or_list
        )
        images = torch.cat([b[0] for b in loader])
        pca = D.pixel_pca(images) if cfg.recipe == "imagenet" else None
        return D.Normalizer(D.mean_image(images)), pca

    def epoch(self, epoch: int, normalizer: D.Normalizer, pca):
        """Yields (normalised float batch on the device, labels) for this process."""
        cfg, dev = self.cfg, self.device
        self.sampler.epoch = epoch
        if self.in_memory:
            aug = D.CropFlip.draw(len(self.train), cfg.pad, D.epoch_generator(cfg.seed + 7919, epoch))
            for batch in self.sampler:
                idx = torch.tensor([i for i, _ in batch])
                x = normalizer(self.train.images[idx].to(dev, non_blocking=True))
                if cfg.pad > 0:
                    x = D.pad_crop_flip(x, aug.dy[idx], aug.dx[idx], aug.flip[idx], cfg.pad)
                yield x, self.train.labels[idx].to(dev, non_blocking=True)
            return
        loader = torch.utils.data.DataLoader(
            self.train, batch_sampler=self.sampler, num_workers=cfg.workers,
            pin_memory=dev.type == "cuda", persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
        )
        for images, alpha, labels in loader:
            x = normalizer(images.to(dev, non_blocking=True))
            if pca is not None:
                x = D.lighting(x, alpha, *pca)
            yield x, labels.to(dev, non_blocking=True)

    def eval_batches(self, which: str):
        dataset = self.val if which == "val" else self.test
        if self.in_memory:
            return tensor_batches(dataset, D.shard(len(dataset), self.rank, self.world_size), 256)
        subset = torch.utils.data.Subset(dataset, list(D.shard(len(dataset), self.rank, self.world_size)))
        return torch.utils.data.DataLoader(
            subset, batch_size=max(1, self.local_batch), num_workers=self.cfg.workers, collate_fn=stack_or_list,
            pin_memory=self.device.type == "cuda",
        )


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

LOG_FIELDS = ("epoch", "iteration", "lr", "train_loss", "train_error", "val_error", "test_error", "test_top5_error", "images_per_s")


def write_log(path: str, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS})

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(buf.getvalue())

    atomic_write(path, write)


def plot_curves(path: str, history: list[dict], title: str) -> None:
    """Training (dashed) and test (bold) error against iterations, as in the paper's Figures 4 and 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["iteration"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(it, [100 * r["train_error"] for r in history], "--", color="C0", label="training error")
    for key, style, label in (("val_error", "-", "validation error"), ("test_error", "-", "test error")):
        pts = [(r["iteration"], 100 * r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, lw=2, color="C1" if key == "test_error" else "C2", label=label)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def save_checkpoint(path: str, state: dict) -> None:
    """The checkpoint file, written atomically (the tests replace this to simulate a crash)."""
    C.save(path, state)


# --------------------------------------------------------------------------------------------
# Command line and configuration
# --------------------------------------------------------------------------------------------


def fraction_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if any(not 0 < v < 1 for v in values) or list(values) != sorted(values):
        raise argparse.ArgumentTypeError(f"milestones are increasing fractions of the run in (0, 1), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet_fast.train", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Options default to None: the recipe and dataset fill them in, and --resume can tell what was asked.
    p.add_argument("--arch", choices=list_models(), default=None, help="default resnet20 (resnet50 for imagefolder)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=None, help="default: cifar, imagenet for imagefolder")
    p.add_argument("--dataset", choices=D.DATASETS, default=None, help="default digits")
    p.add_argument("--data-dir", default=None)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None)
    length.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch (cifar 128, imagenet 256)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (0.1)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--milestones", type=fraction_list, default=None,
                   help="step schedule: lr / 10 at these fractions of the run (default 0.5,0.75 = 32k,48k of 64k)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                   help=f"lr {WARMUP_LR} until the training error < {WARMUP_ERROR:.0%}% (default: nets of {WARMUP_MIN_LAYERS}+ layers)")
    p.add_argument("--plateau-patience", type=int, default=None, help="imagenet: epochs without improvement (5)")
    p.add_argument("--val-size", type=int, default=None, help="training images held out for validation (cifar10: 5000)")
    p.add_argument("--crop-size", type=int, default=None, help="imagenet 224")
    p.add_argument("--scale-min", type=int, default=None, help="imagenet 256")
    p.add_argument("--scale-max", type=int, default=None, help="imagenet 480")
    p.add_argument("--resize-size", type=int, default=None, help="imagenet: shorter side of the test view (256)")
    p.add_argument("--mean-images", type=int, default=None, help="imagefolder: images sampled for the mean image (10000)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes per training process")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--amp", action="store_true", default=None, help="bfloat16 autocast (GPU)")
    p.add_argument("--out", default=None, help="output folder (default runs/<arch>-<dataset>[-N], never an existing run)")
    p.add_argument("--resume", default=None, help="a checkpoint.pt to continue from")
    return p


def layers_of(arch: str) -> int:
    digits = "".join(ch for ch in arch if ch.isdigit())
    return int(digits) if digits else 0


def make_config(args: argparse.Namespace, world_size: int) -> Config:
    dataset = args.dataset or "digits"
    recipe = args.recipe or ("imagenet" if dataset == "imagefolder" else "cifar")
    r = RECIPES[recipe]
    arch = args.arch or ("resnet50" if dataset == "imagefolder" else "resnet20")
    imagenet_data = dataset == "imagefolder"
    cfg = Config(
        arch=arch, dataset=dataset, data_dir=args.data_dir, recipe=recipe,
        batch_size=args.batch_size or r["batch_size"],
        lr=args.lr if args.lr is not None else r["lr"],
        momentum=r["momentum"],
        weight_decay=args.weight_decay if args.weight_decay is not None else r["weight_decay"],
        epochs=args.epochs,
        milestones=tuple(args.milestones) if args.milestones is not None else tuple(r["milestones"]),
        schedule=r["schedule"],
        warmup=args.warmup if args.warmup is not None else (recipe == "cifar" and layers_of(arch) >= WARMUP_MIN_LAYERS),
        plateau_patience=args.plateau_patience or 5,
        val_size=args.val_size if args.val_size is not None else (5000 if dataset == "cifar10" else 0),
        pad=r["pad"] if recipe == "cifar" else 0,
        crop_size=args.crop_size or (224 if imagenet_data else 32),
        scale_min=args.scale_min or 256,
        scale_max=args.scale_max or 480,
        resize_size=args.resize_size or 256,
        mean_images=args.mean_images or 10_000,
        seed=args.seed if args.seed is not None else 0,
        workers=args.workers if args.workers is not None else min(4, os.cpu_count() or 1),
        device=str(pick_device(args.device)),
        amp=bool(args.amp),
    )
    if args.iterations is not None:
        cfg.iterations = args.iterations
    elif args.epochs is None and dataset == "digits":
        cfg.epochs = DIGITS_EPOCHS
    elif args.epochs is None:
        cfg.iterations = r["iterations"]
    check_config(cfg, world_size)
    return cfg


def check_config(cfg: Config, world_size: int) -> None:
    positive = {"batch_size": cfg.batch_size, "crop_size": cfg.crop_size, "scale_min": cfg.scale_min,
                "scale_max": cfg.scale_max, "resize_size": cfg.resize_size, "mean_images": cfg.mean_images,
                "plateau_patience": cfg.plateau_patience}
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if cfg.epochs is not None and cfg.epochs < 1 or cfg.iterations < 0 or (cfg.epochs is None and cfg.iterations < 1):
        raise UsageError("--epochs and --iterations must be positive")
    if cfg.lr <= 0 or cfg.weight_decay < 0:
        raise UsageError(f"--lr must be positive and --weight-decay non-negative, got {cfg.lr} and {cfg.weight_decay}")
    if cfg.val_size < 0 or cfg.workers < 0:
        raise UsageError("--val-size and --workers must be non-negative")
    if cfg.batch_size % world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world_size} processes")
    if cfg.batch_size // world_size < 2:
        raise UsageError("each process needs a batch of at least 2 images (BatchNorm statistics)")
    if cfg.scale_min > cfg.scale_max:
        raise UsageError(f"--scale-min {cfg.scale_min} is larger than --scale-max {cfg.scale_max}")
    if cfg.dataset == "imagefolder" and cfg.crop_size > min(cfg.scale_min, cfg.resize_size):
        raise UsageError(f"--crop-size {cfg.crop_size} does not fit images resized to {min(cfg.scale_min, cfg.resize_size)}")
    if cfg.dataset != "imagefolder" and cfg.crop_size != 32:
        raise UsageError("--crop-size applies to imagefolder; the CIFAR recipe crops 32x32 from the padded image")
    if cfg.amp and not cfg.device.startswith("cuda"):
        raise UsageError("--amp needs a CUDA device (--device cuda)")
    if cfg.dataset != "digits" and not cfg.data_dir:
        raise UsageError(f"--dataset {cfg.dataset} needs --data-dir")


def resume_config(args: argparse.Namespace, saved: dict, world_size: int) -> Config:
    """The run's own configuration; options that would change it are refused."""
    names = {f.name for f in fields(Config)}
    cfg = Config(**{k: (tuple(v) if k == "milestones" else v) for k, v in saved.items() if k in names})
    conflicts = []
    for f in fields(Config):
        given = getattr(args, f.name, None)
        if given is None or f.name in RESUME_FREE:
            continue
        if f.name == "milestones":
            given = tuple(given)
        if given != getattr(cfg, f.name):
            conflicts.append(f"--{f.name.replace('_', '-')} {given} (the run has {getattr(cfg, f.name)})")
    if conflicts:
        raise UsageError("--resume continues a run as it was configured; these options differ: " + "; ".join(conflicts))
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    if args.workers is not None:
        cfg.workers = args.workers
    cfg.device = str(pick_device(args.device)) if args.device is not None else str(pick_device(None))
    check_config(cfg, world_size)
    return cfg


def choose_out(args: argparse.Namespace, cfg: Config) -> str:
    if args.resume:
        return args.out or os.path.dirname(os.path.abspath(args.resume))
    if args.out:
        if os.path.exists(os.path.join(args.out, CHECKPOINT)):
            raise UsageError(
                f"{args.out!r} already holds a run ({CHECKPOINT}); continue it with --resume "
                f"{os.path.join(args.out, CHECKPOINT)} or choose another --out (nothing was overwritten)"
            )
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out!r} exists and is not a folder")
        return args.out
    base = os.path.join("runs", f"{cfg.arch}-{cfg.dataset}")
    out, n = base, 1
    while os.path.exists(out):
        n += 1
        out = f"{base}-{n}"
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("RESNET_FAST_DDP_BACKEND") != "gloo" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend=backend)
    return rank, world_size, local_rank


def sync_buffers(model: nn.Module) -> None:
    """Every process takes rank 0's BatchNorm running statistics (each process updated its own)."""
    if torch.distributed.is_initialized():
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


@dataclass
class Run:
    """A training run: its configuration, data, network and optimiser, and how far it has come."""

    cfg: Config
    data: Data
    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    normalizer: D.Normalizer
    pca: tuple[Tensor, Tensor] | None
    device: torch.device
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    iteration: int = 0
    history: list[dict] = field(default_factory=list)
    train_time: float = 0.0

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def total_epochs(self) -> int:
        return math.ceil(self.cfg.iterations / len(self.data))

    def checkpoint(self) -> C.Checkpoint:
        return C.Checkpoint(
            arch=self.cfg.arch, num_classes=len(self.data.classes), classes=list(self.data.classes),
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(),
            epoch=self.epoch, iteration=self.iteration, history=self.history, normalizer=self.normalizer.state_dict(),
            pca=None if self.pca is None else list(self.pca), config=asdict(self.cfg), train_time=self.train_time,
        )


def configure(args: argparse.Namespace, world_size: int) -> tuple[Config, C.Checkpoint | None]:
    """The run's configuration (a new one, or the resumed checkpoint's) and the checkpoint to resume."""
    ckpt = None
    if args.resume:
        ckpt = C.Checkpoint.load(args.resume)
        if not ckpt.resumable:
            raise UsageError(f"{args.resume!r} is a final model, not a resumable training checkpoint")
        cfg = resume_config(args, ckpt.config, world_size)
    else:
        cfg = make_config(args, world_size)
    cfg.out = choose_out(args, cfg)
    return cfg, ckpt


def build(cfg: Config, ckpt: C.Checkpoint | None, rank: int, world_size: int, local_rank: int) -> Run:
    """Data, network, optimiser and schedule, new or restored from ``ckpt``. Bad data or a
    mismatched checkpoint raise before any file is written."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    data = Data(cfg, rank, world_size, device)
    if cfg.epochs is not None:
        cfg.iterations = cfg.epochs * len(data)
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.arch, num_classes=len(data.classes))
    if ckpt is not None:
        if ckpt.arch != cfg.arch or int(ckpt.num_classes) != len(data.classes):
            raise UsageError(
                f"checkpoint {cfg.out!r} does not match its data: {ckpt.num_classes} classes, the data has {len(data.classes)}"
            )
        model.load_state_dict(ckpt.model)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = model
    if world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = Schedule(cfg)
    if ckpt is None:
        normalizer, pca = data.statistics()
        return Run(cfg, data, model, net, optimizer, schedule, normalizer, pca, device, rank, world_size)
    optimizer.load_state_dict(ckpt.optimizer)
    schedule.load_state_dict(ckpt.schedule)
    pca = tuple(ckpt.pca) if ckpt.pca is not None else None
    return Run(
        cfg, data, model, net, optimizer, schedule, D.Normalizer.from_state_dict(ckpt.normalizer), pca, device, rank,
        world_size, epoch=int(ckpt.epoch), iteration=int(ckpt.iteration), history=list(ckpt.history),
        train_time=float(ckpt.train_time),
    )


def describe(run: Run, resuming: bool) -> None:
    cfg, data = run.cfg, run.data
    where = f"{run.world_size} processes" if run.world_size > 1 else "1 process"
    print(f"resnet_fast.train: {cfg.arch} on {cfg.dataset} ({len(data.train)} training images"
          f"{f', {len(data.val)} validation' if data.val is not None else ''}, {len(data.test)} test), "
          f"recipe {cfg.recipe}, batch {cfg.batch_size}, {cfg.iterations} iterations "
          f"({len(data)} per epoch), {run.device}, {where}, {torch.get_num_threads()} threads")
    print(f"schedule: {run.schedule.describe(cfg)}")
    print(f"output: {cfg.out}" + (f" (resuming at iteration {run.iteration})" if resuming else ""))


def train_one_epoch(run: Run) -> dict:
    """One epoch of SGD steps (fewer where the run ends within it): the learning rate of each
    iteration, the warm-up's bookkeeping. Returns the epoch's summed loss, mistakes and images
    over all processes, its last learning rate and its time."""
    cfg, device, schedule = run.cfg, run.device, run.schedule
    from tqdm import tqdm

    steps = min(len(run.data), cfg.iterations - run.iteration)
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.float64, device=device)
    seen, lr = 0, schedule.lr(run.iteration)
    bar = tqdm(total=steps, desc=f"epoch {run.epoch + 1}/{run.total_epochs}", unit="it",
               disable=None if run.main_process else True, leave=False)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(run.data.epoch(run.epoch, run.normalizer, run.pca)):
        if step == steps:
            break
        lr = schedule.lr(run.iteration)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp):
            logits = run.net(x)
            loss = F.cross_entropy(logits.float(), y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        batch_wrong = (logits.detach().argmax(1) != y).sum()
        loss_sum += loss.detach().double() * len(y)
        wrong += batch_wrong.double()
        seen += len(y)
        if schedule.warming:
            stats = torch.stack([batch_wrong.double(), torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
            if run.world_size > 1:
                stats = all_reduce_cpu(stats, device)
            schedule.after_iteration(run.iteration, float(stats[0] / stats[1]))
            if not schedule.warming and run.main_process:
                bar.write(f"warm-up over after {schedule.warmup_ended_at} iterations (training error below "
                          f"{WARMUP_ERROR:.0%}): lr {schedule.lr(run.iteration + 1):g} from now on")
        run.iteration += 1
        bar.update(1)
        if bar.disable is False and step % 5 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:g}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    run.train_time += elapsed
    totals = torch.stack([loss_sum, wrong, torch.tensor(float(seen), device=device, dtype=torch.float64)])
    if run.world_size > 1:
        totals = all_reduce_cpu(totals, device)
    loss_total, wrong_total, seen_total = totals.tolist()
    run.epoch += 1
    return {"loss": loss_total, "wrong": wrong_total, "seen": seen_total, "lr": lr, "elapsed": elapsed}


def evaluate(run: Run) -> tuple[float | None, dict]:
    """The validation error (None without a validation set) and the test errors, on rank 0's
    BatchNorm statistics."""
    sync_buffers(run.model)
    predict = make_predictor("single")
    val_error = None
    if run.data.val is not None:
        val_error = score(run.model, run.data.eval_batches("val"), run.normalizer, predict, run.device, run.cfg.amp)["top1_error"]
    test = score(run.model, run.data.eval_batches("test"), run.normalizer, predict, run.device, run.cfg.amp)
    return val_error, test


def finish_epoch(run: Run, stats: dict, val_error: float | None, test: dict) -> None:
    """The schedule's end of epoch; the log row; on rank 0 the checkpoint, log.csv, curves.png
    and a line of output."""
    run.schedule.after_epoch(val_error if val_error is not None else test["top1_error"])
    row = {
        "epoch": run.epoch, "iteration": run.iteration, "lr": stats["lr"],
        "train_loss": round(stats["loss"] / stats["seen"], 6), "train_error": round(stats["wrong"] / stats["seen"], 6),
        "val_error": None if val_error is None else round(val_error, 6),
        "test_error": round(test["top1_error"], 6), "test_top5_error": round(test["top5_error"], 6),
        "images_per_s": round(stats["seen"] / stats["elapsed"], 1),
    }
    run.history.append(row)
    if run.main_process:
        out = run.cfg.out
        save_checkpoint(os.path.join(out, CHECKPOINT), run.checkpoint().to_dict())
        write_log(os.path.join(out, "log.csv"), run.history)
        plot_curves(os.path.join(out, "curves.png"), run.history, f"{run.cfg.arch} on {run.cfg.dataset}")
        val_text = f", val error {100 * val_error:.2f}%" if val_error is not None else ""
        print(f"epoch {run.epoch}/{run.total_epochs}  iter {run.iteration}  lr {stats['lr']:g}  loss {row['train_loss']:.4f}  "
              f"train error {100 * row['train_error']:.2f}%{val_text}  test error {100 * row['test_error']:.2f}%  "
              f"{row['images_per_s']:.0f} img/s", flush=True)
    if run.world_size > 1:
        torch.distributed.barrier()


def report(run: Run) -> None:
    """metrics.json and the closing line (rank 0)."""
    if not run.history:
        raise UsageError(f"the run in {run.cfg.out!r} has no finished epoch to report")
    if not run.main_process:
        return
    cfg, last = run.cfg, run.history[-1]
    metrics = {
        "top1_error": last["test_error"], "top5_error": last["test_top5_error"],
        "val_error": last["val_error"], "train_error": last["train_error"],
        "arch": cfg.arch, "dataset": cfg.dataset, "recipe": cfg.recipe, "iterations": run.iteration,
        "epochs": run.epoch, "batch_size": cfg.batch_size, "processes": run.world_size,
        "train_time_s": round(run.train_time, 1), "checkpoint": os.path.join(cfg.out, CHECKPOINT),
    }
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    print(f"done: {cfg.arch} on {cfg.dataset}, {run.iteration} iterations in {run.train_time:.0f} s of training; "
          f"test top-1 error {100 * last['test_error']:.2f}%, top-5 error {100 * last['test_top5_error']:.2f}% "
          f"(metrics.json, log.csv, curves.png and {CHECKPOINT} in {cfg.out})")


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size, local_rank = init_distributed()
    cfg, ckpt = configure(args, world_size)
    state = build(cfg, ckpt, rank, world_size, local_rank)  # before any file is written
    if state.main_process:
        os.makedirs(cfg.out, exist_ok=True)
        describe(state, resuming=ckpt is not None)
    while state.iteration < cfg.iterations:
        stats = train_one_epoch(state)
        val_error, test = evaluate(state)
        finish_epoch(state, stats, val_error, test)
    report(state)
    return 0


def all_reduce_cpu(t: Tensor, device: torch.device) -> Tensor:
    if torch.distributed.get_backend() != "nccl":
        t = t.cpu()
    torch.distributed.all_reduce(t)
    return t.cpu()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return exit_code(run, "python -m resnet_fast.train", argv)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
