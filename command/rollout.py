"""The offline half of a rollout: ``cnnserve evaluate`` (a model against labelled images) and ``cnnserve replay``
(a candidate model over a traffic capture, against what was answered or against another version run now).

Both run the model here, as ``cnnserve score``'s local engine does (the same decoding under the service's image
limits, onnxruntime, no torch), and write a report folder: report.json, report.md and PNGs (``rollout_report``).

What they read and how they run a model: ``rollout_inputs.py``.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from cnnserve.core.config import DEFAULTS, PRECISIONS
from cnnserve.core.preprocess import IMAGE_EXTENSIONS

from .rollout_inputs import LABELS_FILE, calibrated_as, load, manifests, read_capture, run_model

SHEET_MAX = 96  # disagreements drawn on the contact sheet at most (all are in report.json)


# --- evaluate -------------------------------------------------------------------------------------------------

def labelled_images(folder: Path, labels_file: str | None, column: str) -> tuple[list[str], list[str], int, str]:
    """(image paths, their labels, images found without a label, where the labels came from)."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if labels_file:
        return _from_labels_file(folder, Path(labels_file), column)
    if manifests(folder):  # a capture: the labels feedback gave
        rows, _ = read_capture(folder)
        paths = [r["file"] for r in rows if r.get("label") is not None]
        return (paths, [str(r["label"]) for r in rows if r.get("label") is not None], len(rows) - len(paths),
                f"the capture's feedback (rows' label, {LABELS_FILE})")
    paths, labels, unlabelled = [], [], 0
    for f in sorted(folder.rglob("*")):
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
            parts = f.relative_to(folder).parts
            if len(parts) < 2:
                unlabelled += 1
            else:
                paths.append(str(f))
                labels.append(parts[0])
    return paths, labels, unlabelled, "the sub-folder names"


def _from_labels_file(folder: Path, file: Path, column: str) -> tuple[list[str], list[str], int, str]:
    """A CSV (header) or JSON Lines file of ``path`` (relative to FOLDER) and ``column``; on a capture, ``id``
    may name the image instead of ``path``."""
    if not file.is_file():
        raise ValueError(f"--labels {file}: no such file")
    if file.suffix.lower() == ".csv":
        with file.open(newline="", encoding="utf-8") as f:
            entries = list(csv.DictReader(f))
    elif file.suffix.lower() == ".jsonl":
        entries = []
        with file.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        entries.append(dict(json.loads(line)))
                    except (ValueError, TypeError):
                        raise ValueError(f"--labels {file}:{i}: not a JSON object") from None
    else:
        raise ValueError(f"--labels {file}: a .csv or .jsonl file of path (or id) and {column}")
    by_id = {str(r.get("id")): r["file"] for r in read_capture(folder)[0]} if manifests(folder) else {}
    paths, labels, unlabelled = [], [], 0
    for i, entry in enumerate(entries, 1):
        label = entry.get(column)
        where = entry.get("path") or by_id.get(str(entry.get("id")))
        if where is None:
            raise ValueError(f"--labels {file}: entry {i} has no 'path'" + (" nor an 'id' of the capture" if by_id
                                                                              else ""))
        if label in (None, ""):
            unlabelled += 1
            continue
        paths.append(str(folder / where))
        labels.append(str(label))
    return paths, labels, unlabelled, f"{file} (column {column!r})"


