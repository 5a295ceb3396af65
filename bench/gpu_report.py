"""The GPU mode's report (``bench/gpu.py`` measures): the GPU targets (docs/gpu.md) and the GPU's ceiling, each target
judged MET, MISSED or NOT MEASURED; markdown beside the JSON, and a PNG of images/s by batch size for each model,
precision and method, with PyTorch eager and, where the GPU is known, the fp16 ceiling."""

from __future__ import annotations

from pathlib import Path

from cnnserve.core import binding

FLOP_PER_IMAGE = {"resnet50": 8.2e9, "resnet18": 3.6e9}  # at 224 px, 2 x multiply-adds
# dense fp16 tensor-core peak by name as nvidia-smi gives it (no sparsity), most specific first
PEAK_FP16 = (("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.0e12), ("H100", 989.4e12))
TARGETS = {"fp32_max_logit_diff": 1e-3, "fp16_top1_agreement": 0.995, "fp16_ceiling_ratio": 0.35,
           "service_ratio": 0.80}


def peak_fp16(gpu: dict | None) -> float | None:
    name = (gpu or {}).get("name", "")
    return next((peak for key, peak in PEAK_FP16 if key in name), None)


def judge(doc: dict) -> list[dict]:
    """Each GPU target (``TARGETS``), MET, MISSED or NOT MEASURED (a rehearsal measures none)."""
    rehearsal, rows = doc["mode"] != "gpu", []

    def row(name, value, target, met, unit=""):
        state = "NOT MEASURED (rehearsal on CPU)" if rehearsal else ("MET" if met else "MISSED")
        rows.append({"target": name, "value": value, "goal": target, "state": state, "unit": unit})

    c = doc.get("correctness")
    if isinstance(c, dict):
        row("fp32 GPU vs CPU, largest logit difference", c["fp32"]["max_logit_diff"], "<= 1e-3",
            c["fp32"]["max_logit_diff"] <= TARGETS["fp32_max_logit_diff"])
        row("fp16 GPU vs fp32 CPU, top-1 agreement", c["fp16"]["top1_agreement"], ">= 0.995",
            c["fp16"]["top1_agreement"] >= TARGETS["fp16_top1_agreement"])
        row("the service's runtime on CUDAExecutionProvider", c["fp32"]["providers"][0], "CUDAExecutionProvider",
            c["fp32"]["providers"][0] == binding.CUDA)
    elif isinstance(c, str) and c.startswith("failed"):  # e.g. providers=cuda refused: CUDA did not load
        row("the service's runtime on CUDAExecutionProvider", c[:200], "CUDAExecutionProvider", False)
    peak = peak_fp16(doc["device"].get("gpu"))
    fp16 = measured(doc["arches"].get("resnet50", {}), "fp16")
    if fp16 and peak and doc["size"] == 224:
        ratio = max(r["images_per_s"] for rows_ in fp16.values() for r in rows_) * FLOP_PER_IMAGE["resnet50"] / peak
        row("ResNet-50 fp16 onnxruntime, share of the dense fp16 ceiling", round(ratio, 3), ">= 0.35",
            ratio >= TARGETS["fp16_ceiling_ratio"])
    for arch, r in doc["arches"].items():
        s = r.get("service")
        if not isinstance(s, dict) or not s.get("reference_images_per_s"):
            continue
        for run in s["runs"]:
            ratio = run["throughput_rps"] / s["reference_images_per_s"]
            row(f"{arch} service at {run['clients']} clients / in-process onnxruntime ({s['reference']})",
                round(ratio, 3), ">= 0.80", ratio >= TARGETS["service_ratio"])
    return rows


def measured(arch: dict, precision: str) -> dict:
    """The in-process methods that ran at ``precision`` (a method that failed is a string in the JSON)."""
    got = arch.get("in_process")
    got = got.get(precision, {}) if isinstance(got, dict) else {}
    return {method: rows for method, rows in got.items() if isinstance(rows, list)}


def _fmt(v) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) and v >= 100 else (f"{v:.4g}" if isinstance(v, float) else str(v))


def markdown(doc: dict) -> str:
    d = doc["device"]
    gpu = d.get("gpu")
    lines = [f"# cnnserve on the GPU ({doc['date']})", ""]
    if doc["mode"] != "gpu":
        lines += ["**Rehearsal**: onnxruntime has no working CUDA provider here, so every step ran on the CPU "
                  "provider at a small size. No target is measured; this report shows the mode runs end to end.", ""]
    lines += [f"- Device: {gpu['name']} x{gpu['count']}, driver {gpu['driver']}, {gpu['memory']}" if gpu
              else "- Device: no GPU (nvidia-smi absent or silent)",
              f"- onnxruntime {d['onnxruntime']}, providers available: {', '.join(d['available_providers'])}",
              f"- PyTorch: {d['torch']}" if d.get("torch") else "- PyTorch: not installed",
              f"- Command: `{doc['command']}`; input {doc['size']} px, batches {', '.join(map(str, doc['batches']))}",
              "", "## Targets", "", "| target | value | goal | state |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {t['state']} |" for t in doc["targets"]]
    c = doc.get("correctness")
    if c is not None:
        lines += ["", "## Correctness", ""]
        if isinstance(c, dict):
            lines += [f"{c['model']} ({c['input']}) on {c['images']} rendered shapes, against the CPU provider's fp32:",
                      "", "| precision | providers | largest logit difference | top-1 agreement |", "|---|---|---|---|"]
            lines += [f"| {p} | {', '.join(c[p]['providers'])} | {c[p]['max_logit_diff']:.2e} | "
                      f"{c[p]['top1_agreement']:.4f} |" for p in ("fp32", "fp16")]
        else:
            lines.append(c)
    peak = peak_fp16(gpu)
    for arch, r in doc["arches"].items():
        lines += ["", f"## {arch} at {doc['size']} px: images/s in-process", ""]
        lines += [f"- {part}: {r[part]}" for part in ("error", "in_process", "pytorch", "service")
                  if isinstance(r.get(part), str)]
        if isinstance(r.get("in_process"), dict):
            head = ["precision", "method", *map(str, doc["batches"])]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for precision, methods in r["in_process"].items():
                for method, rows in methods.items():
                    cells = [_fmt(x["images_per_s"]) for x in rows] if isinstance(rows, list) else [rows]
                    lines.append(f"| {precision} | {method} | " + " | ".join(cells) + " |")
            if isinstance(r.get("pytorch"), list):
                lines.append(f"| PyTorch eager | {r['pytorch'][0]['how']} | " +
                             " | ".join(_fmt(x["images_per_s"]) for x in r["pytorch"]) + " |")
            if peak and arch in FLOP_PER_IMAGE and doc["size"] == 224:
                ceiling = peak / FLOP_PER_IMAGE[arch]
                lines += ["", f"Dense fp16 ceiling: {ceiling:,.0f} images/s ({peak / 1e12:.0f} TFLOP/s / "
                              f"{FLOP_PER_IMAGE[arch] / 1e9:.1f} GFLOP per image); the target is "
                              f"{TARGETS['fp16_ceiling_ratio']:.2f} of it."]
        s = r.get("service")
        if isinstance(s, dict):
            lines += ["", f"### {arch}: the service ({s['model']})", "",
                      f"Settings: `{' '.join(f'{k}={v}' for k, v in s['settings'].items())}`; served "
                      f"{s['served']['precision']} on {', '.join(s['served']['providers'])}, "
                      f"{s['served']['runner']}. Precision auto would choose {s['auto_precision']['chosen']} "
                      f"({s['auto_precision'].get('mean_ms_per_image', s['auto_precision'].get('reason'))}).", "",
                      f"| clients | load processes | req/s | p50 ms | p99 ms | non-200 | / in-process ({s['reference']}) |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {x['clients']} | {x['processes']} | {x['throughput_rps']:,.0f} | {x['p50_ms']:.1f} | "
                      f"{x['p99_ms']:.1f} | {x['n_non_200']} | "
                      f"{x['throughput_rps'] / max(s['reference_images_per_s'], 1e-9):.2f} |" for x in s["runs"]]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arches = [a for a, r in doc["arches"].items() if isinstance(r.get("in_process"), dict)]
    if not arches:
        return
    fig, axes = plt.subplots(1, len(arches), figsize=(6.5 * len(arches), 4.5), squeeze=False)
    peak = peak_fp16(doc["device"].get("gpu"))
    for ax, arch in zip(axes[0], arches):
        r = doc["arches"][arch]
        for precision in r["in_process"]:
            for method, rows in measured(r, precision).items():
                ax.plot([x["batch"] for x in rows], [x["images_per_s"] for x in rows], marker="o",
                        linestyle="-" if precision == "fp16" else "--", label=f"onnxruntime {precision} {method}")
        if isinstance(r.get("pytorch"), list):
            ax.plot([x["batch"] for x in r["pytorch"]], [x["images_per_s"] for x in r["pytorch"]], marker="s",
                    color="black", label="PyTorch eager")
        if peak and arch in FLOP_PER_IMAGE and doc["size"] == 224:
            ax.axhline(TARGETS["fp16_ceiling_ratio"] * peak / FLOP_PER_IMAGE[arch], color="red", linestyle=":",
                       label=f"{TARGETS['fp16_ceiling_ratio']:.2f} of the fp16 ceiling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s")
        ax.set_title(f"{arch} {doc['size']} px" + (" (rehearsal, CPU)" if doc["mode"] != "gpu" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    gpu = doc["device"].get("gpu")
    fig.suptitle(gpu["name"] if gpu else "no GPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict, stem: Path) -> str:
    text = markdown(doc)
    try:
        plot(doc, stem.with_suffix(".png"))
    except ImportError as e:  # a GPU machine without matplotlib: the figures are in the JSON and markdown
        text += f"\n(No PNG: {e}; `python -m bench.gpu_report {stem.name}.json` draws it elsewhere.)\n"
    stem.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":  # redraw a report from its JSON (the GPU machine may lack matplotlib)
    import json
    import sys

    source = Path(sys.argv[1])
    doc = json.loads(source.read_text())
    doc.setdefault("targets", judge(doc))  # a run cut short saved its parts, not yet its judgement
    print(write(doc, source.with_suffix("")))
