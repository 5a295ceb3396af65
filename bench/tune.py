"""``cnnserve tune MODEL``: the service's settings chosen by measurement, on the machine it will run on.

The command: its arguments, the model's knobs (its verified precisions; the GPU's where onnxruntime runs on
CUDA), the search of ``bench/tune_search.py`` within the budget, and the files of ``bench/tune_report.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from .tune_search import Tuner, knobs, log


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value
    return parse


def add_parser(sub) -> None:
    """``cnnserve tune``'s parser (registered by ``cnnserve/cli.py``)."""
    doc = ("Choose the service's settings by measurement on this machine: start the real service with candidate "
           "settings, drive it with wrk and the model's own held-out images, hill-climb from the defaults to the "
           "setting that serves most over every --concurrency (the geometric mean of its req/s) with p99 within "
           "--p99-ms at each, check the winner against the "
           "defaults (3 interleaved runs each), and write the service arguments (`bentoml serve --arg-file "
           "tuned.yaml`) with a Markdown report and a PNG of every trial.")
    p = sub.add_parser("tune", help="choose the service's settings for a model by measuring them here",
                       description=doc)
    p.add_argument("model", help="a model store tag, e.g. lenet5-digits:latest")
    p.add_argument("--p99-ms", type=_positive(float), default=100.0, help="p99 latency limit (default %(default)s)")
    p.add_argument("--concurrency", type=_positive(int), nargs="+", default=[1, 8, 64],
                   help="connections in flight; each trial runs at each (default 1 8 64)")
    p.add_argument("--budget-min", type=_positive(float), default=10.0,
                   help="minutes for the search and the check (default %(default)s)")
    p.add_argument("--out", default="tuned.yaml", help="service arguments to write (default %(default)s; the report "
                                                       "beside it: .md, .png, .json)")
    p.add_argument("--duration", type=_positive(float), default=5.0, help="seconds per measured run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each trial's first run")
    p.add_argument("--max-trials", type=_positive(int), default=100, help="stop the search after this many trials")
    p.set_defaults(func=command)


def command(a: argparse.Namespace) -> int:
    import shutil

    from cnnserve.core.onnxmeta import MODEL_FILE, variant_file
    from cnnserve.core.store import stored_model

    from . import tune_report
    from cnnserve.core.runtime import cuda_works

    if not shutil.which("wrk"):
        raise ValueError("wrk is not installed (Debian: apt-get install wrk); tune drives the service with it")
    if a.warmup < 0:
        raise ValueError(f"--warmup {a.warmup}: must be 0 or more")
    a.concurrency = sorted(set(a.concurrency))
    stored = stored_model(a.model)  # NotStored names the tag and how to store it
    onnx = stored.path_of(MODEL_FILE)
    gpu = cuda_works()  # on CUDA: fp16 is a candidate, and the GPU's knobs join
    precisions = ["fp32", *(p for p in (("fp16", "int8") if gpu else ("int8",)) if os.path.isfile(variant_file(onnx, p)))]
    space = knobs(precisions, gpu)
    work = Path(tempfile.mkdtemp(prefix="cnnserve-tune-"))
    tuner = Tuner(a.model, stored.tag.name, space, work, a)
    refusal, warning = tuner.budget_check()
    if refusal:
        shutil.rmtree(work, ignore_errors=True)
        raise ValueError(refusal)
    log(f"tuning {stored.tag} for p99 <= {a.p99_ms:g} ms at {' '.join(map(str, a.concurrency))} connections, "
        f"{a.budget_min:g} min; knobs: {', '.join(space)}")
    if warning:
        log(warning)
    try:
        defaults, best = tuner.search()
        check = None
        if best is not defaults and best.get("meets"):
            check = tuner.confirm(defaults, best)
            log(f"check: winner {check['median']['winner']:.0f} req/s (runs {_spread(check['rates']['winner'])}), "
                f"defaults {check['median']['defaults']:.0f} (runs {_spread(check['rates']['defaults'])}): "
                + ("kept" if check["kept"] else "not beyond the spread, the defaults stay"))
    except RuntimeError as e:  # a server that would not start for the check, wrk failing: one line, no traceback
        raise ValueError(f"tune stopped: {str(e).splitlines()[0]}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = tune_report.write(a, stored, tuner, defaults, best, check)
    for line in result["summary"]:
        log(line)
    log(f"{len(tuner.trials)} trials ran" + (f"; the search stopped early ({tuner.stopped}), so the knobs' other "
                                             "steps were not tried" if tuner.stopped else ""))
    log(f"wrote {a.out} and its report ({result['md']}, {result['png']})")
    return 0 if result["met"] else 1


def _spread(rates: list[float]) -> str:
    return ", ".join(f"{r:.0f}" for r in rates)
