"""Batch scoring: folders, globs or manifests of images to a predictions file.

    cnnserve score photos/ --model lenet5-digits:latest --out preds.csv
    cnnserve score 'imgs/**/*.png' --model runs/x/model.onnx --out preds.parquet --engine ray
    cnnserve score manifest.csv --engine http --url http://127.0.0.1:3000 --out preds.jsonl --resume

Every engine decodes with ``cnnserve.core.preprocess`` and runs the exported graph, like the
HTTP service, so all give the same answers. Output goes to disk batch by batch: a
killed run leaves a valid partial file and ``--resume`` completes it, scoring each
input exactly once. A file that cannot be read or decoded gets a row with its error.

The parts live in ``scoring/``: inputs, writers, engines. No torch.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from cnnserve.core.config import DEFAULT_MODEL, DEFAULTS, Settings, cores
from cnnserve.core.onnxmeta import MODEL_FILE
from cnnserve.core.store import NotStored, stored_model

from cnnserve.core.runtime import ModelLoadError, load_model
from . import ScoreError, printable, row
from . import DECODERS, ENGINES
from .engines import Stats, score_http, score_local, score_ray
from .grpc_engine import score_grpc
from .inputs import collect_inputs
from .writers import Writer, files_of, read_predictions

__all__ = ["ScoreError", "collect_inputs", "read_predictions", "score", "resolve_model"]


PROGRESS_LOG_S = 5.0  # where stderr is not a terminal: a progress line this often


def progress_line(done: int, total: int, rate: float, failed: int, elapsed: float) -> str:
    """What the bar shows, as one line for a log: ``scoring: 1,200/2,000 (60%), 410 img/s, 3 failed, ETA 2s``."""
    left = (total - done) / rate if rate > 0 else float("nan")
    eta = f"{left:.0f}s" if left == left else "?"
    return (f"scoring: {done:,}/{total:,} ({done / max(total, 1):.0%}), {rate:.0f} img/s, {failed} failed, "
            f"{elapsed:.0f}s elapsed, ETA {eta}")


def resolve_model(model: str) -> tuple[str, str]:
    """An ONNX file, or a model store tag: (path of the ONNX file, display name)."""
    p = Path(model)
    if p.suffix == ".onnx" or p.exists():
        if not p.is_file():
            raise ScoreError(f"{model}: no such ONNX file")
        return str(p), p.name
    try:
        stored = stored_model(model)
    except NotStored as e:
        raise ScoreError(f"{model}: no such ONNX file, and {e}") from None
    return stored.path_of(MODEL_FILE), str(stored.tag)


def check_top_k(top_k: int | None, model: str, labels: list[str] | int) -> int:
    """The service's rule for top-k: None (not given) is the default clamped to the model's classes; a value
    given must be between 1 and them, as the service answers 400 ``bad_top_k`` otherwise (scoring clamped it
    without a word). Returns the top-k to write."""
    n = labels if isinstance(labels, int) else len(labels)
    if top_k is None:
        return min(DEFAULTS.top_k, n)
    if not 1 <= top_k <= n:
        names = "" if isinstance(labels, int) else \
            f" ({', '.join(labels[:10])}{', ...' if n > 10 else ''})"
        raise ScoreError(f"--top-k {top_k}: {model} has {n} classes{names}; give --top-k between 1 and {n} (the "
                         f"service answers top_k={top_k} with 400 bad_top_k too)")
    return top_k


def _served_classes(url: str, model: str | None) -> tuple[str, list[str]]:
    """The service's model (``model``, or its default): its name and labels (to check top-k before the first
    request)."""
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/models", timeout=30)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise ScoreError(f"{url}: no cnnserve service answers there ({e})") from None
    info = r.json()
    name = model or info["default"]
    for m in info["models"]:
        if m["name"] == name:
            return f"{url}'s model {name!r}", list(m["labels"])
    raise ScoreError(f"{url}: serves no model {name!r} (it serves {', '.join(m['name'] for m in info['models'])})")


def _grpc_classes(url: str, model: str | None) -> int:
    """The same over gRPC (the model's metadata)."""
    import grpc

    from .grpc_engine import served_classes

    try:
        return served_classes(url, model)
    except grpc.RpcError as e:
        raise ScoreError(f"{url}: no cnnserve gRPC service serves model {model or '(default)'!r} there "
                         f"({e.code().name}: {e.details()})") from None


def score(inputs: list[str], out: str, *, model: str | None = None, engine: str = "local",
          top_k: int | None = None, batch_size: int = DEFAULTS.max_batch_size, workers: int | None = None,
          url: str | None = None, concurrency: int = 16, ray_address: str | None = None,
          providers: str = DEFAULTS.providers, precision: str = DEFAULTS.precision, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None, decoders: str = "auto", settings: Settings = DEFAULTS) -> dict:
    """Score ``inputs`` into ``out``; returns the summary. Ctrl+C stops after the current batch. An image
    is held to ``settings``' limits, as the service with those settings would hold it."""
    limits = settings.limits
    if engine not in ENGINES:
        raise ScoreError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if decoders not in DECODERS:
        raise ScoreError(f"unknown decoders {decoders!r}; valid: {', '.join(DECODERS)}")
    remote = engine in ("http", "grpc")
    if remote and not url:
        raise ScoreError(f"--engine {engine} needs --url of a running cnnserve service"
                         + (" (its gRPC port: host:3001)" if engine == "grpc" else ""))
    if not remote and not model:
        model = DEFAULT_MODEL  # the service's default
    workers = workers or cores()
    found = collect_inputs(inputs, outputs=files_of(Path(out)))
    for p in found.outputs:
        print(f"{printable(p)}: skipped, it is this run's output", file=sys.stderr)
    local_model = None
    if engine == "http":
        top_k = check_top_k(top_k, *_served_classes(url, model))
    elif engine == "grpc":
        top_k = check_top_k(top_k, f"{url}'s model {model or '(the default)'}", _grpc_classes(url, model))
    else:
        model_path, shown = resolve_model(model)
        if shown == Path(model_path).name:  # a file: as the user named it
            shown = str(model)
        # the precision the service would choose (auto: timed here at the scoring batch size)
        try:
            local_model = load_model(model_path, providers=providers, warm_up=False, precision=precision,
                                     batch_sizes=(batch_size,))
        except ModelLoadError as e:
            raise ScoreError(str(e)) from None
        top_k = check_top_k(top_k, f"model {shown} ({local_model.spec.arch})", list(local_model.spec.labels))
        model_path = local_model.choice.get("file", model_path)
        print(f"model {model_path} ({local_model.info.precision}, {precision} precision"
              + (f": {local_model.choice['reason']}" if "reason" in local_model.choice else "") + ")", file=sys.stderr)
        if engine == "local":  # the first run at a new batch size allocates: do it before the clock starts
            local_model.warm_up((batch_size,))
    writer = Writer(Path(out), top_k, resume, overwrite)
    todo = [p for p in found.paths if not writer.has(p)]
    bad = [b for b in found.bad if not writer.has(b[0])]
    stats, t0 = Stats(), time.perf_counter()
    total = len(todo) + len(bad)
    skipped = len(found.paths) + len(found.bad) - total
    print(f"scoring {total} inputs ({skipped} already in {out}) with the {engine} engine", file=sys.stderr)
    if bad:
        for where, problem in bad:
            print(f"{where}: {problem}", file=sys.stderr)
        writer.write([row(where, None, problem) for where, problem in bad])
        stats.failed += len(bad)

    if engine == "local":
        batches = score_local(todo, local_model, top_k, batch_size, workers, stats, decoders, limits)
    elif engine == "http":
        batches = score_http(todo, url.rstrip("/"), model, top_k, batch_size, concurrency, stats, limits=limits)
    elif engine == "grpc":
        batches = score_grpc(todo, url, model, top_k, batch_size, concurrency, stats, limits=limits)
    else:
        batches = score_ray(todo, model_path, top_k, batch_size, workers, providers, ray_address, stats, limits)

    interrupted = False
    previous = signal.getsignal(signal.SIGINT)

    def stop(*_):
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, stop)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.0f} img/s"), TextColumn("{task.fields[failed]} failed"),
               TextColumn("ETA"), TimeRemainingColumn()]
    wanted = set(todo) | {where for where, _ in bad}
    finished = False
    console = Console(stderr=True)
    # Not a terminal (a log file, a pipe, a CI job): no bar, whose redraws never reach it, but one plain
    # line after the first batch and then every PROGRESS_LOG_S seconds.
    log_lines = progress is not False and not console.is_terminal
    logged_at = None
    try:
        with Progress(*columns, disable=progress is False or log_lines, transient=False, console=console) as bar:
            task = bar.add_task("score", total=total, completed=len(bad), rate=0.0, failed=stats.failed)
            for rows in batches:
                writer.write(rows)
                failed = sum(1 for r in rows if r["error"])
                stats.failed += failed
                stats.scored += len(rows) - failed
                elapsed = time.perf_counter() - t0
                rate = (stats.scored + stats.failed) / max(elapsed, 1e-9)
                bar.update(task, advance=len(rows), rate=rate, failed=stats.failed)
                if log_lines and (logged_at is None or elapsed - logged_at >= PROGRESS_LOG_S):
                    logged_at = elapsed
                    print(progress_line(stats.scored + stats.failed, total, rate, stats.failed, elapsed),
                          file=sys.stderr, flush=True)
                if interrupted:
                    break
        finished = not interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        missing = {p for p in wanted if not writer.has(p)}
        # Finalized only when every input has its row: an error that stopped the run, or an engine
        # that came back short, leaves the partial file (or Parquet journal) for --resume.
        writer.close(complete=finished and not missing)
    if missing and not interrupted:
        raise ScoreError(f"{len(missing)} inputs got no row (first: {printable(min(missing))}); "
                         f"{writer.journal} is kept: run the same command with --resume")
    elapsed = time.perf_counter() - t0
    summary = {"inputs": len(found.paths) + len(found.bad), "already_done": skipped, "scored": stats.scored,
               "failed": stats.failed, "seconds": round(elapsed, 2),
               "images_per_s": round((stats.scored + stats.failed) / max(elapsed, 1e-9), 1),
               "decode_s": round(stats.decode_s, 2), "inference_s": round(stats.infer_s, 2),
               "engine": engine, "out": str(out), "interrupted": interrupted,
               **({"images_per_node": dict(sorted(stats.nodes.items()))} if stats.nodes else {})}
    split = (f"; decode {stats.decode_s:.1f}s (summed over {workers} decoders), "
             f"inference {stats.infer_s:.1f}s"
             if engine == "local" else "")
    print(f"{'interrupted: ' if interrupted else ''}{summary['scored']} scored, {summary['failed']} failed, "
          f"{summary['already_done']} already done, in {elapsed:.1f}s ({summary['images_per_s']} img/s){split}; "
          f"predictions in {printable(str(writer.journal if interrupted else out))}", file=sys.stderr)
    if stats.nodes:
        print(f"images per Ray node: {', '.join(f'{n} {c}' for n, c in sorted(stats.nodes.items()))}",
              file=sys.stderr)
    if interrupted:
        print("resume with the same command and --resume", file=sys.stderr)
    return summary
