"""The benchmark harness, run for real on a tiny budget: cnnserve and the naive BentoML baseline under
the load generator, onnxruntime and PyTorch in-process, batch scoring; the report's files and figures.
(Speed is never asserted here: these machines are noisy. The harness's report is where speed lives.)"""

import json
import math
import shutil

import pytest

from bench.floor_section import cpu_ms
from bench.http_sections import summarise
from bench.load import multipart, parse_server_timing
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_server_timing_and_multipart_helpers():
    assert parse_server_timing("decode;dur=0.412, total;desc=\"x\";dur=2.5, bad;dur=x, nodur") == {
        "decode": 0.412, "total": 2.5}
    body, ctype = multipart("image", "a.png", b"\x89PNG...", "image/png")
    boundary = ctype.split("boundary=")[1]
    assert ctype.startswith("multipart/form-data; ")
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert b'name="image"; filename="a.png"' in body and b"\r\n\r\n\x89PNG...\r\n" in body


def load_run(rps: float, requests: int, p99: float, non_200: int = 0, total_ms: float | None = None) -> dict:
    """One run of the load generator as ``bench/load.py`` reports it."""
    return {"concurrency": 8, "duration_s": 2.0, "throughput_rps": rps, "requests": requests, "n_503": 0,
            "n_non_200": non_200, "latency_ms": {"p50": p99 / 4, "p95": p99 / 2, "p99": p99, "mean": p99 / 3,
                                                 "max": p99 * 2},
            **({"server_timing_ms": {"total": total_ms}} if total_ms is not None else {})}


def test_repeated_runs_are_summarised_by_their_median_and_spread():
    """Known runs, known figures: the middle run's req/s (whatever order the runs came in), the slowest and
    fastest as the spread, the runs' counts summed, each latency quantile's median, the stages' mean."""
    runs = [load_run(300.0, 600, 9.0, total_ms=2.0), load_run(100.0, 200, 30.0, non_200=2, total_ms=4.0),
            load_run(250.0, 500, 12.0, total_ms=6.0)]
    row = summarise(runs)
    assert row["throughput_rps"] == 250.0 and row["spread"] == [100.0, 300.0]
    assert (row["repeats"], row["requests"], row["n_non_200"]) == (3, 1300, 2)
    assert row["latency_ms"]["p99"] == 12.0 and row["latency_ms"]["max"] == 24.0
    assert row["server_timing_ms"] == {"total": 4.0}
    assert summarise(runs[:2])["throughput_rps"] == 200.0  # two runs: halfway between them
    assert "server_timing_ms" not in summarise([load_run(100.0, 200, 30.0)])  # a server that does not say


def test_cpu_ms_is_the_cores_time_per_request(monkeypatch):
    """Four cores kept busy for a second by 2000 requests: 2 CPU-ms each; no requests, no figure."""
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert cpu_ms(2000.0) == 2.0 and cpu_ms(500.0) == 8.0
    assert math.isnan(cpu_ms(0.0))


