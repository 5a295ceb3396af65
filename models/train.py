"""Training: a config dataclass and one loop you can read top to bottom.

``cnnserve train ARCH --data NAME --epochs N`` writes one run folder:
  model.pt      best weights (by validation accuracy), spec, labels, test metrics
  last.pt       everything needed to resume (optimizer, schedule, history, RNG)
  metrics.json  per-epoch metrics, the config, the spec, the test result and the verdict (``verdict.py``:
                near chance, overfitting, still improving, said plainly at the end of the run too)
  curves.png    loss and accuracy per epoch; confusion.png: the test confusion matrix
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from cnnserve.core.config import DEFAULT_ARCH, DEFAULT_DATA
from cnnserve.core.spec import RESIZE_MODES

from .checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint
from .data import DATASETS, NATIVE_CHANNELS, DataError, load_dataset
from .optim import OPTIMIZERS, augment, init_weights, make_optimizer, make_schedule, parameter_groups
from .pretrained import freeze_backbone, load_weights, read_weights
from .registry import Classifier, build_classifier, get_entry, spec_for
from .verdict import format_verdict, judge

SCHEDULES = ("cosine", "step", "none")
INITS = ("kaiming", "xavier", "default")


@dataclass
class TrainConfig:
    arch: str = DEFAULT_ARCH
    data: str = DEFAULT_DATA
    data_dir: str | None = None
    download: bool = False
    img_size: int | None = None  # default: the registry's input size for the architecture
    channels: int | None = None  # default: the data set's own (1 for digits/MNIST, 3 for RGB sets)
    limit: int | None = None  # use at most this many training images
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float | None = None  # default per optimizer (DEFAULT_LR)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    step_size: int = 10  # epochs between decays of the step schedule
    gamma: float = 0.1
    init: str = "kaiming"
    augment: bool | None = None  # default: on for RGB data (random crop + horizontal flip)
    label_smoothing: float = 0.0
    patience: int = 10  # early stop after this many epochs without a better validation accuracy; 0: never
    seed: int = 0
    out: str | None = None  # default: runs/ARCH-DATA
    workers: int = 0  # data loader processes (folder data sets)
    # Fine-tuning: start from these weights (a torchvision/timm state dict, .pth or .safetensors); the
    # spec then keeps the weights' normalisation and input size, and the head is replaced when the
    # number of classes differs.
    pretrained: str | None = None
    freeze_backbone: bool = False  # only the head learns
    backbone_lr: float | None = None  # the backbone's learning rate as a fraction of --lr (default 0.1 with --pretrained)
    # how a picture is brought to the input size, in training, serving and scoring alike (the spec carries it):
    # crop (the centre, after the shorter side is scaled to size / crop fraction) or whole (the whole picture
    # stretched to the size); default: the architecture's (crop for the ImageNet families, whole for LeNet-5)
    resize: str | None = None

    def __post_init__(self):
        for name, value, valid in (("data set", self.data, DATASETS), ("optimizer", self.optimizer, OPTIMIZERS),
                                   ("schedule", self.schedule, SCHEDULES), ("init", self.init, INITS),
                                   ("resize", self.resize or "crop", tuple(RESIZE_MODES))):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        get_entry(self.arch)  # raises with the list of valid names
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be at least 1")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.arch.replace(':', '-')}-{self.data}")


def _loss(output, target, smoothing: float) -> torch.Tensor:
    if isinstance(output, tuple):  # GoogLeNet with auxiliary heads in training: 0.3 weight each
        main, *aux = output
        return F.cross_entropy(main, target, label_smoothing=smoothing) + sum(
            0.3 * F.cross_entropy(a, target, label_smoothing=smoothing) for a in aux)
    return F.cross_entropy(output, target, label_smoothing=smoothing)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict:
    """Loss, accuracy and the predictions on a whole split."""
    model.eval()
    losses, preds, targets = [], [], []
    for x, y in loader:
        logits = model(x)
        losses.append(F.cross_entropy(logits, y, reduction="sum").item())
        preds.append(logits.argmax(1))
        targets.append(y)
    preds, targets = torch.cat(preds), torch.cat(targets)
    n = len(targets)
    return {"loss": sum(losses) / max(1, n), "accuracy": (preds == targets).float().mean().item() if n else 0.0,
            "n": n, "preds": preds.numpy(), "targets": targets.numpy()}


# What a run folder holds (train writes the first five; export, visualize and `cnnserve up` the rest)
RUN_FILES = ("model.pt", "last.pt", "metrics.json", "curves.png", "confusion.png", "filters.png", "features.png",
             "sample-*.png", "*.onnx", "*.verify.json", "*.tmp")


class RunExistsError(ValueError):
    """The run folder holds an earlier run; the message names it and the ways on."""


def claim_run_folder(out: Path, resume: str | None, overwrite: bool) -> None:
    """A run never replaces another silently: a folder that holds one (model.pt, last.pt or metrics.json)
    is refused, naming the next free ``OUT-N``; ``overwrite`` removes the earlier run's files first, its
    exports included, so nothing stale is left beside the new checkpoint. Resuming continues the run in
    its own folder."""
    held = [n for n in ("model.pt", "last.pt", "metrics.json") if (out / n).is_file()]
    if not held or (resume is not None and Path(resume).resolve().parent == out.resolve()):
        return
    if not overwrite:
        n = 2
        while Path(f"{out}-{n}").exists():
            n += 1
        raise RunExistsError(f"{out}/ already holds a run ({', '.join(held)}): --out {out}-{n} for a new one, "
                             "or --overwrite to replace it (its checkpoints, metrics, pictures and exports)")
    removed = sorted({q for pattern in RUN_FILES for q in out.glob(pattern) if q.is_file()})
    for q in removed:
        q.unlink()
    print(f"--overwrite: removed the earlier run's {', '.join(q.name for q in removed)} from {out}/")


def train(cfg: TrainConfig, resume: str | None = None, progress: bool | None = None,
          overwrite: bool = False) -> Path:
    """Train ``cfg.arch`` on ``cfg.data``; returns the run folder. ``resume``: a last.pt to continue.
    A folder holding another run is refused unless ``overwrite`` (``claim_run_folder``)."""
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        if "optimizer" not in state:
            raise CheckpointError(f"{resume}: holds no training state (resume from the run's last.pt)")
    out = cfg.out_dir
    claim_run_folder(out, resume, overwrite)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)

    # -- data and spec: the registry's spec, specialised to the data's labels and statistics (with
    # pretrained weights: the weights' own normalisation and three channels, as they were trained)
    weights, source = read_weights(cfg.pretrained) if cfg.pretrained and not state else (None, None)
    channels = cfg.channels or (source or {}).get("channels") or (3 if cfg.pretrained else NATIVE_CHANNELS[cfg.data])
    size = cfg.img_size or (source or {}).get("height") or get_entry(cfg.arch).spec.height
    resize = RESIZE_MODES[cfg.resize] if cfg.resize else None
    if state:  # a resumed run keeps its own input, whatever the weights it started from said
        if resize and resize != state["spec"].resize:
            raise CheckpointError(f"{resume}: the run resizes by {state['spec'].resize}, not {resize}: a resumed run "
                                  "keeps its input (start a new run for another --resize)")
        channels, size, resize = state["spec"].channels, state["spec"].height, state["spec"].resize
    data = load_dataset(cfg.data, spec_for(cfg.arch, (), channels, size, resize=resize), cfg.data_dir, cfg.download,
                        cfg.limit)
    # from weights trained elsewhere, their normalisation: a cnnserve checkpoint's own, else the
    # architecture's pretrained one (ImageNet's, or the library's data config)
    stats = ((source["mean"], source["std"]) if source else (None, None)) if cfg.pretrained else (data.mean, data.std)
    spec = state["spec"] if state else spec_for(cfg.arch, data.labels, channels, size, *stats, resize=resize)
    if spec.labels != data.labels:
        raise CheckpointError(f"{resume}: its labels {spec.labels} differ from the data set's {data.labels}")
    print(f"data {cfg.data}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
          f"{len(data.labels)} classes, input {spec.channels}x{spec.height}x{spec.width}")

    gen = torch.Generator().manual_seed(cfg.seed)
    loader = lambda ds, shuffle: DataLoader(  # noqa: E731
        ds, batch_size=cfg.batch_size if shuffle else 256, shuffle=shuffle, generator=gen if shuffle else None,
        num_workers=cfg.workers, drop_last=shuffle and len(ds) > cfg.batch_size)
    train_loader, val_loader, test_loader = loader(data.train, True), loader(data.val, False), loader(data.test, False)

    # -- model, optimizer, schedule
    model: Classifier = build_classifier(spec)
    init_weights(model.net, cfg.init)
    origin = {"kind": "trained"}
    if weights is not None:
        loaded = load_weights(model.net, weights, cfg.pretrained)
        origin = {"kind": "pretrained", "weights": Path(cfg.pretrained).name,
                  "weights_sha256": file_sha256(cfg.pretrained), "head": loaded["head"]}
        print(f"loaded {loaded['tensors']} tensors from {cfg.pretrained}; head {loaded['head_layer']} {loaded['head']}")
    elif state:
        origin = state.get("origin", origin)
    opt = make_optimizer(cfg, parameter_groups(cfg, model.net))
    sched = make_schedule(cfg, opt, len(train_loader))
    history, start, best_acc, best_state, stale = [], 0, -1.0, None, 0
    if state:
        model.net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start, best_acc, stale = state["history"], state["epoch"], state["best_val_accuracy"], state["stale"]
        best_state = state["best_state_dict"]
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["loader"])
        print(f"resuming {resume} after epoch {start}")
    do_augment = cfg.augment if cfg.augment is not None else spec.channels == 3
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {cfg.arch}: {n_params:,} parameters; optimizer {cfg.optimizer} lr {opt.param_groups[-1]['lr']:g}, "
          f"schedule {cfg.schedule}, augment {'on' if do_augment else 'off'}; writing {out}/")

    # -- the loop
    t0 = time.time()
    for epoch in range(start, cfg.epochs):
        model.train()
        if cfg.freeze_backbone:
            freeze_backbone(model.net)
        seen = correct = 0
        loss_sum = 0.0
        # progress None: a bar on a terminal only; the per-epoch line below is always printed
        bar = Progress(TextColumn(f"epoch {epoch + 1}/{cfg.epochs}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=True,
                       console=Console(stderr=True),
                       disable=not (sys.stderr.isatty() if progress is None else progress))
        task = bar.add_task("train", total=len(train_loader), stats="")
        with bar:
            for x, y in train_loader:
                if do_augment:
                    x = augment(x, gen)
                output = model(x)
                loss = _loss(output, y, cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                logits = output[0] if isinstance(output, tuple) else output
                seen += len(y)
                correct += (logits.argmax(1) == y).sum().item()
                loss_sum += loss.item() * len(y)
                bar.update(task, advance=1, stats=f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f}")
        val = evaluate(model, val_loader)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen),
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "lr": opt.param_groups[-1]["lr"],
               "seconds": round(time.time() - t0, 2)}
        history.append(row)
        improved = val["accuracy"] > best_acc
        if improved:
            best_acc, best_state, stale = val["accuracy"], copy.deepcopy(model.net.state_dict()), 0
        else:
            stale += 1
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
              f"  val loss {val['loss']:.4f} acc {val['accuracy']:.4f}  {row['seconds']:.1f}s"
              f"{'  *best' if improved else ''}", flush=True)
        save_checkpoint(out / "last.pt", {
            "arch": cfg.arch, "spec": spec.to_dict(), "state_dict": model.net.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
            "history": history, "best_val_accuracy": best_acc, "best_state_dict": best_state, "stale": stale,
            "train_config": asdict(cfg), "rng": {"torch": torch.get_rng_state(), "loader": gen.get_state()},
            "origin": origin})
        _write_metrics(out, cfg, spec, history, None)
        if cfg.patience and stale >= cfg.patience:
            print(f"early stop: no better validation accuracy for {cfg.patience} epochs")
            break

    # -- the best weights, measured once on the held-out test split
    model.net.load_state_dict(best_state)
    test = evaluate(model, test_loader)
    best_epoch = max(history, key=lambda r: r["val_accuracy"])["epoch"]
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "n_test": test["n"],
               "val_accuracy": best_acc, "best_epoch": best_epoch, "epochs_run": len(history),
               "train_seconds": history[-1]["seconds"] if history else 0.0}
    save_checkpoint(out / "model.pt", {
        "arch": cfg.arch, "spec": spec.to_dict(), "state_dict": model.net.state_dict(), "metrics": metrics,
        "train_config": asdict(cfg), "data": cfg.data, "torch_version": str(torch.__version__), "origin": origin,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    verdict = judge(test["accuracy"], test["n"], spec.num_classes, history, {
        "epochs": cfg.epochs, "data": cfg.data, "resize": spec.resize, "limit": cfg.limit, "n_train": len(data.train),
        "pretrained": bool(cfg.pretrained or origin.get("kind") == "pretrained"), "augment": do_augment,
        "channels": spec.channels})
    _write_metrics(out, cfg, spec, history, metrics, verdict)
    from .report import plot_confusion, plot_curves

    plot_curves(history, out / "curves.png", title=f"{cfg.arch} on {cfg.data}")
    plot_confusion(test["targets"], test["preds"], spec.labels, out / "confusion.png",
                   title=f"{cfg.arch} on {cfg.data}: test accuracy {test['accuracy']:.2%}")
    print(f"test accuracy {test['accuracy']:.4f} ({test['n']} images, best epoch {best_epoch}); "
          f"checkpoint {out / 'model.pt'}")
    print(format_verdict(verdict), flush=True)
    return out


def _write_metrics(out: Path, cfg: TrainConfig, spec, history: list, test: dict | None,
                   verdict: dict | None = None) -> None:
    doc = {"config": asdict(cfg), "spec": spec.to_dict(), "epochs": history, "test": test, "verdict": verdict}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out / "metrics.json")


def config_from_args(given: dict, resume: str | None = None) -> TrainConfig:
    """A config from the options given on the command line; on resume, the stored config with those on top."""
    known = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in given.items() if k in known}
    if resume:
        stored = load_checkpoint(resume).get("train_config", {})
        given = {**{k: v for k, v in stored.items() if k in known}, **given}
    return TrainConfig(**given)


__all__ = ["TrainConfig", "train", "evaluate", "config_from_args", "DataError", "CheckpointError", "RunExistsError"]
