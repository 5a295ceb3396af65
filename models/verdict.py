"""The end of a training run in plain words: whether the model is weak, why, and what to try.

A run that ends near chance, with training accuracy far above validation, or while validation accuracy
was still rising says so in its output and in metrics.json (``verdict``), so a weak model is never let
through in silence; a fine run says nothing alarming. The thresholds are coarse on purpose (they judge a
run, not a benchmark), as a share of the way from chance (1/classes) to 100%:

- near chance: the test accuracy is within the first ``NEAR_CHANCE`` of that way;
- weak: within the first ``WEAK`` of it;
- overfitting: the last epoch's training accuracy is ``OVERFIT_GAP`` or more above the best validation
  accuracy;
- still improving when it stopped: the best validation epoch was the last one run, and it gained
  ``STILL_RISING`` or more over the epochs before the last quarter of the run (a one-epoch run always counts);
- unsteady (a note): test and best validation accuracy ``UNSTEADY`` or more apart, as small splits give.

Near chance, weak and overfitting make the status ``weak``; the others are notes.
"""

from __future__ import annotations

NEAR_CHANCE = 0.2
WEAK = 0.5
OVERFIT_GAP = 0.15
STILL_RISING = 0.02
UNSTEADY = 0.10
# suggestions more than one finding may make, written once so that the list names each once
PRETRAINED = "--pretrained WEIGHTS (fine-tune a network trained on many images; docs/models.md)"
MORE_IMAGES = "more training images"


def _finding(code: str, level: str, message: str, tries: list[str]) -> dict:
    return {"code": code, "level": level, "message": message, "try": "; ".join(dict.fromkeys(t for t in tries if t))}


def _first_words(text: str) -> str:
    return text.split(" (")[0]


def _data_tries(ctx: dict, classes: int) -> list[str]:
    """What may lift a model that learned too little from its data."""
    tries = []
    if ctx.get("data") == "folder" and ctx.get("resize") == "center-crop":
        tries.append("--resize whole (the centre crop drops the edges of full-frame photos)")
    if ctx.get("limit"):
        tries.append(f"{MORE_IMAGES} (--limit kept {ctx['limit']})")
    elif ctx.get("n_train") and ctx["n_train"] / classes < 100:
        tries.append(f"{MORE_IMAGES} ({ctx['n_train'] / classes:.0f} a class is few for a network trained from "
                     "scratch)")
    if not ctx.get("pretrained") and ctx.get("channels") == 3:
        tries.append(PRETRAINED)
    return tries


def judge(test_accuracy: float, n_test: int, classes: int, history: list[dict], context: dict | None = None) -> dict:
    """The verdict on a finished run: ``status`` (``ok`` or ``weak``), ``chance``, and ``findings`` (each with
    ``code``, ``level`` (warning or note), ``message`` and ``try``). ``history`` is the run's per-epoch rows
    (``epoch``, ``train_accuracy``, ``val_accuracy``); ``context`` what the suggestions may name (``epochs``,
    ``data``, ``resize``, ``limit``, ``n_train``, ``pretrained``, ``augment``, ``channels``)."""
    ctx = context or {}
    classes = max(1, classes)
    chance = 1.0 / classes
    way = (test_accuracy - chance) / (1 - chance) if classes > 1 else 1.0
    findings = []
    last = history[-1] if history else {"epoch": 0, "train_accuracy": 0.0, "val_accuracy": 0.0}
    best_val = max((r["val_accuracy"] for r in history), default=0.0)
    best_epoch = next((r["epoch"] for r in history if r["val_accuracy"] == best_val), 0)
    before = [r["val_accuracy"] for r in history[:-max(1, len(history) // 4)]]
    rising = bool(history) and best_epoch == last["epoch"] and (not before or best_val - max(before) >= STILL_RISING)
    epochs = ctx.get("epochs") or last["epoch"]
    more_epochs = f"more epochs (--epochs {max(2 * epochs, epochs + 5)})"
    # training accuracy itself less than half way from chance: the network has not fitted even what it saw
    underfit = last["train_accuracy"] - chance < WEAK * (1 - chance)
    learn_more = ([more_epochs] if rising else
                  [f"another --lr, or a smaller architecture (the training accuracy is low too, "
                   f"{last['train_accuracy']:.1%}: it has not fitted even the images it saw)"] if underfit else [])
    if way <= NEAR_CHANCE:
        findings.append(_finding("near_chance", "warning",
                                 f"near chance: test accuracy {test_accuracy:.1%} against {chance:.1%} for a guess "
                                 f"among {classes} classes ({n_test} test images); this model has learned little",
                                 learn_more + _data_tries(ctx, classes)))
    elif way < WEAK:
        findings.append(_finding("weak", "warning",
                                 f"weak: test accuracy {test_accuracy:.1%}, less than half way from chance "
                                 f"({chance:.1%}, {classes} classes) to 100% ({n_test} test images)",
                                 learn_more + _data_tries(ctx, classes)))
    gap = last["train_accuracy"] - best_val
    if history and gap >= OVERFIT_GAP and not underfit:
        tries = ["--augment (random crops and flips)" if not ctx.get("augment") else "",
                 "--weight-decay 5e-4", "--label-smoothing 0.1", MORE_IMAGES,
                 "--freeze-backbone (only the head learns)" if ctx.get("pretrained") else
                 (PRETRAINED if ctx.get("channels") == 3 else "")]
        findings.append(_finding("overfitting", "warning",
                                 f"overfitting: training accuracy {last['train_accuracy']:.1%} in the last epoch, "
                                 f"validation accuracy {best_val:.1%} at best ({gap * 100:.0f} points apart): it "
                                 "learned its training images more than the task", tries))
    if rising:
        findings.append(_finding(
            "still_improving", "note",
            f"still improving when it stopped: the best validation accuracy ({best_val:.1%}) came in the last epoch "
            f"({last['epoch']} of {len(history)} run)", [more_epochs]))
    if n_test and abs(test_accuracy - best_val) >= UNSTEADY:
        findings.append(_finding(
            "unsteady", "note",
            f"unsteady figures: test accuracy {test_accuracy:.1%} against validation {best_val:.1%}; with "
            f"{n_test} test images one image moves it {1 / n_test:.1%}",
            ["more held-out images (a folder's own val/ and test/ sub-folders)"]))
    status = "weak" if any(f["level"] == "warning" for f in findings) else "ok"
    return {"status": status, "test_accuracy": test_accuracy, "chance": chance, "classes": classes,
            "n_test": n_test, "best_epoch": best_epoch, "epochs_run": len(history), "findings": findings}


def format_verdict(verdict: dict) -> str:
    """The verdict as the lines ``cnnserve train`` ends with."""
    lines = []
    if verdict["status"] == "weak":
        lines.append("verdict: WEAK MODEL, not ready to serve as it is")
    else:
        lines.append(f"verdict: ok: test accuracy {verdict['test_accuracy']:.1%} against {verdict['chance']:.1%} "
                     f"chance ({verdict['classes']} classes), no sign of overfitting")
    for f in verdict["findings"]:
        lines.append(f"  - {f['message']}")
    tries = {}  # one suggestion once, by its words before any explanation in brackets
    for f in verdict["findings"]:
        for t in f["try"].split("; "):
            if t:
                tries.setdefault(_first_words(t), t)
    tries = list(tries.values())
    if tries:
        lines.append("  try: " + "; ".join(tries))
    return "\n".join(lines)
