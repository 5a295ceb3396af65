"""The benchmark's report in Markdown: ratios against the project's targets and the tables, from the
JSON document that ``bench/harness.py`` measures (``bench/report_plots.py`` draws its PNG). Formatting
only: nothing here runs a model."""

from __future__ import annotations

from pathlib import Path

PEERS = [("service", "cnnserve"), ("naive", "naive BentoML (baseline)"), ("torchserve", "TorchServe (PyTorch eager)")]
TARGETS = {"service_over_ort": 0.90, "over_naive": 2.0, "scoring_over_ort": 0.90}
BREAKDOWN = ["read", "decode", "resize", "thread", "queue", "inference", "respond"]


def best(rows: list[dict] | None, key: str) -> float:
    return max((x[key] for x in rows or []), default=0.0)


def at(rows: list[dict] | None, concurrency: int) -> dict | None:
    return next((x for x in rows or [] if x["concurrency"] == concurrency), None)


def ratios(r: dict) -> dict:
    """The figures the report states at the top, for one workload (None where not measured)."""
    ort, torch = best(r.get("onnxruntime"), "images_per_s"), best(r.get("pytorch"), "images_per_s")
    http = best(r.get("service"), "throughput_rps")
    top = max((x["concurrency"] for x in r.get("service") or []), default=None)
    ours, naive, ts = at(r.get("service"), top), at(r.get("naive"), top), at(r.get("torchserve"), top)
    local = (r.get("batch") or {}).get("engines", {}).get("local")
    return {"service_over_ort": http / ort if http and ort else None,
            "ort_over_torch": ort / torch if ort and torch else None,
            "clients": top,
            "over_naive": ours["throughput_rps"] / naive["throughput_rps"] if ours and naive else None,
            "over_torchserve": ours["throughput_rps"] / ts["throughput_rps"] if ours and ts else None,
            "rate_503": ours["n_503"] / max(1, ours["requests"]) if ours else None,
            "naive_rate_503": naive["n_503"] / max(1, naive["requests"]) if naive else None,
            "failures": ours["n_non_200"] - ours["n_503"] if ours else None,
            "scoring_over_ort": local["ratio_to_onnxruntime"] if local else None}


def fmt(x, spec=".2f", none="-") -> str:
    return none if x is None else format(x, spec)


