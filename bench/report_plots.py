"""The benchmark report's PNG: throughput, latency percentiles and where the time goes for each
workload served, the int8 formats against fp32, and request telemetry's cost, from the JSON document that
``bench/harness.py`` measures (``bench/report.py`` writes the Markdown beside it). Drawing only: nothing here
runs a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import PEERS, best, breakdown


def _log_axes(ax, clients: list[int], ylabel: str, title: str) -> None:
    ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel=ylabel, title=title)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot(doc: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in doc["workloads"].items() if r.get("service")]  # the main PNG's, where there is one
    quantized = {n: r["int8"] for n, r in doc["workloads"].items() if r.get("int8")}
    if quantized:
        plot_int8(doc, quantized, stem.with_name(stem.name + "-int8").with_suffix(".png")
                  if names else stem.with_suffix(".png"))
    telemetry = {n: r["telemetry"] for n, r in doc["workloads"].items() if r.get("telemetry")}
    if telemetry:
        plot_telemetry(telemetry, doc, stem.with_name(stem.name + "-telemetry").with_suffix(".png")
                       if names or quantized else stem.with_suffix(".png"))
    if not names:
        return
    fig, axes = plt.subplots(3, len(names), figsize=(6.5 * len(names), 12), squeeze=False)
    for j, name in enumerate(names):
        r = doc["workloads"][name]
        ax = axes[0][j]
        for (key, label), style in zip(PEERS, ("-", "--", ":")):
            rows = r.get(key) or []
            if rows:
                cs = [x["concurrency"] for x in rows]
                ax.errorbar(cs, [x["throughput_rps"] for x in rows], ls=style, marker="o", capsize=3, label=label,
                            yerr=[[x["throughput_rps"] - x["spread"][0] for x in rows],
                                  [x["spread"][1] - x["throughput_rps"] for x in rows]])
        if r.get("onnxruntime"):
            ax.axhline(best(r["onnxruntime"], "images_per_s"), color="g", ls="-.",
                       label="onnxruntime in-process, best batch")
        if r.get("pytorch"):
            ax.axhline(best(r["pytorch"], "images_per_s"), color="r", ls=":", label="PyTorch eager in-process, best batch")
        cs = [x["concurrency"] for x in r["service"]]
        _log_axes(ax, cs, "images / s", f"{name}: throughput (median, min-max)")
        ax = axes[1][j]
        for (key, who), style in zip(PEERS, ("-", "--", ":")):
            for q, color in (("p50", "C0"), ("p99", "C3")):
                rows = r.get(key) or []
                if rows:
                    ax.plot([x["concurrency"] for x in rows], [x["latency_ms"][q] for x in rows], ls=style,
                            color=color, marker="o", label=f"{who.split(' (')[0]} {q}")
        _log_axes(ax, cs, "latency, ms", f"{name}: latency percentiles")
        ax = axes[2][j]
        rows = [(x["concurrency"], breakdown(x)) for x in r["service"] if breakdown(x)]
        if rows:
            parts = [k for k in rows[0][1] if k != "client latency"]
            left = np.zeros(len(rows))
            for i, part in enumerate(parts):
                vals = np.array([b[part] for _, b in rows])
                ax.barh([str(c) for c, _ in rows], vals, left=left, label=part, color=plt.cm.tab10(i))
                left += vals
            ax.set(xlabel="mean ms per request", ylabel="concurrent clients", title=f"{name}: where the time goes")
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"cnnserve on {doc['machine']['cpu']} ({doc['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)


def plot_int8(doc: dict, quantized: dict, path: Path) -> None:
    """Per workload: images/s of fp32 and each int8 format at each batch size (hatched: failed its gate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(quantized), figsize=(6.5 * len(quantized), 4.5), squeeze=False)
    for ax, (name, q) in zip(axes[0], quantized.items()):
        variants = list(q["onnxruntime"])
        batches = [x["batch"] for x in q["onnxruntime"]["fp32"]]
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            rows = q["onnxruntime"][v]
            failed = v != "fp32" and not q["formats"][v]["passed"]
            ax.bar(np.arange(len(batches)) + i * width, [x["images_per_s"] for x in rows], width,
                   label=v + (" (gate failed)" if failed else ""), hatch="//" if failed else None, color=plt.cm.tab10(i))
        ax.set_xticks(np.arange(len(batches)) + width * (len(variants) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set(ylabel="images / s (onnxruntime, CPU)", title=f"{name}: int8 formats against fp32 "
                                                             f"({'VNNI' if q['vnni'] else 'no VNNI'})")
        ax.legend(fontsize=8)
    fig.suptitle(f"INT8 on {doc['machine']['cpu']} ({doc['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_telemetry(sections: dict, doc: dict, path: Path) -> None:
    """Per workload: each telemetry side's throughput over both plain servers' (``as shipped`` and ``tracing 0``,
    the same code) in each round (dots) and their median (bar), against the 0.97 target."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(7.5 * len(sections), 4.5), squeeze=False)
    for ax, (name, t) in zip(axes[0], sections.items()):
        sides = t["sides"]
        plain = [(a["throughput_rps"] + b["throughput_rps"]) / 2
                 for a, b in zip(sides["as shipped"]["runs"], sides["tracing 0"]["runs"])]
        for i, (side, x) in enumerate(sides.items()):
            ratios = [r["throughput_rps"] / p for r, p in zip(x["runs"], plain) if p]
            ax.barh(i, statistics.median(ratios), color=plt.cm.tab10(i), alpha=0.6)
            ax.scatter(ratios, [i] * len(ratios), s=12, color="black", zorder=3)
        ax.axvline(0.97, ls="--", color="red", label="target for JSON logs and 1% tracing")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_yticks(range(len(sides)), list(sides))
        ax.invert_yaxis()
        ax.set(xlim=(0.4, 1.25), xlabel="req/s over both plain servers' (bar: median of rounds; dots: rounds)",
               title=f"{name}: request telemetry's cost, {t['concurrency']} connections, {t['repeats']} rounds")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
