"""Pictures of a training run: loss/accuracy curves and the test confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker=".", label=split)
        ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in history], marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(targets, preds, labels, path: Path, title: str = "") -> None:
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * n + 3), max(4, 0.5 * n + 2)))
    ConfusionMatrixDisplay.from_predictions(targets, preds, labels=list(range(n)), display_labels=labels,
                                            ax=ax, colorbar=False, xticks_rotation=45 if n > 6 else "horizontal")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