def verdicts(doc: dict) -> list[str]:
    """The project's targets, met or missed, in words."""
    out = []
    for name, r in doc["workloads"].items():
        q = ratios(r)
        if name == "resnet18" and q["service_over_ort"] is not None:
            ok = q["service_over_ort"] >= TARGETS["service_over_ort"]
            out.append(f"- {'MET' if ok else 'MISSED'}: service at least 0.90 of in-process onnxruntime for ResNet-18: "
                       f"{q['service_over_ort']:.2f}.")
        if name == "lenet5" and q["over_naive"] is not None and q["clients"] != 64:
            out.append(f"- NOT MEASURED: the naive-baseline target is set at 64 clients; this run went to "
                       f"{q['clients']}.")
        elif name == "lenet5" and q["over_naive"] is not None:
            ok = q["over_naive"] >= TARGETS["over_naive"] and q["rate_503"] == 0 and q["failures"] == 0
            out.append(f"- {'MET' if ok else 'MISSED'}: at least 2x the naive BentoML service for LeNet-5 at "
                       f"64 clients with zero 503s: {q['over_naive']:.2f}x, {q['rate_503']:.2%} 503s, "
                       f"{q['failures']} other failures.")
        if q["scoring_over_ort"] is not None:
            ok = q["scoring_over_ort"] >= TARGETS["scoring_over_ort"]
            b = r["batch"]
            note = ""
            if b.get("decode_alone"):
                dec, ort = b["decode_alone"]["images_per_s"], b["onnxruntime"]["images_per_s"]
                local = b["engines"]["local"]["images_per_s"]
                note = (f" Reading and decoding alone runs at {dec:.0f} img/s ({dec / ort:.2f} of onnxruntime); "
                        f"scoring reaches {local / min(dec, ort):.2f} of the slower of the two.")
            out.append(f"- {'MET' if ok else 'MISSED'}: batch scoring (local) at least 0.90 of onnxruntime alone, "
                       f"{name}: {q['scoring_over_ort']:.2f}.{note}")
            if b.get("decode_alone") and name == "lenet5":
                cores = doc["machine"]["cores"]
                want = 0.9 * cores * b["decode_alone"]["images_per_s"]
                local = b["engines"]["local"]["images_per_s"]
                out.append(f"- {'MET' if local >= want else 'MISSED'}: batch scoring LeNet-5 at least 0.9 x {cores} "
                           f"cores x one process's decode rate ({want:.0f} img/s): {local:.0f} img/s "
                           f"({local / (cores * b['decode_alone']['images_per_s']):.2f} of cores x that rate).")
        q8 = r.get("int8")
        if q8 and name == "resnet18" and q8["onnxruntime"].get(q8["cpu_format"]):
            gain = best(q8["onnxruntime"][q8["cpu_format"]], "images_per_s") / best(q8["onnxruntime"]["fp32"], "images_per_s")
            if q8["vnni"]:
                out.append(f"- {'MET' if gain >= 1.5 else 'MISSED'}: ResNet-18 int8 at least 1.5x fp32 (VNNI CPU): "
                           f"{gain:.2f}x.")
            else:
                out.append(f"- NOT APPLICABLE (no VNNI here): ResNet-18 int8 ({q8['cpu_format']}) runs at {gain:.2f}x "
                           "fp32 at the best batch of each; the 1.5x target is set for CPUs with VNNI.")
        c = ((q8 or {}).get("service") or {}).get("auto_choice")
        if c and c.get("mean_ms_per_image"):
            faster = min(c["mean_ms_per_image"], key=c["mean_ms_per_image"].get)
            out.append(f"- {'MET' if c['chosen'] == faster else 'MISSED'}: precision=auto serves the variant its "
                       f"warm-up measured faster, {name}: chose {c['chosen']} (mean ms per image "
                       + ", ".join(f"{p} {v:.4f}" for p, v in c["mean_ms_per_image"].items()) + ").")
        f = r.get("floor")
        if f and name == "lenet5":
            ok = f["ratio_to_floor"] >= 0.10
            out.append(f"- {'MET' if ok else 'MISSED'}: LeNet-5 at least 0.10 of the bare-ASGI floor under wrk at "
                       f"{f['concurrency']} connections: {f['ratio_to_floor']:.3f} ({f['cnnserve']['throughput_rps']:.0f} "
                       f"against {f['floor']['throughput_rps']:.0f} req/s; {f['cnnserve']['cpu_ms']:.2f} CPU-ms per "
                       f"request against {f['floor']['cpu_ms']:.3f}).")
    return out


def breakdown(row: dict) -> dict | None:
    """Mean milliseconds per request in each stage, plus what the stages do not cover."""
    t = row.get("server_timing_ms")
    if not t:
        return None
    out = {k: t.get(k, 0.0) for k in BREAKDOWN}
    out["event loop, other"] = max(0.0, t["total"] - sum(out.values()))
    out["HTTP, framework, client"] = max(0.0, t["client"] - t["total"])
    out["client latency"] = t["client"]
    return out