def _cmd_evaluate(args) -> int:
    from . import rollout_report as rr
    from .serve import settings_from

    folder = Path(args.folder)
    paths, truth, unlabelled, source = labelled_images(folder, args.labels, args.label_column)
    if not paths:
        raise ValueError(f"{folder}: no labelled images ({unlabelled} images without a label): give it one "
                         f"sub-folder per class, named as the model's classes, or --labels FILE")
    model, shown, _ = load(args.model, args.precision, args.providers, args.batch_size)
    classes = list(model.spec.labels)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({t for t in truth if t not in index})
    if unknown:
        raise ValueError(f"{folder}: labelled with classes {shown} lacks: {', '.join(map(repr, unknown[:10]))}"
                         f"{', ...' if len(unknown) > 10 else ''} (from {source}); its classes: "
                         f"{', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''}")
    k = args.top_k if args.top_k is not None else min(5, len(classes))
    if not 1 <= k <= len(classes):
        raise ValueError(f"--top-k {k}: {shown} has {len(classes)} classes; give --top-k between 1 and them")
    print(f"evaluating {shown} on {len(paths)} labelled images of {folder} (labels from {source})", file=sys.stderr)
    _, probs, errors = run_model(model, paths, shown, args.batch_size, settings_from(args.arg))
    ok = np.array([not e for e in errors], bool)
    if not ok.any():
        raise ValueError(f"{folder}: none of the {len(paths)} labelled images could be read (first: "
                         f"{paths[0]}: {errors[0]})")
    targets = np.array([index[t] for t in truth])
    figures = rr.classification_figures(probs[ok].astype(np.float64), targets[ok], classes, k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{shown} on {folder.name or folder}"
    pictures = {"confusion matrix": rr.confusion_png(figures, classes, out / "confusion.png", title),
                "reliability diagram": rr.reliability_png(figures, out / "reliability.png", title)}
    pred = probs.argmax(axis=1)
    report = {"model": shown, "folder": str(folder), "labels_from": source, "unlabelled": unlabelled,
              "ece_definition": f"{rr.BINS} equal-width bins of the top-1 confidence, (lo, hi]; sum of "
                                "|accuracy - mean confidence| weighted by each bin's share of the images",
              "figures": figures, "top_confusions": rr.top_confusions(figures["confusion"], classes),
              "failed": [{"path": p, "error": e} for p, e in zip(paths, errors) if e],
              "mistakes": [{"path": p, "true": t, "predicted": classes[int(q)], "probability": round(float(pr[q]), 6)}
                           for p, t, q, pr, good in zip(paths, truth, pred, probs, ok)
                           if good and classes[int(q)] != t]}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(rr.evaluation_markdown(report, pictures))
    print(f"accuracy {rr.percent(figures['accuracy'])}, top-{k} {rr.percent(figures['top_k_accuracy'])}, "
          f"ECE {rr.percent(figures['ece'])} on {figures['images']} images"
          + (f" ({len(report['failed'])} could not be read)" if report["failed"] else "") + f"; report in {out}/",
          file=sys.stderr)
    for name, where in pictures.items():
        if not where.endswith(".png"):
            print(f"{name} {where}", file=sys.stderr)
    if args.min_accuracy is not None and figures["accuracy"] < args.min_accuracy:
        print(f"accuracy {figures['accuracy']:.4f} is under --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


# --- replay ---------------------------------------------------------------------------------------------------

def _cmd_replay(args) -> int:
    from . import rollout_report as rr
    from .serve import settings_from

    folder = Path(args.capture)
    rows, skipped = read_capture(folder)
    candidate, cand_shown, cand_name = load(args.model, args.precision, args.providers, args.batch_size)
    of = args.of or cand_name
    if of:
        held = Counter(str(r.get("model")) for r in rows)
        rows = [r for r in rows if r.get("model") == of]
        if not rows:
            raise ValueError(f"{folder}: no captured answer of model {of!r} with its image (the capture holds "
                             f"{dict(held) or 'none'}); --of NAME replays another model's")
    rows = rows[-args.limit:] if args.limit else rows
    if args.against:
        baseline, base_shown, _ = load(args.against, args.precision, args.providers, args.batch_size)
    else:
        rows = [r for r in rows if r.get("labels") and r.get("probabilities")]
        if not rows:
            raise ValueError(f"{folder}: no row records an answer (labels, probabilities); give --against")
        versions = Counter(f"{r.get('model')}:{r.get('version')}" for r in rows)
        base_shown = "the recorded answers of " + ", ".join(f"{v} ({n})" for v, n in versions.most_common(5))
    paths = [r["file"] for r in rows]
    settings = settings_from(args.arg)
    calibrated = np.array([r.get("calibrated") is not False for r in rows], bool)
    logits, probs, errors = run_model(candidate, paths, cand_shown, args.batch_size, settings)
    cand_labels = list(candidate.spec.labels)
    cand = calibrated_as(candidate, logits, probs, calibrated)
    if args.against:
        b_logits, b_probs, b_errors = run_model(baseline, paths, base_shown, args.batch_size, settings)
        base = calibrated_as(baseline, b_logits, b_probs, calibrated)
        base_labels = list(baseline.spec.labels)
        base_top = [base_labels[int(i)] if not e else None for i, e in zip(np.nan_to_num(base).argmax(1), b_errors)]
        base_p = [float(base[j, base_labels.index(t)]) if t is not None else None for j, t in enumerate(base_top)]
    else:
        base_top = [str(r["labels"][0]) for r in rows]
        base_p = [float(r["probabilities"][0]) for r in rows]
    position = {c: i for i, c in enumerate(cand_labels)}
    compared, disagreements, deltas = [], [], []
    for j, row in enumerate(rows):
        if errors[j] or base_top[j] is None:
            continue
        top = cand_labels[int(np.argmax(cand[j]))]
        p_same = float(cand[j, position[base_top[j]]]) if base_top[j] in position else 0.0
        deltas.append(abs(p_same - base_p[j]))
        compared.append((j, top))
        if top != base_top[j]:
            disagreements.append({"id": row.get("id"), "path": row["path"], "baseline": base_top[j],
                                  "baseline_p": round(base_p[j], 6), "candidate": top,
                                  "candidate_p": round(float(cand[j].max()), 6),
                                  "candidate_p_of_baseline": round(p_same, 6),
                                  **({"label": row["label"]} if row.get("label") is not None else {})})
    if not compared:
        raise ValueError(f"{folder}: none of the {len(rows)} captured images could be replayed (first: "
                         f"{paths[0]}: {errors[0]})")
    labelled = [(j, top) for j, top in compared if rows[j].get("label") is not None]
    accuracy = {"labelled": len(labelled)}
    if labelled:
        accuracy["candidate"] = round(sum(top == str(rows[j]["label"]) for j, top in labelled) / len(labelled), 6)
        accuracy["baseline"] = round(sum(base_top[j] == str(rows[j]["label"]) for j, _ in labelled) / len(labelled), 6)
    disagreements.sort(key=lambda d: -abs(d["candidate_p_of_baseline"] - d["baseline_p"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sheet = None
    if disagreements:
        sheet = "disagreements.png"
        rr.contact_sheet([{"image": _thumbnail(folder / d["path"]),
                           "lines": [f"was {d['baseline']} {d['baseline_p']:.2f}",
                                     f"now {d['candidate']} {d['candidate_p']:.2f}"]}
                          for d in disagreements[:SHEET_MAX]], out / sheet,
                         f"{cand_shown} against {base_shown}: {len(disagreements)} of {len(compared)} disagree"
                         + (f" (the first {SHEET_MAX} by change of probability)" if len(disagreements) > SHEET_MAX
                            else ""))
    comparison = {"images": len(compared), "disagreements": len(disagreements),
                  "agreement": round(1 - len(disagreements) / len(compared), 6),
                  "mean_abs_delta_p": round(float(np.mean(deltas)), 6)}
    report = {"capture": str(folder), "candidate": cand_shown, "baseline": base_shown, "of": of,
              "comparison": comparison, "accuracy": accuracy,
              "skipped": {"image_gone": skipped["image_gone"], "bad_line": skipped["bad_line"],
                          "failed": [{"path": rows[j]["path"], "error": errors[j]} for j in range(len(rows))
                                     if errors[j]]},
              "disagreements": disagreements}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(rr.replay_markdown(report, sheet))
    print(f"top-1 agreement {rr.percent(comparison['agreement'])} ({len(disagreements)} of {len(compared)} differ), "
          f"mean |delta p| {comparison['mean_abs_delta_p']:.4f}"
          + (f"; accuracy on {len(labelled)} labelled: candidate {rr.percent(accuracy['candidate'])}, baseline "
             f"{rr.percent(accuracy['baseline'])}" if labelled else "") + f"; report in {out}/", file=sys.stderr)
    if args.min_agreement is not None and comparison["agreement"] < args.min_agreement:
        print(f"agreement {comparison['agreement']:.4f} is under --min-agreement {args.min_agreement}", file=sys.stderr)
        return 1
    return 0


def _thumbnail(path: Path):
    """The captured image as the service decoded it (its limits hold), or a grey tile where it cannot be."""
    from PIL import Image

    from cnnserve.core.preprocess import decode, read_file

    try:
        return decode(read_file(path, DEFAULTS.limits.max_bytes), DEFAULTS.limits, target=(112, 112))
    except Exception:  # the sheet still shows the others; report.json names the file
        return Image.new("L", (112, 112), 128)


# --- the command line -----------------------------------------------------------------------------------------

def _common(p, out: str) -> None:
    p.add_argument("--out", "-o", default=out, help="the report folder: report.json, report.md and PNGs (made "
                                                    "if missing; its files are replaced)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.max_batch_size, help="images per onnxruntime run")
    p.add_argument("--providers", default=DEFAULTS.providers, help="auto, cuda, cpu")
    p.add_argument("--precision", default=DEFAULTS.precision, choices=PRECISIONS,
                   help="the model's verified variant to run (auto: the fastest here, as the service chooses)")
    p.add_argument("--arg", action="append", default=[],
                   help="a service setting KEY=VALUE (repeatable): the image limits hold here as in the service")


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="a model's accuracy, per-class recall, confusion and calibration on "
                                        "labelled images",
                       description="Score labelled images with the model (onnxruntime, the service's decoding) "
                                   "and write report.json, report.md, confusion.png and reliability.png: accuracy, "
                                   "top-k accuracy, per-class recall and precision, ECE (15 equal-width bins). "
                                   "Labels: the sub-folder names, a capture's feedback, or --labels.")
    p.add_argument("model", help="an exported .onnx file or a model store tag (NAME:VERSION)")
    p.add_argument("folder", help="one sub-folder per class named as the model's classes, or a capture folder")
    p.add_argument("--labels", help="a .csv or .jsonl of path (relative to FOLDER; on a capture, or id) and the "
                                    "label column, instead of the sub-folder names")
    p.add_argument("--label-column", default="label", help="--labels' column of class names")
    p.add_argument("--top-k", type=int, help="k of the top-k accuracy (default 5, or the classes where fewer)")
    p.add_argument("--min-accuracy", type=float, help="exit 1 where the top-1 accuracy is under this fraction")
    _common(p, "evaluation")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("replay", help="run a candidate model over a traffic capture and compare its answers",
                       description="Run the candidate over a capture's images (service/capture.py writes them) and "
                                   "compare with the answers recorded there, or with --against run now: top-1 "
                                   "agreement, mean absolute change of the baseline's top-1 probability, accuracy "
                                   "where feedback labelled the images, and the images they disagree on as a "
                                   "contact sheet (disagreements.png).")
    p.add_argument("capture", help="a capture folder (images/ and manifest-<n>.jsonl)")
    p.add_argument("--model", required=True, help="the candidate: a model store tag NAME:VERSION or an .onnx file")
    p.add_argument("--against", help="a baseline run now (NAME:VERSION or .onnx) instead of the recorded answers")
    p.add_argument("--of", help="the captured model whose answers to replay (default: --model's name; every row "
                                "where --model is a file)")
    p.add_argument("--limit", type=int, help="the newest LIMIT captured images only")
    p.add_argument("--min-agreement", type=float, help="exit 1 where the top-1 agreement is under this fraction")
    _common(p, "replay")
    p.set_defaults(func=_cmd_replay)
