"""The harness's ``calibration`` section: what each workload's export measured about its probabilities
(``export/probabilities.py``): ECE before and after temperature scaling on the test split, with its bins,
images and bootstrap interval, and the energy OOD score's AUROC and false-accept rate per set. It reads
the exported file's metadata: nothing is trained or run again, so the figures are the export's own.
"""

from __future__ import annotations


def section(onnx_path: str) -> dict:
    from cnnserve.export.store import read_info

    info = read_info(onnx_path)
    c, ood = info.calibration, info.ood
    if not c.get("test"):
        return {"skipped": "the export holds no calibration figures (random weights, or exported by a cnnserve "
                           "that did not calibrate: export it again)"}
    t = c["test"]
    return {"temperature": info.temperature, "calibrated": c.get("calibrated", True), "why": c.get("why"),
            "bins": t["bins"],
            "n_validation": c["n_validation"], "n_test": t["n"],
            **{f"{k}_{when}": t[when][k] for when in ("before", "after") for k in ("ece", "ece_95", "nll", "brier")},
            "accuracy": t["after"]["accuracy"], "ood_threshold": ood.get("threshold"),
            "ood": {name: {k: s[k] for k in ("n", "auroc", "false_accept_rate")} for name, s in ood.get("sets", {}).items()}}


def report_lines(name: str, r: dict) -> list[str]:
    if "skipped" in r:
        return [f"- {name}: {r['skipped']}"]

    def pct(x):
        return f"{100 * x:.2f}%"

    ood = "; ".join(f"{k} {s['auroc']:.3f} ({pct(s['false_accept_rate'])} of {s['n']} pass)" for k, s in r["ood"].items())
    kept = f" (kept: {r['why']})" if r.get("why") else ""
    return [f"- {name}: T = {r['temperature']:.3f}{kept}; ECE ({r['bins']} bins, {r['n_test']} test images) "
            f"{pct(r['ece_before'])} [{pct(r['ece_95_before'][0])}, {pct(r['ece_95_before'][1])}] -> "
            f"{pct(r['ece_after'])} [{pct(r['ece_95_after'][0])}, {pct(r['ece_95_after'][1])}]; NLL "
            f"{r['nll_before']:.4f} -> {r['nll_after']:.4f}; OOD AUROC: {ood}"]
