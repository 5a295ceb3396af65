"""Checkpoints: weights, spec, labels and metrics in one file that loads with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts; no
pickled objects, so loading one never runs foreign code. Every failure to load names
the file and says what is wrong with it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from cnnserve.core.spec import ModelSpec, SpecError

from .registry import Classifier, UnknownModelError, build_classifier

FORMAT = "cnnserve-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    """Write atomically: a run killed mid-save leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **ckpt}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint's envelope (format, arch, spec, weights)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        if (path / "model.pt").is_file():
            path = path / "model.pt"
        else:
            raise CheckpointError(f"{path}: is a directory without model.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling refused"
        raise CheckpointError(f"{path}: refused to load (it holds objects other than weights): {first}") from None
    except Exception as e:  # torch.load raises KeyError, RuntimeError, EOFError... for non-checkpoints
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format?): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cnnserve checkpoint (expected format {FORMAT!r})")
    for key in ("arch", "spec", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    try:
        ckpt["spec"] = ModelSpec.from_dict(ckpt["spec"])
    except SpecError as e:
        raise CheckpointError(f"{path}: bad spec: {e}") from None
    ckpt["path"] = str(path)
    return ckpt


def classifier_from_checkpoint(ckpt: dict) -> Classifier:
    """The trained model of a loaded checkpoint, in eval mode; a weight/architecture mismatch names the file."""
    path = ckpt.get("path", "checkpoint")
    try:
        model = build_classifier(ckpt["spec"])
    except UnknownModelError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        model.net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: weights do not fit architecture {ckpt['arch']!r}: {detail}") from None
    return model.eval()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
