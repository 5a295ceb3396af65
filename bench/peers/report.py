"""The ``peers`` section's report: Markdown with the targets (MET or MISSED) first, then per workload the tables of
every request kind and concurrency, memory, settings and tuning; and a PNG of throughput against p99 for every
server. Formatting only: nothing here runs a server."""

from __future__ import annotations

from pathlib import Path

#: (workload, kind, concurrency) of each target; "every peer" taking that kind, at its better configuration
TARGETS = [("lenet5", "binary", 64), ("resnet18", "binary", 64), ("resnet18", "json", 64)]
MOONSHOT = ("lenet5", "binary", 64, "Triton (PyTriton)", 1.3)
KIND_WORDS = {"binary": "v2 binary tensors", "json": "v2 JSON tensors", "image": "v2 BYTES images (base64 JSON)",
              "classify": "cnnserve /classify (image body)"}


def cell(p: dict, server: str, kind: str, c: int) -> dict | None:
    return next((x for x in p["cells"] if x["server"] == server and x["kind"] == kind and x["concurrency"] == c), None)


def ratio(ours: dict, theirs: dict) -> tuple[float, float, float]:
    """cnnserve / the peer: medians' ratio, and the spread (our lowest over their highest, our highest over their
    lowest)."""
    lo = ours["spread"][0] / theirs["spread"][1] if theirs["spread"][1] else float("nan")
    hi = ours["spread"][1] / theirs["spread"][0] if theirs["spread"][0] else float("nan")
    return ours["throughput_rps"] / theirs["throughput_rps"], lo, hi


def best_of(p: dict, peer: str, kind: str, c: int) -> tuple[str, dict] | None:
    """A peer's better configuration (documented or tuned) for the cell, by req/s."""
    found = [(lb, x) for lb in p["servers"] if p["servers"][lb]["peer"] == peer
             for x in [cell(p, lb, kind, c)] if x]
    return max(found, key=lambda t: t[1]["throughput_rps"]) if found else None


def verdicts(doc: dict) -> list[str]:
    out = []
    for name, kind, c in TARGETS:
        p = doc["workloads"].get(name, {}).get("peers")
        ours = p and cell(p, "cnnserve", kind, c)
        if not ours:
            out.append(f"- NOT MEASURED: {name} {KIND_WORDS[kind]} at {c} connections.")
            continue
        peers = sorted({s["peer"] for s in p["servers"].values() if s["peer"] != "cnnserve"})
        rows = [b for b in (best_of(p, k, kind, c) for k in peers) if b]
        if not rows:
            out.append(f"- NOT MEASURED: no peer answered {name} {KIND_WORDS[kind]} at {c} connections.")
            continue
        words, ok = [], True
        for lb, x in rows:
            r, lo, hi = ratio(ours, x)
            ok &= r >= 1.0
            words.append(f"{r:.2f}x {lb} ({lo:.2f}-{hi:.2f})")
        low = min(rows, key=lambda t: t[1]["p99_ms"])
        p99_ok = ours["p99_ms"] <= low[1]["p99_ms"]
        out.append(f"- {'MET' if ok and p99_ok else 'MISSED'}: cnnserve >= 1.0x every peer on {name} "
                   f"{KIND_WORDS[kind]} "
                   f"at {c} connections with p99 no worse than the best peer's: {', '.join(words)}; p99 "
                   f"{ours['p99_ms']:.1f} ms against {low[1]['p99_ms']:.1f} ms ({low[0]}, the lowest of the peers'): "
                   f"{'no worse' if p99_ok else 'worse'}.")
    name, kind, c, peer_label, aim = MOONSHOT
    p = doc["workloads"].get(name, {}).get("peers")
    ours = p and cell(p, "cnnserve", kind, c)
    b = p and best_of(p, "triton", kind, c)
    if ours and b:
        r, lo, hi = ratio(ours, b[1])
        out.append(f"- moonshot {'MET' if r >= aim else 'MISSED'}: {aim}x {peer_label} on {name} {KIND_WORDS[kind]} "
                   f"at {c} connections: {r:.2f}x ({lo:.2f}-{hi:.2f}) against {b[0]}.")
    return out


