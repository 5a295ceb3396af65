"""The Grafana dashboard's panels (deploy/grafana/cnnserve.json) drawn with matplotlib from a Prometheus: each panel's
queries, as Grafana would send them, over a time window (``query_range``), one picture of all the panels.

    python -m bench.dashboard_png --prometheus http://127.0.0.1:9090 --minutes 15 --out dashboard.png

The suite's Prometheus test evaluates the same queries (``targets``, ``concrete``) against a real Prometheus
scraping two replicas under load; with CNNSERVE_DASHBOARD_PNG=PATH it also draws them here, which is how
docs/observability-dashboard.png was made.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "cnnserve.json"
#: Grafana's variables as a query outside Grafana gets them: every namespace and model ("All" is the
#: variables' allValue), and a rate window of a few scrapes.
VARIABLES = {"namespace": ".*", "model": ".*"}


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict) -> list[dict]:
    """The dashboard's panels that query (rows hold none), in order, those inside collapsed rows included."""
    out = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def targets(dashboard: dict) -> list[tuple[dict, dict]]:
    """(panel, target) for every query of every panel."""
    return [(p, t) for p in panels(dashboard) for t in p.get("targets", [])]


def concrete(expr: str, window: str = "30s", interval: str = "5s", range_: str = "5m") -> str:
    """A panel's query as Grafana sends it: its variables replaced (``$__rate_interval`` by ``window``)."""
    values = {"__rate_interval": window, "__interval": interval, "__range": range_, **VARIABLES}

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"the query uses ${name}, a variable outside {sorted(values)}: {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def api(url: str, path: str, **params) -> dict:
    """One call to Prometheus's HTTP API; its ``data``, or a RuntimeError with Prometheus's error."""
    full = f"{url.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(full, timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:  # a bad query answers 400 with the reason in its JSON
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    return api(url, "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "").strip() or "value"


SCALE = {"s": (1000, "ms"), "percentunit": (100, "%"), "bytes": (1 / 2**20, "MiB"), "reqps": (1, "req/s")}


def render(url: str, start: float, end: float, out: Path, dashboard: dict | None = None, window: str = "30s",
           columns: int = 3) -> Path:
    """Every panel's queries over [start, end] drawn into one PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = dashboard or load()
    shown = panels(dashboard)
    step = max(1.0, (end - start) / 300)
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 2.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, shown):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        factor, label = SCALE.get(unit, (1, ""))
        drawn = 0
        for target in panel.get("targets", []):
            for series in query_range(url, concrete(target["expr"], window), start, end, step):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) * factor for _, v in series["values"]]
                ax.plot(xs, ys, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"])[:40])
                drawn += 1
        for step_ in panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", []):
            if step_.get("value") is not None:
                ax.axhline(step_["value"] * factor, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_ylabel(label, fontsize=7)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=6, loc="upper left", ncol=2 if drawn > 4 else 1, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=7)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(start))
    fig.suptitle(f"{dashboard.get('title', 'dashboard')}: {len(shown)} panels, {when} + {end - start:.0f} s, "
                 f"rate windows {window}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = Path(out)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    from PIL import Image

    with Image.open(out) as picture:  # a palette of 128 colours: a quarter of the bytes, the same lines
        small = picture.convert("RGB").quantize(colors=128)
    small.save(out, optimize=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus's base URL")
    ap.add_argument("--minutes", type=float, default=15, help="the window: the last N minutes")
    ap.add_argument("--window", default="1m", help="what $__rate_interval stands for")
    ap.add_argument("--out", default="dashboard.png")
    args = ap.parse_args(argv)
    end = time.time()
    print(render(args.prometheus, end - args.minutes * 60, end, Path(args.out), window=args.window))


if __name__ == "__main__":
    main()