def test_bench_runs_end_to_end_and_reports(tmp_path, default_run, default_onnx):
    out = tmp_path / "report"
    # the session's default run and its export: the harness need not train or export again
    run = tmp_path / "work" / "runs" / "lenet5-digits"
    run.mkdir(parents=True)
    shutil.copyfile(default_run / "model.pt", run / "model.pt")
    shutil.copyfile(default_onnx, run / "model.onnx")  # copied second, so it is not older than the checkpoint
    proc = run_cli("bench", "--models", "lenet5", "--sections", "pytorch", "onnxruntime", "service", "floor", "naive",
                   "batch", "grpc", "drift",
                   "--engines", "local", "--concurrency", "1", "8", "--duration", "2", "--short", "1",
                   "--http-repeats", "2", "--warmup", "0.5", "--seconds", "0.2", "--repeats", "2",
                   "--score-images", "64", "--work", str(tmp_path / "work"), "--out", str(out), timeout=600,
                   # a model store of its own: servers sharing one BENTOML_HOME reset each other's
                   # Prometheus files, and the suite's shared server may be running
                   env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    r = doc["workloads"]["lenet5"]
    assert doc["machine"]["cores"] and doc["http_repeats"] == 2
    assert [x["batch"] for x in r["onnxruntime"]] == [1, 8, 32, 128] and all(x["images_per_s"] > 0 for x in r["pytorch"])
    for key in ("service", "naive"):
        assert [x["concurrency"] for x in r[key]] == [1, 8]
        for row in r[key]:
            assert row["repeats"] == len(row["runs"]) == 2
            assert row["n_non_200"] == 0 and all(run["throughput_rps"] > 0 for run in row["runs"])
    stages = r["service"][1]["server_timing_ms"]  # cnnserve says where the time went; the baseline cannot
    assert {"decode", "queue", "inference", "total", "client"} <= set(stages) and stages["client"] >= stages["total"]
    assert "server_timing_ms" not in r["naive"][0]
    assert r["batch"]["images"] == 64 and r["batch"]["engines"]["local"]["scored"] == 64
    # the floor: a bare ASGI app and cnnserve under wrk (installed by .ci/run), CPU-ms per request
    if shutil.which("wrk"):
        f = r["floor"]
        assert f["concurrency"] == 8 and f["floor"]["failures"] == 0 and f["cnnserve"]["failures"] == 0
        # which is faster is the report's to say, never a test's: these machines are noisy
        assert all(f[side]["throughput_rps"] > 0 and f[side]["cpu_ms"] > 0 for side in ("floor", "cnnserve"))
    else:
        assert "wrk is not installed" in r["floor_error"]
    # the service's settings are what `cnnserve tune` chose for this workload (bench/tuned/lenet5.yaml)
    assert r["serve_from"] == "chosen by cnnserve tune: bench/tuned/lenet5.yaml" and r["serve"]["max_batch_size"] > 0
    # gRPC against HTTP, same server, same tensor, alternated
    g = r["grpc"]
    assert [(x["clients"], x["protocol"]) for x in g["rows"]] == [(1, "http"), (1, "grpc"), (8, "http"), (8, "grpc")]
    assert all(x["rounds"] == 2 and x["failures"] == 0 and x["throughput_rps"] > 0 for x in g["rows"])
    # the drift monitor on and off, side by side, interleaved (wrk)
    if shutil.which("wrk"):
        d = r["drift"]
        assert set(d["sides"]) == {"monitor on", "monitor off"} and d["repeats"] == 2
        assert all(len(x["runs"]) == 2 and x["failures"] == 0 and x["throughput_rps"] > 0 for x in d["sides"].values())
    md = out.with_suffix(".md").read_text()
    assert "## gRPC against HTTP" in md and ("## The drift monitor's cost" in md) == bool(shutil.which("wrk"))
    assert "## Ratios" in md and "naive BentoML (baseline)" in md and "Where the time of one request goes" in md
    assert ("## Against the HTTP floor" in md) == bool(shutil.which("wrk"))
    assert "NOT MEASURED: the naive-baseline target is set at 64 clients" in md  # 8 were run
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert str(tmp_path) not in md  # reports name no machine's paths


def test_the_shadow_section_measures_both_sides_and_the_share_the_shadow_ran(tmp_path, default_run, default_onnx):
    """``--sections shadow`` at a tiny budget (one round of 2 s, LeNet-5, 64 clients): one server, the no-shadow
    and the rate-1.0 sides, and a shadow that ran (the server's own count) on a candidate answering as the primary."""
    if not shutil.which("wrk"):
        pytest.skip("wrk is not installed (the section reports that; the drift test checks the message)")
    out = tmp_path / "report"
    run = tmp_path / "work" / "runs" / "lenet5-digits"
    run.mkdir(parents=True)
    shutil.copyfile(default_run / "model.pt", run / "model.pt")
    shutil.copyfile(default_onnx, run / "model.onnx")  # copied second, so it is not older than the checkpoint
    proc = run_cli("bench", "--models", "lenet5", "--sections", "shadow", "--concurrency", "64", "--duration", "2",
                   "--http-repeats", "1", "--warmup", "0.5", "--work", str(tmp_path / "work"), "--out", str(out),
                   timeout=600, env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.with_suffix(".json").read_text())["workloads"]["lenet5"]["shadow"]
    assert list(d["sides"]) == ["no shadow", "shadow 1.0"] and d["concurrency"] == 64 and d["repeats"] == 1
    assert all(len(x["runs"]) == 1 and x["failures"] == 0 and x["throughput_rps"] > 0 for x in d["sides"].values())
    assert "shadow" not in d["sides"]["no shadow"]["runs"][0]  # its share is counted on the shadow side only
    s = d["shadow"]
    assert s["ran"] > 0 and 0 < s["share_ran"] <= 1 and s["agreement"] == 1.0  # the same file answers alike
    # every request wrk saw answered was offered to the shadow (rate 1.0), and the server's runs and drops account
    # for each, give or take the requests in flight as each of the two wrk runs (warm-up, measure) ended
    r = d["sides"]["shadow 1.0"]["runs"][0]["shadow"]
    assert r["offered"] <= r["ran"] + r["dropped"] <= r["offered"] + 2 * 64
    assert d["ratios"]["throughput"]["ratio"] > 0 and d["ratios"]["p99"]["ratio"] > 0  # met or not: the report's
    md = out.with_suffix(".md").read_text()
    assert "## What a shadow costs the primary" in md and "| no shadow |" in md and "| shadow 1.0 |" in md
    assert "- the shadow ran " in md and md.count("target ") == 2
    assert str(tmp_path) not in md


def test_the_shadow_summary_takes_the_rounds_ratios_and_misses_a_round_with_no_answer():
    """Known rounds, known verdicts: the medians of the rounds' shadow / no-shadow ratios against the targets, the
    share the shadow ran over every round; a shadow round that completed no request (wrk gives it p99 0) is no
    latency at all, never a p99 ratio of 0 that meets its target."""
    from bench.shadow_section import report_lines, summarise

    def run(rps, p99, requests=1000, ran=None, dropped=0):
        return {"throughput_rps": rps, "p50_ms": p99 / 4, "p99_ms": p99, "requests": requests, "failures": 0,
                **({"shadow": {"ran": ran, "dropped": dropped, "agreement": 1.0}} if ran is not None else {})}

    off = [run(1000, 100), run(800, 100), run(900, 100)]
    on = [run(950, 120, ran=900, dropped=50), run(720, 200, ran=700, dropped=20), run(900, 100, ran=900)]
    d = summarise({"no shadow": off, "shadow 1.0": on}, 64, 30, 3, "v2")
    assert d["ratios"]["throughput"]["ratio"] == 0.95 and d["ratios"]["throughput"]["met"]
    assert d["ratios"]["p99"]["ratio"] == 1.2 and d["ratios"]["p99"]["met"] and d["shadow"]["ran"] == 2500
    assert d["shadow"]["share_ran"] == 2500 / 2570 and d["sides"]["shadow 1.0"]["p99_ms"] == 120
    on[1] = run(0, 0, requests=0, ran=30, dropped=0)
    d = summarise({"no shadow": off, "shadow 1.0": on}, 64, 30, 3, "v2")
    p99 = d["ratios"]["p99"]
    assert p99["empty_rounds"] == 1 and p99["spread"] == [1.0, 1.2] and not p99["met"]
    assert d["sides"]["shadow 1.0"]["p99_ms"] == 110  # the two rounds with answers
    line = report_lines("lenet5", d)[-2]
    assert line.startswith("- shadow / no shadow, p99: 1.100") and "1 round(s)" in line and "**MISSED**" in line


def test_the_gpu_mode_rehearses_end_to_end_on_the_cpu(tmp_path, default_onnx):
    """``cnnserve bench --gpu`` where onnxruntime has no working CUDA: every step of the device run (the
    weightless graph, weights by rule, fp16 variants, correctness, the three onnxruntime methods, PyTorch eager,
    the service under several load processes, the report) runs on the CPU provider at a small size, and the
    report says no target was measured. The device's minutes are then not spent finding a typo."""
    from cnnserve.core.runtime import cuda_works

    if cuda_works():
        pytest.skip("onnxruntime runs on CUDA here: the GPU mode itself is what runs here (bench/results)")
    work, out = tmp_path / "work", tmp_path / "gpu"
    before = sorted(default_onnx.parent.glob("*.onnx"))
    r = run_cli("bench", "--gpu", "--gpu-prepare", "--gpu-arches", "resnet18", "--gpu-size", "32", "--work", str(work))
    assert r.returncode == 0, r.stderr
    skeleton = work / "gpu" / "skeletons" / "resnet18-32.skeleton.onnx"
    assert skeleton.stat().st_size < 1_000_000  # the weights stayed behind: ResNet-18's fp32 file is 45 MB
    r = run_cli("bench", "--gpu", "--gpu-arches", "resnet18", "--gpu-size", "32", "--gpu-trained", str(default_onnx),
                "--seconds", "0.2", "--short", "2", "--warmup", "0.5", "--gpu-clients", "4", "--gpu-load-procs", "2",
                "--work", str(work), "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["mode"] == "rehearsal" and doc["device"]["available_providers"]
    assert doc["targets"] and all(t["state"].startswith("NOT MEASURED") for t in doc["targets"])
    c = doc["correctness"]
    assert c["fp32"]["providers"][0] == "CPUExecutionProvider" and c["fp32"]["max_logit_diff"] == 0.0
    assert c["fp16"]["top1_agreement"] >= 0.9  # fp16 made from the export, on real rendered images
    # made in the work folder, never beside the export (`cnnserve store` would ship it as a checked variant)
    assert (work / "gpu" / "trained" / "model.fp16.onnx").is_file() and sorted(default_onnx.parent.glob("*.onnx")) == before
    r18 = doc["arches"]["resnet18"]
    for precision in ("fp32", "fp16"):
        assert set(r18["in_process"][precision]) == {"plain", "io_binding", "buckets"}
        assert all(x["images_per_s"] > 0 for rows in r18["in_process"][precision].values() for x in rows)
    assert [x["batch"] for x in r18["pytorch"]] == [1, 4]
    s = r18["service"]
    assert s["served"]["runner"] == "io_binding on cpu:0" and s["served"]["providers"][0] == "CPUExecutionProvider"
    assert s["runs"][0]["processes"] == 2 and s["runs"][0]["requests"] > 0 and s["runs"][0]["n_non_200"] == 0
    assert s["reference_images_per_s"] > 0 and s["reference"].startswith(f"{s['served']['precision']} io_binding ")
    md = out.with_suffix(".md").read_text()
    assert "**Rehearsal**" in md and "| fp16 | io_binding |" in md
    assert out.with_suffix(".png").stat().st_size > 10_000
    # a part that fails on the device is reported in words, and the rest of the report still renders
    from bench.gpu_report import judge, markdown

    r18["in_process"]["fp16"]["buckets"] = "failed: RuntimeError: capture refused"
    r18["pytorch"] = "failed: ImportError: no torch"
    doc["correctness"] = "failed: ModelLoadError: CUDA was required but onnxruntime fell back"
    doc["mode"] = "gpu"
    md, targets = markdown(doc | {"targets": judge(doc)}), judge(doc)
    assert "| fp16 | buckets | failed: RuntimeError: capture refused |" in md and "- pytorch: failed" in md
    assert targets[0]["state"] == "MISSED" and targets[0]["target"].endswith("on CUDAExecutionProvider")


def test_telemetry_targets_are_judged_against_both_plain_servers():
    """A side 1% above the first plain server but 4% below the mean of the two (the baseline's very code served
    twice, which read up to 1.047 of each other in one day's runs) misses a 0.97 target."""
    from bench.overhead import TELEMETRY_TARGETS, telemetry_targets

    def rounds(*rates):
        return [{"throughput_rps": r} for r in rates]

    runs = {"as shipped": rounds(100, 200, 300), "tracing 0": rounds(110, 220, 330),
            "JSON logs": rounds(101, 202, 303), "tracing 0.01": rounds(105, 210, 315)}
    targets = telemetry_targets(runs)
    assert set(targets) == set(TELEMETRY_TARGETS)
    assert targets["JSON logs"]["met"] is False and round(targets["JSON logs"]["ratio"], 3) == 0.962
    assert targets["tracing 0.01"]["met"] is True and targets["tracing 0.01"]["ratio"] == 1.0


def test_a_run_waits_until_the_servers_have_worked_off_the_last_one():
    """``settle`` returns once the process tree is idle: a child still busy (a server finishing the requests wrk
    left in flight, or exporting spans) has finished by then."""
    import os
    import subprocess
    import sys

    from bench.tune_measure import settle

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 1.5: pass"])
    try:
        settle(os.getpid(), idle_cores=0.1, limit=60)
        assert busy.poll() is not None, "settle returned while a child was still working"
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("n", range(1, 9))
def test_interleaved_rounds_balance_who_goes_first_and_who_follows_whom(n):
    from collections import Counter

    from bench.overhead import balanced_orders

    rows = balanced_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    firsts = Counter(row[0] for row in rows)
    assert set(firsts) == set(range(n)) and len(set(firsts.values())) == 1
    follows = Counter((a, b) for row in rows for a, b in zip(row, row[1:]))
    if n > 1:  # every ordered pair of two sides, each as often as the others
        assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
        assert len(set(follows.values())) == 1


def test_the_telemetry_section_is_drawn_beside_its_numbers(tmp_path):
    """A telemetry-only report gets its PNG (the section's sides against both plain servers, round by round),
    from a committed run's JSON."""
    from pathlib import Path

    from bench.report_plots import plot

    doc = json.loads((Path(__file__).parents[1] / "bench/results/2026-12-07-vm-telemetry-8.json").read_text())
    plot(doc, tmp_path / "report")
    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