def report(doc: dict, stem: Path) -> str:
    """The report in Markdown, written to ``stem``.md and returned (``report_plots.plot`` draws ``stem``.png)."""
    m = doc["machine"]
    lines = [f"# cnnserve benchmark, {doc['date']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
             "The load generator runs on the same machine (loopback), so it takes CPU from the server. "
             f"HTTP figures are the median of {doc.get('http_repeats', 1)} runs, with the spread (min-max).", ""]
    measured = {n: r for n, r in doc["workloads"].items()
                if any(r.get(k) for k in ("pytorch", "onnxruntime", "service", "naive", "torchserve"))}
    lines += ["## Ratios", "", "| model | service / onnxruntime in-process (best batch) | cnnserve / naive BentoML "
              "(most clients) | cnnserve / TorchServe (most clients) | onnxruntime / PyTorch eager (best batch each) "
              "| batch scoring (local) / onnxruntime (same batch) | 503 rate at most clients (cnnserve; naive) "
              "| other failures (cnnserve) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in measured.items():
        q = ratios(r)
        lines.append(f"| {name} | {fmt(q['service_over_ort'])} | {fmt(q['over_naive'])} | {fmt(q['over_torchserve'])} "
                     f"| {fmt(q['ort_over_torch'])} "
                     f"| {fmt(q['scoring_over_ort'])} | {fmt(q['rate_503'], '.2%')}; {fmt(q['naive_rate_503'], '.2%')} "
                     f"| {fmt(q['failures'], 'd')} |")
    lines += ["", "Targets:", *verdicts(doc)]
    if not measured:  # a run of other sections only (batch scoring, faults, int8): their targets stay
        targets = verdicts(doc)
        lines = lines[:lines.index("## Ratios")] + (["## Targets", "", *targets] if targets else [])
    for name, r in measured.items():
        settings = (", ".join(f"{k}={v}" for k, v in r["serve"].items()) or "its defaults") + \
            f"; {r.get('serve_from', 'chosen by hand')}"
        lines += ["", f"## {name} ({r['input']}, {r['format']} requests; cnnserve with {settings})", "",
                  "| in-process | batch | images/s (median) | spread |", "|---|---|---|---|"]
        for kind in ("pytorch", "onnxruntime"):
            for x in r.get(kind, []):
                lines.append(f"| {kind} | {x['batch']} | {x['images_per_s']:.0f} | "
                             f"{x['spread'][0]:.0f}-{x['spread'][1]:.0f} |")
        http = [(who, x) for key, who in PEERS for x in r.get(key, [])]
        if http:
            lines += ["", "| server | HTTP clients | runs x s | req/s (median) | spread | p50 ms | p95 ms | p99 ms "
                          "| 503s | other failures | mean batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for who, x in http:
                lat = x["latency_ms"]
                lines.append(f"| {who} | {x['concurrency']} | {x['repeats']} x {x['duration_s']:.0f} | "
                             f"{x['throughput_rps']:.0f} | {x['spread'][0]:.0f}-{x['spread'][1]:.0f} | "
                             f"{lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | {x['n_503']} | "
                             f"{x['n_non_200'] - x['n_503']} | "
                             + (f"{x['mean_batch_size']:.1f} |" if "mean_batch_size" in x else "- |"))
        for key, who in PEERS:
            if r.get(f"{key}_error"):
                lines.append(f"\n{who} could not run: `{r[key + '_error']}`")
        rows = [(x["concurrency"], breakdown(x)) for x in r.get("service", []) if breakdown(x)]
        if rows:
            cols = list(rows[0][1])
            lines += ["", "Where the time of one request goes (cnnserve, mean ms per request, from the Server-Timing "
                          "header of every answer; `service/metrics.py` STAGES says what each stage covers):", "",
                      "| clients | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for c, b in rows:
                lines.append(f"| {c} | " + " | ".join(f"{b[k]:.2f}" for k in cols) + " |")
    floors = {n: r["floor"] for n, r in doc["workloads"].items() if r.get("floor")}
    if floors:
        cores = doc["machine"]["cores"]
        lines += ["", "## Against the HTTP floor (`wrk`, raw image body; CPU-ms per request = cores x 1000 / req/s)",
                  "", "The floor is a bare ASGI app under the same uvicorn (uvloop, httptools, as many workers) that "
                  "reads the body and answers a fixed JSON (`bench/floor.py`). The peers' rows are the Python "
                  "load generator's figures at the most clients, from the tables above.", "",
                  "| model | server | connections | req/s (median) | spread | CPU-ms per request | / floor | failures |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, f in floors.items():
            base = f["floor"]["throughput_rps"]
            for who in ("floor", "cnnserve"):
                x = f[who]
                lines.append(f"| {name} | {who} (wrk) | {f['concurrency']} | {x['throughput_rps']:.0f} | "
                             f"{x['spread'][0]:.0f}-{x['spread'][1]:.0f} | {x['cpu_ms']:.3f} | "
                             f"{x['throughput_rps'] / base:.3f} | {x['failures']} |")
            r = doc["workloads"][name]
            for key, who in PEERS:
                rows = r.get(key) or []
                if rows:
                    x = max(rows, key=lambda row: row["concurrency"])
                    lines.append(f"| {name} | {who} (Python client) | {x['concurrency']} | {x['throughput_rps']:.0f} | "
                                 f"{x['spread'][0]:.0f}-{x['spread'][1]:.0f} | "
                                 f"{cores * 1000 / x['throughput_rps']:.3f} | {x['throughput_rps'] / base:.3f} | "
                                 f"{x['n_non_200']} |")
    scoring = {n: r["batch"] for n, r in doc["workloads"].items() if r.get("batch")}
    if scoring:
        lines += ["", "## Batch scoring (`cnnserve score`), same files for every engine", "",
                  "| model | engine | images | img/s | / onnxruntime alone (same batch) | decode s (summed over decoders) "
                  "| inference s | wall s |", "|---|---|---|---|---|---|---|---|"]
        for name, b in scoring.items():
            lines.append(f"| {name} | onnxruntime alone, batch {b['batch']} (pre-decoded tensors) | - | "
                         f"{b['onnxruntime']['images_per_s']:.0f} | 1.00 | - | - | - |")
            if b.get("decode_alone"):
                d = b["decode_alone"]
                lines.append(f"| {name} | reading and decoding alone, no model | {d['images']} | "
                             f"{d['images_per_s']:.0f} | {d['images_per_s'] / b['onnxruntime']['images_per_s']:.2f} "
                             f"| - | - | {d['seconds']:.2f} |")
            for engine, e in b["engines"].items():
                lines.append(f"| {name} | {engine} | {b['images']} | {e['images_per_s']:.0f} | "
                             f"{e['ratio_to_onnxruntime']:.2f} | {e['decode_s'] if engine == 'local' else '-'} | "
                             f"{e['inference_s'] if engine == 'local' else '-'} | {e['seconds']} |")
    quantized = {n: r["int8"] for n, r in doc["workloads"].items() if r.get("int8")}
    if quantized:
        lines += ["", "## INT8 against fp32 (onnxruntime CPU, QDQ, per-channel weights, minmax calibration on 128 "
                      "training images; verified on the test split)", ""]
        for name, q in quantized.items():
            lines += [f"{name}: this CPU {'has' if q['vnni'] else 'has no'} VNNI; onnxruntime's advice for it is "
                      f"`{q['cpu_format']}`.", "",
                      "| variant | gate | top-1 agreement with fp32 | accuracy (fp32) | "
                      + " | ".join(f"batch {x['batch']} img/s" for x in q["onnxruntime"]["fp32"])
                      + " | best batch / fp32's best | ops left in float |",
                      "|---|---|---|---|" + "---|" * len(q["onnxruntime"]["fp32"]) + "---|---|"]
            best32 = best(q["onnxruntime"]["fp32"], "images_per_s")
            for variant, rows in q["onnxruntime"].items():
                f = q["formats"].get(variant, {})
                gate = "-" if variant == "fp32" else ("passed" if f.get("passed") else "FAILED")
                acc = (f"{f['accuracy_onnxruntime']:.4f} ({f['accuracy_fp32']:.4f})"
                       if f.get("accuracy_onnxruntime") is not None else "-")
                lines.append(f"| {variant} | {gate} | {fmt(f.get('top1_agreement'), '.2%')} | {acc} | "
                             + " | ".join(f"{x['images_per_s']:.0f}" for x in rows)
                             + f" | {best(rows, 'images_per_s') / best32:.2f} | {f.get('ops_in_float') or '-'} |")
            failed = [v for v, f in q["formats"].items() if not f.get("passed")]
            for v in failed:
                lines.append(f"\n{v} failed its gate: {'; '.join(q['formats'][v].get('failures') or [])}")
            srv = q.get("service")
            if srv and srv.get("fp32") and srv.get("int8"):
                a, b = srv["fp32"], srv["int8"]
                lines += ["", f"The service at {a['concurrency']} clients: fp32 {a['throughput_rps']:.0f} req/s, int8 "
                              f"(`{srv['format']}`) {b['throughput_rps']:.0f} req/s "
                              f"({b['throughput_rps'] / a['throughput_rps']:.2f}x)"
                              + ("." if srv.get("gate_passed", True) else
                                 "; no format passed the gate for this model, so the fastest was served for timing "
                                 "only (`cnnserve export --int8` would have written none).")]
            c = (srv or {}).get("auto_choice")
            if c:
                lines += ["", f"`precision=auto` chose **{c['chosen']}** here; warm-up ms per image by batch size: "
                              + "; ".join(f"{p} " + ", ".join(f"batch {b}: {v:.3f}" for b, v in t.items())
                                          for p, t in (c.get("ms_per_image") or {}).items()) + "."]
            lines.append("")
    trials = {n: r["faults"] for n, r in doc["workloads"].items() if r.get("faults")}
    if trials:
        from .faults import report_lines

        lines += ["", "## Reliability: faults under load (`bench/faults.py`; servers with the default 2 workers)", ""]
        for name, t in trials.items():
            lines += [*report_lines(name, t), ""]
    protocols = {n: r["grpc"] for n, r in doc["workloads"].items() if r.get("grpc")}
    if protocols:
        from .grpc_load import report_lines as grpc_lines

        lines += ["", "## gRPC against HTTP (the Open Inference Protocol's infer call, same tensor, protocols "
                      "alternated on one server; `bench/grpc_load.py`, clients on the same cores)", ""]
        lines += [line for name, g in protocols.items() for line in grpc_lines(name, g)]
    costs = {n: r["drift"] for n, r in doc["workloads"].items() if r.get("drift")}
    if costs:
        from .overhead import report_lines as drift_lines

        lines += ["", "## The drift monitor's cost (the service with and without it, side by side; "
                      "`bench/overhead.py`, wrk)", ""]
        lines += [line for name, d in costs.items() for line in drift_lines(name, d)]
    telemetry = {n: r["telemetry"] for n, r in doc["workloads"].items() if r.get("telemetry")}
    if telemetry:
        from .overhead import telemetry_lines

        lines += ["", "## Request telemetry's cost (access lines, JSON logs, tracing; the service once per side, side "
                      "by side; `bench/overhead.py`, wrk)", ""]
        lines += [line for name, d in telemetry.items() for line in telemetry_lines(name, d)]
    shadows = {n: r["shadow"] for n, r in doc["workloads"].items() if r.get("shadow")}
    if shadows:
        from .shadow_section import report_lines as shadow_lines

        lines += ["", "## What a shadow costs the primary (rate 1.0 on a second version against none, one server, "
                      "interleaved; `bench/shadow_section.py`, wrk)", ""]
        lines += [line for name, d in shadows.items() for line in shadow_lines(name, d)]
    calibrations = {n: r["calibration"] for n, r in doc["workloads"].items() if r.get("calibration")}
    if calibrations:
        from .calibration import report_lines as calibration_lines

        lines += ["", "## Calibration and out-of-distribution (measured at export)", ""]
        lines += [line for name, c in calibrations.items() for line in calibration_lines(name, c)]
    lines += ["", f"Reproduce: `{doc['command']}`", ""]
    text = "\n".join(lines)
    stem.with_suffix(".md").write_text(text)
    return text
