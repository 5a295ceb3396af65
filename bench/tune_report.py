"""What ``cnnserve tune`` writes: the chosen service arguments (YAML that ``bentoml serve --arg-file``,
``bentoml build --arg-file`` and ``cnnserve up --arg-file`` read), a Markdown report with one row per trial
and concurrency, a PNG of throughput against p99 with the chosen setting marked, and the JSON behind them.
``bench/tune.py`` measures; this file formats."""

from __future__ import annotations

import json
import time
from pathlib import Path


def over(concurrency) -> str:
    """How the check's figure was made: the geometric mean of req/s over the concurrencies (``tune_search.served``);
    a report written before that compared req/s at one concurrency."""
    if isinstance(concurrency, int):
        return f"at {concurrency} connections"
    return f"over {', '.join(map(str, concurrency))} connections (the geometric mean)"


def verdict(a, defaults: dict, best: dict, check: dict | None) -> tuple[dict, bool, list[str]]:
    """The trial whose settings are written, whether it met the constraint, and what to tell the user."""
    limit = f"p99 <= {a.p99_ms:g} ms at {' and '.join(map(str, a.concurrency))} connections with no failed request"
    if not any(t.get("meets") for t in [defaults, best]):
        worst = [(max(r["p99_ms"] for r in t["rows"]), t["trial"]) for t in [defaults, best] if t["rows"]]
        p99, n = min(worst)
        return defaults, False, [f"no trial met {limit}: the closest was trial {n} (worst p99 {p99:.1f} ms); "
                                 f"{a.out} holds the defaults"]
    if best is defaults:
        return defaults, True, [f"the defaults met {limit} and no other setting beat them in the search; "
                                f"{a.out} holds the defaults"]
    top = over(check["concurrency"])
    w, d = check["median"]["winner"], check["median"]["defaults"]
    if check["kept"]:
        return best, True, [f"chosen: trial {best['trial']} ({best['label']}): {w:.0f} req/s {top} "
                            f"against the defaults' {d:.0f} ({w / d:.2f}x; median of 3 interleaved runs each, "
                            f"its slowest run above their fastest), {limit}"]
    why = ("it missed the constraint in the check" if not check["meets"]["winner"]
           else "it did not beat them beyond their spread")
    return defaults, bool(defaults.get("meets")), [
        f"trial {best['trial']} ({best['label']}) led the search, but in the check against the defaults "
        f"({w:.0f} against {d:.0f} req/s {top}, median of 3 interleaved runs) {why}: "
        f"the defaults stay in {a.out}"]


def write(a, stored, tuner, defaults: dict, best: dict, check: dict | None) -> dict:
    from .workloads import machine

    chosen, met, summary = verdict(a, defaults, best, check)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = machine()
    where = f"{m['cores']}-core {m['cpu']}, GPU: {m['gpu']}"
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": m, "model": str(stored.tag), "p99_ms": a.p99_ms,
           "concurrency": a.concurrency, "budget_min": a.budget_min, "duration_s": a.duration,
           "knobs": {k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in tuner.space.items()},
           "samples": tuner.samples, "trials": [{k: v for k, v in t.items() if k != "point"} for t in tuner.trials],
           "check": check, "chosen": chosen["trial"], "met": met, "summary": summary}
    settings = {"models": a.model, **chosen["settings"]}
    head = [f"# Service arguments chosen by `cnnserve tune` for {stored.tag} on {doc['date']}",
            f"# on {where}.", *(f"# {line}" for line in summary),
            f"# Serve with: bentoml serve --arg-file {out.name}  (or cnnserve up --arg-file, bentoml build --arg-file)"]
    import yaml

    out.write_text("\n".join(head) + "\n" + yaml.safe_dump(settings, sort_keys=False))
    md, png, js = out.with_suffix(".md"), out.with_suffix(".png"), out.with_suffix(".json")
    md.write_text(markdown(doc, settings, where, png.name))
    plot(tuner.trials, chosen, a.p99_ms, png, f"{stored.tag}, {where}")
    js.write_text(json.dumps(doc, indent=1, default=str))
    return {"md": str(md), "png": str(png), "met": met, "summary": summary}


def markdown(doc: dict, settings: dict, where: str, png: str) -> str:
    lines = [f"# `cnnserve tune` {doc['model']}", "",
             f"{doc['date']}, {where}; constraint p99 <= {doc['p99_ms']:g} ms at "
             f"{', '.join(map(str, doc['concurrency']))} connections (wrk, the model's held-out images, "
             f"{doc['duration_s']:g} s per run); budget {doc['budget_min']:g} min.", "",
             *doc["summary"], "", "Written:", "", "```yaml", *(f"{k}: {v}" for k, v in settings.items()), "```", "",
             f"![throughput against p99 for every trial]({png})", "",
             "| trial | settings (what differs from the defaults) | connections | req/s | p50 ms | p95 ms | p99 ms "
             "| CPU-ms/req | mean batch | 503s | failures | meets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in doc["trials"]:
        mark = " (chosen)" if t["trial"] == doc["chosen"] else ""
        if "error" in t:
            lines.append(f"| {t['trial']}{mark} | {t['label']} | | did not start: {t['error']} | | | | | | | | no |")
        for r in t["rows"]:
            ok = "yes" if r["p99_ms"] <= doc["p99_ms"] and not r["failures"] else "no"
            lines.append(f"| {t['trial']}{mark} | {t['label']} | {r['concurrency']} | {r['throughput_rps']:.0f} | "
                         f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_ms']:.2f} | "
                         f"{r['mean_batch']:.1f} | {r['n_503']} | {r['failures']} | {ok} |")
    check = doc["check"]
    if check:
        lines += ["", f"The check, {over(check['concurrency'])}, interleaved (req/s per run): "
                      f"defaults {', '.join(f'{x:.0f}' for x in check['rates']['defaults'])}; "
                      f"winner {', '.join(f'{x:.0f}' for x in check['rates']['winner'])}."]
    return "\n".join(lines) + "\n"


def plot(trials: list[dict], chosen: dict, p99_ms: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    levels = sorted({r["concurrency"] for t in trials for r in t["rows"]})
    for i, c in enumerate(levels):
        pts = [(r["throughput_rps"], r["p99_ms"], t["trial"]) for t in trials for r in t["rows"] if r["concurrency"] == c]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"{c} connections", color=f"C{i}", alpha=0.7)
        for x, y, n in pts:
            ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    mine = chosen["rows"]
    ax.scatter([r["throughput_rps"] for r in mine], [r["p99_ms"] for r in mine], marker="*", s=300,
               facecolor="none", edgecolor="black", linewidth=1.5, label=f"chosen (trial {chosen['trial']})")
    ax.axhline(p99_ms, color="red", linestyle="--", linewidth=1, label=f"p99 limit {p99_ms:g} ms")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"cnnserve tune: {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
