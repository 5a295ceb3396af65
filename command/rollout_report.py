"""The figures and pictures of ``cnnserve evaluate`` and ``cnnserve replay`` (``rollout.py`` runs the models).

numpy for the figures; matplotlib (the ``train`` extra) for the confusion matrix and the reliability diagram,
which are skipped with a note where it is missing; Pillow for the contact sheet of disagreements.

ECE is the expected calibration error as export measures it (``export/calibrate.py``'s ``reliability``, written
out here in numpy, so that evaluating needs no scipy): the top-1 confidences in 15 equal-width bins, each bin
``(lo, hi]`` (a confidence of exactly 0 in the first), and ECE = sum over bins of (images in the bin / all
images) x |accuracy in the bin - mean confidence in the bin|.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnserve.core.confidence import BINS, reliability

#: Classes drawn in the confusion matrix at most: past it, those with the most errors (the rest are in the JSON).
CONFUSION_CLASSES = 30
MATPLOTLIB_MISSING = ("not drawn: matplotlib is missing (it comes with the train extra: pip install matplotlib); "
                      "the figures are in report.json and report.md")


def classification_figures(probs: np.ndarray, targets: np.ndarray, labels: list[str], k: int) -> dict:
    """Accuracy, top-k accuracy, per-class recall and precision, the confusion matrix (rows: true class,
    columns: predicted) and the ECE of ``probs`` (N x classes) against ``targets`` (class indices)."""
    n, classes = probs.shape
    pred = probs.argmax(axis=1)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    confusion = np.bincount(targets * classes + pred, minlength=classes * classes).reshape(classes, classes)
    support, predicted, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    per_class = [{"label": labels[c], "support": int(support[c]),
                  "recall": round(float(hits[c] / support[c]), 6) if support[c] else None,
                  "precision": round(float(hits[c] / predicted[c]), 6) if predicted[c] else None}
                 for c in range(classes)]
    rel = reliability(probs, targets)
    return {"images": int(n), "accuracy": round(float((pred == targets).mean()), 6), "top_k": k,
            "top_k_accuracy": round(float((top == targets[:, None]).any(axis=1).mean()), 6),
            "ece": round(rel["ece"], 6), "mean_confidence": round(float(probs.max(axis=1).mean()), 6),
            "per_class": per_class, "confusion": confusion.tolist(), "reliability": rel}


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def evaluation_markdown(report: dict, pictures: dict[str, str]) -> str:
    f = report["figures"]
    lines = [f"# Evaluation of {report['model']} on {report['folder']}", "",
             f"Labels from {report['labels_from']}; {f['images']} labelled images scored"
             + (f", {len(report['failed'])} could not be read (report.json lists them)" if report["failed"] else "")
             + (f", {report['unlabelled']} without a label skipped" if report["unlabelled"] else "") + ".", "",
             "| measure | value |", "|---|---|",
             f"| accuracy (top-1) | {percent(f['accuracy'])} |", f"| top-{f['top_k']} accuracy | "
             f"{percent(f['top_k_accuracy'])} |",
             f"| ECE ({BINS} equal-width bins of the top-1 confidence) | {percent(f['ece'])} |",
             f"| mean top-1 confidence | {percent(f['mean_confidence'])} |", "",
             "| class | images | recall | precision |", "|---|---|---|---|"]
    lines += [f"| {c['label']} | {c['support']} | {percent(c['recall'])} | {percent(c['precision'])} |"
              for c in f["per_class"] if c["support"] or c["precision"] is not None]
    confusions = report["top_confusions"]
    if confusions:
        lines += ["", "Most frequent confusions:", "", "| true | predicted | images |", "|---|---|---|"]
        lines += [f"| {c['true']} | {c['predicted']} | {c['images']} |" for c in confusions]
    lines += [""] + [f"![{name}]({file})" if file.endswith(".png") else f"{name}: {file}"
                     for name, file in pictures.items()]
    return "\n".join(lines) + "\n"


def top_confusions(confusion: list[list[int]], labels: list[str], limit: int = 10) -> list[dict]:
    m = np.array(confusion)
    np.fill_diagonal(m, 0)
    order = np.argsort(-m, axis=None, kind="stable")[:limit]
    return [{"true": labels[i // len(labels)], "predicted": labels[i % len(labels)], "images": int(m.flat[i])}
            for i in order if m.flat[i] > 0]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def confusion_png(figures: dict, labels: list[str], path: Path, title: str) -> str:
    """The confusion matrix, each row shaded by its share of the true class and labelled with its count;
    past ``CONFUSION_CLASSES`` classes, those with the most errors. Where it went, or why it was not drawn."""
    plt = _pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    m = np.array(figures["confusion"])
    shown = np.arange(len(labels))
    if len(labels) > CONFUSION_CLASSES:
        errors = m.sum(axis=0) + m.sum(axis=1) - 2 * np.diag(m)
        shown = np.sort(np.argsort(-errors, kind="stable")[:CONFUSION_CLASSES])
        title += f" ({CONFUSION_CLASSES} of {len(labels)} classes: those with the most errors)"
    sub = m[np.ix_(shown, shown)]
    share = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1)
    side = max(4.5, 0.45 * len(shown) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 0.5, side))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(sub):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    names = [labels[i] for i in shown]
    ax.set_xticks(range(len(shown)), names, rotation=45 if len(shown) > 6 else 0, ha="right", fontsize=8)
    ax.set_yticks(range(len(shown)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def reliability_png(figures: dict, path: Path, title: str) -> str:
    """Accuracy against mean confidence per bin, the diagonal being perfect calibration."""
    plt = _pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    rel = figures["reliability"]
    bins = rel["bins"]
    centres = (np.arange(bins) + 0.5) / bins
    shown = np.array(rel["counts"]) > 0
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.bar(centres[shown], np.array(rel["accuracy"])[shown], width=1 / bins, edgecolor="k", alpha=0.7,
           label="accuracy")
    ax.plot(centres[shown], np.array(rel["confidence"])[shown], "o", color="C3", label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"top-1 confidence ({bins} bins)", ylabel="accuracy")
    ax.set_title(f"{title}\nECE {percent(figures['ece'])}, {figures['images']} images", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def contact_sheet(items: list[dict], path: Path, title: str, tile: int = 112, columns: int = 8) -> None:
    """The images of ``items`` (each: ``image``, a Pillow image; ``lines``, two captions) in a grid, as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    caption, pad, head = 14, 6, 24
    rows = max(1, -(-len(items) // columns))
    width = columns * (tile + pad) + pad
    sheet = Image.new("RGB", (width, head + rows * (tile + 2 * caption + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 6), title, fill="black", font=font)
    for n, item in enumerate(items):
        x = pad + (n % columns) * (tile + pad)
        y = head + (n // columns) * (tile + 2 * caption + pad)
        img = item["image"].convert("RGB")
        scale = min(tile / img.width, tile / img.height)  # small images (28 px digits) grow, pixels kept sharp
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)
        sheet.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        draw.rectangle((x - 1, y - 1, x + tile, y + tile), outline="grey")
        for i, text in enumerate(item["lines"][:2]):
            draw.text((x, y + tile + 2 + i * caption), _fit(draw, text, font, tile), fill=("navy", "darkred")[i],
                      font=font)
    sheet.save(path, "PNG")


def _fit(draw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def replay_markdown(report: dict, sheet: str | None) -> str:
    c = report["comparison"]
    lines = [f"# Replay of {report['capture']}: {report['candidate']} against {report['baseline']}", "",
             f"{c['images']} captured images replayed"
             + (f"; rows skipped as their image is gone (the capture's byte budget): "
                f"{report['skipped']['image_gone']}" if report["skipped"]["image_gone"] else "") + ".", "",
             "| measure | value |", "|---|---|",
             f"| top-1 agreement | {percent(c['agreement'])} ({c['images'] - c['disagreements']} of {c['images']}) |",
             f"| mean abs. change of the baseline's top-1 probability | {c['mean_abs_delta_p']:.4f} |"]
    for who in ("candidate", "baseline"):
        acc = report["accuracy"].get(who)
        if acc is not None:
            lines.append(f"| {who} accuracy on the {report['accuracy']['labelled']} labelled images | "
                         f"{percent(acc)} |")
    if report["accuracy"]["labelled"] == 0:
        lines += ["", "No captured image has a label yet (a row's `label`, or `labels.jsonl`): no accuracy."]
    if sheet:
        lines += ["", f"![the images they disagree on]({sheet})"]
    if report["disagreements"]:
        lines += ["", "| id | baseline | candidate |", "|---|---|---|"]
        lines += [f"| {d['id']} | {d['baseline']} ({d['baseline_p']:.3f}) | {d['candidate']} "
                  f"({d['candidate_p']:.3f}) |" for d in report["disagreements"][:50]]
    return "\n".join(lines) + "\n"