def workload_lines(name: str, p: dict) -> list[str]:
    lines = [f"## {name}", "", f"Load average (1, 5, 15 min) before the section: {p.get('load_before')}; after: "
             f"{p.get('load_after')}. {p['images']} images round-robin; each cell {p['repeats']} rounds, the servers "
             f"in a rotated order each round; {p['duration_s']:.0f} s runs at 64 and {max(p['concurrencies'])} "
             f"connections, {p['short_s']:.0f} s at the others; tuned configurations at 64 connections only.", ""]
    kinds = [k for k in ("binary", "json", "image", "classify") if any(x["kind"] == k for x in p["cells"])]
    for kind in kinds:
        lines += [f"### {KIND_WORDS[kind]}", "", "| server | connections | req/s (median) | spread | p50 ms | p99 ms "
                  "| CPU-ms per request | failures | cnnserve / it (spread) |", "|---|---|---|---|---|---|---|---|---|"]
        for c in sorted({x["concurrency"] for x in p["cells"] if x["kind"] == kind}):
            ours = cell(p, "cnnserve", kind, c)
            for x in (x for x in p["cells"] if x["kind"] == kind and x["concurrency"] == c):
                rel = "-"
                if ours and x["server"] != "cnnserve":
                    r, lo, hi = ratio(ours, x)
                    rel = f"{r:.2f}x ({lo:.2f}-{hi:.2f})"
                bold = "**" if x["server"] == "cnnserve" else ""
                lines.append(f"| {bold}{x['server']}{bold} | {c} | {bold}{x['throughput_rps']:,.0f}{bold} | "
                             f"{x['spread'][0]:,.0f}-{x['spread'][1]:,.0f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                             f"{x['cpu_ms']:.2f} | {x['failures']} | {rel} |")
        lines.append("")
    lines += ["### Memory and settings", "", "Memory after the 64-connection runs of the last kind each took: the "
              "server's process tree, its PSS summed (shared pages counted once), and its processes' RSS.", "",
              "| server | settings | from | processes | PSS total MB | RSS per process MB | idle CPU % of a core |",
              "|---|---|---|---|---|---|---|"]
    for lb, s in p["servers"].items():
        mem = next((x["memory"] for x in reversed(p["cells"]) if x["server"] == lb and x.get("memory")), {})
        settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items())
        sizes = mem.get("rss_mb", [])
        rss = ", ".join(f"{v:.0f}" for v in sizes[:6]) + (" ..." if len(sizes) > 6 else "")
        lines.append(f"| {lb} | {settings} | {s['from']} | {mem.get('processes', '-')} | "
                     f"{mem.get('pss_total_mb', '-')} "
                     f"| {rss} | {p.get('idle_cpu_pct', {}).get(lb, '-')} |")
    versions = {lb: s["versions"] for lb, s in p["servers"].items() if s.get("versions")}
    if versions:
        lines += ["", "Peers' environments: " + "; ".join(
            f"{lb}: " + ", ".join(f"{k} {v}" for k, v in vs.items()) for lb, vs in versions.items()) + "."]
    if p.get("tuning"):
        lines += ["", "### Tuning", "", f"Each peer's budget: {p['tune_budget_s'] / 60:.1f} min (start-ups included), "
                  "its documented settings first, then its trials, each measured once at 64 connections on its first "
                  "kind; kept: the most req/s with no failure and p99 within the limit.", "",
                  "| peer | trials | spent s | p99 limit ms | chosen | trials' req/s |", "|---|---|---|---|---|---|"]
        for lb, t in p["tuning"].items():
            rates = ", ".join(f"{x['throughput_rps']:.0f}" if "error" not in x else "failed" for x in t["trials"])
            chosen = ", ".join(f"{k}={v}" for k, v in (t["chosen"] or {}).items()) or "none"
            lines.append(f"| {lb} ({t['kind']}) | {len(t['trials'])} | {t['spent_s']:.0f} | {t['p99_limit_ms']:.0f} | "
                         f"{chosen}{'' if t['better_than_default'] else ' (the documented settings)'}"
                         f"{'' if t.get('within_limit', True) else ' (no trial kept the p99 limit)'} | {rates} |")
    if p["errors"]:
        lines += ["", "Not run or failed:", ""] + [f"- {k}: {v}" for k, v in p["errors"].items()]
    return lines + [""]


def checkout() -> str:
    """The checkout cnnserve ran from, as git saw it when the report was written: its commit, and the files of the
    serving path changed but not committed (work in progress in the same tree is measured with it)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "service", "cnnserve"], cwd=root,
                                 capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return "checkout unknown"
    files = sorted(line[3:] for line in changed if line.strip())
    return (f"commit {head or 'unknown'}" + (f", with uncommitted changes in {', '.join(files)} at the end of the run"
                                             if files else ", no uncommitted change in service/ or cnnserve/"))


def report(doc: dict, stem: Path) -> str:
    m = doc["machine"]
    lines = [f"# cnnserve beside its peers, {doc['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; host Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
             f"Command: `{doc['command']}`. cnnserve: {checkout()}.", "",
             "Every server serves the same `model.onnx` with onnxruntime on the same cores, all of them started side "
             "by side (each one's idle CPU is in its table). The load generator, `wrk`, runs on the same cores "
             "(loopback): it takes CPU from the servers, the same for each. Requests carry one image each.", "",
             "## Targets", "", *verdicts(doc), ""]
    for name, r in doc["workloads"].items():
        if r.get("peers"):
            lines += workload_lines(name, r["peers"])
    text = "\n".join(lines)
    stem.with_suffix(".md").write_text(text)
    return text


def plot(doc: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, k) for n, r in doc["workloads"].items() if r.get("peers") for k in ("binary", "json")
              if any(x["kind"] == k for x in r["peers"]["cells"])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (name, kind) in zip(axes[0], panels):
        p = doc["workloads"][name]["peers"]
        for lb in p["servers"]:
            xs = sorted((x for x in p["cells"] if x["server"] == lb and x["kind"] == kind),
                        key=lambda x: x["concurrency"])
            if not xs:
                continue
            style = ({"lw": 2.5, "color": "black"} if lb == "cnnserve" else
                     {"lw": 1, "ls": "--" if "tuned" in lb else "-"})
            ax.plot([x["p99_ms"] for x in xs], [x["throughput_rps"] for x in xs], marker="o", label=lb, **style)
            for x in xs:
                ax.annotate(str(x["concurrency"]), (x["p99_ms"], x["throughput_rps"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set(xscale="log", xlabel="p99 ms (log)", ylabel="req/s", title=f"{name}: {KIND_WORDS[kind]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Throughput against p99 (points: connections); upper left is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


def write(doc: dict, stem: Path) -> str:
    """``stem``.json (the harness's document), .md and .png; the Markdown returned."""
    import json

    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))
    text = report(doc, stem)
    plot(doc, stem)
    return text
