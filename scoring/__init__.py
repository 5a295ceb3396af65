"""Batch scoring, in three parts: where the images come from (``inputs``), where the rows go
(``writers``), and what scores them (``engines``: local, http, ray). The ``cnnserve score``
command that joins them is ``run.py``. No torch, and not in the serving image.
"""

from __future__ import annotations

#: What scores the images: here, against a running service, or on a Ray cluster (the first is the default).
ENGINES = ("local", "http", "grpc", "ray")  # grpc: grpc_engine.py
#: How the local engine decodes: auto (processes from 5,000 files), processes, threads.
DECODERS = ("auto", "processes", "threads")


class ScoreError(ValueError):
    """A scoring run that cannot start or finish (bad arguments, unreadable manifest, output
    exists, disk full...); the message names the file and what to do."""


def row(path: str, preds: list[dict] | None, error: str = "", ood: dict | None = None) -> dict:
    """One output row; ``ood`` is the answer's ``ood_score`` and ``in_distribution`` (None for a failed image)."""
    ood = ood or {}
    return {"path": path, "labels": [p["label"] for p in preds or []], "indices": [p["index"] for p in preds or []],
            "probabilities": [p["probability"] for p in preds or []], "ood_score": ood.get("ood_score"),
            "in_distribution": ood.get("in_distribution"), "error": error}


def printable(text: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate
    escapes) become ``\\xNN``. Used where the format must be UTF-8 (Parquet, the terminal)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
