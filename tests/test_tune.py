"""`cnnserve tune` end to end: real servers on loopback, real wrk, a tiny budget; the file it writes starts a
server with those settings."""

from __future__ import annotations

import re
import shutil
import struct

import pytest
import yaml

from tests.support.faults import worker_pids

from .conftest import Server, run_cli

pytestmark = pytest.mark.skipif(not shutil.which("wrk"), reason="wrk is not installed (.ci/run apt-installs it)")


def served(srv: Server) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(srv.url + "/models") as r:
        return json.load(r)["models"][0]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def table_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| trial")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_tune_writes_settings_a_server_starts_with(stored_default, tmp_path):
    out = tmp_path / "tuned.yaml"
    r = run_cli("tune", stored_default, "--concurrency", "8", "--duration", "2", "--warmup", "0.5",
                "--max-trials", "3", "--budget-min", "3", "--p99-ms", "1000", "--out", out, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trial 1 (defaults) x8:" in r.stdout and "req/s" in r.stdout  # progress as it runs
    trials = int(re.search(r"(\d+) trials ran", r.stdout).group(1))  # and at the end, how many trials ran

    doc = yaml.safe_load(out.read_text())
    assert doc["models"] == stored_default
    assert {"workers", "threads", "max_batch_size", "max_wait_ms"} <= set(doc)
    report = (tmp_path / "tuned.md").read_text()
    rows = table_rows(report)
    assert 2 <= trials <= 3 and len(rows) == trials  # one row per trial at the one concurrency
    for row in rows:
        assert row[2] == "8" and float(row[3]) > 0 and float(row[6]) > 0  # connections, req/s, p99
        assert float(row[7]) > 0 and float(row[8]) >= 1 and row[9] == "0"  # CPU-ms/req, mean batch, 503s
    assert sum("(chosen)" in row[0] for row in rows) == 1
    width, height = png_size(tmp_path / "tuned.png")
    assert width > 300 and height > 200
    # what the chosen trial measured is what the file holds
    chosen = next(row for row in rows if "(chosen)" in row[0])
    for setting in ([] if chosen[1] == "defaults" else chosen[1].split()):
        key, value = setting.split("=")
        assert str(doc[key]) == value

    # the file as written starts a server with its settings ...
    srv = Server("--arg-file", str(out))
    try:
        m = served(srv)
        assert m["batching"]["max_batch_size"] == doc["max_batch_size"]
        assert len(worker_pids(srv)) == doc["workers"]
    finally:
        srv.stop()
    # ... and settings other than the defaults, from the same kind of file, are the ones served
    doc.update(workers=1, max_batch_size=8)
    out.write_text(yaml.safe_dump(doc))
    srv = Server("--arg-file", str(out))
    try:
        assert served(srv)["batching"]["max_batch_size"] == 8
        assert len(worker_pids(srv)) == 1
    finally:
        srv.stop()


def test_a_constraint_nothing_meets_is_reported(stored_default, tmp_path):
    out = tmp_path / "t.yaml"
    r = run_cli("tune", stored_default, "--concurrency", "4", "--duration", "2", "--warmup", "0",
                "--max-trials", "2", "--p99-ms", "0.001", "--out", out, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no trial met p99 <= 0.001 ms" in r.stdout
    assert "holds the defaults" in out.read_text()  # the file keeps the defaults, and says why
    rows = table_rows((tmp_path / "t.md").read_text())
    assert len(rows) == 2 and all(row[-1] == "no" for row in rows)
    assert "no trial met" in (tmp_path / "t.md").read_text()


def test_a_budget_below_one_pass_over_the_knobs_is_refused_with_what_it_needs(stored_default, tmp_path):
    """One minute ran the defaults' trial and nothing else, then said "no other setting beat them in the
    search". A budget with no room for a second trial and the check is refused before any server starts,
    naming what one pass over the knobs (the defaults, each knob one step, the check) needs; one below that
    pass is warned about."""
    r = run_cli("tune", stored_default, "--budget-min", "1", "--out", tmp_path / "t.yaml", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "trial 1" not in r.stdout and not (tmp_path / "t.yaml").exists(), r.stdout  # nothing was measured
    m = re.search(r"--budget-min 1 leaves no room to try anything beside the defaults; it is below the ([\d.]+) min "
                  r"that one pass over the knobs needs here \((\d+) trials", r.stderr)
    assert m, r.stderr
    assert float(m.group(1)) > 1 and int(m.group(2)) >= 6  # the defaults; workers, threads, batch, wait one step

    from argparse import Namespace
    from pathlib import Path

    from bench.tune_search import Tuner, knobs

    def check(budget_min: float, max_trials: int = 100):
        a = Namespace(max_trials=max_trials, concurrency=[1, 8, 64], duration=5.0, warmup=1.0, budget_min=budget_min)
        tuner = Tuner("m:1", "m", knobs(["fp32"]), Path("."), a)
        return tuner.one_pass(), tuner.budget_check()

    (trials, seconds), (refusal, warning) = check(10)
    assert refusal is None and warning is None and seconds < 600
    _, (refusal, warning) = check(seconds / 60 - 0.5)  # room for some trials, not for the pass: said at the start
    assert refusal is None and "the search may stop before it has tried every knob" in warning
    (fewer, _), (refusal, warning) = check(seconds / 60 - 0.5, max_trials=3)  # fewer trials allowed, less needed
    assert fewer == 3 < trials and refusal is None and warning is None


@pytest.mark.parametrize("args, message", [
    (["nosuch-model:latest"], "'nosuch-model:latest' is not in BentoML's model store"),
    (["M", "--p99-ms", "0"], "argument --p99-ms: '0' must be greater than 0"),
    (["M", "--concurrency", "8", "x"], "argument --concurrency: 'x' is not a number"),
    (["M", "--budget-min", "-1"], "argument --budget-min: '-1' must be greater than 0"),
])
def test_bad_input_is_one_line(stored_default, args, message):
    args = [stored_default if a == "M" else a for a in args]
    r = run_cli("tune", *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_the_climb_moves_one_knob_one_step_and_tries_what_paid_first():
    from bench.tune_search import defaults_point, knobs, neighbours

    space = knobs(["fp32", "int8"])
    base = defaults_point(space)
    moves = neighbours(base, space, None)
    for knob, step, point in moves:
        assert [k for k in point if point[k] != base[k]] == [knob]
        if knob != "precision":
            assert abs(space[knob].index(point[knob]) - space[knob].index(base[knob])) == 1
    assert {p["precision"] for k, _, p in moves if k == "precision"} == {"fp32", "int8"}
    assert [k for k, _, _ in moves[:2]] == ["precision", "precision"]  # tried first: a short budget reaches it
    assert neighbours(base, space, ("max_batch_size", -1))[0][:2] == ("max_batch_size", -1)
    assert "runs_in_flight" not in space and "cuda_graphs" not in space  # nothing to gain on a CPU
    gpu = knobs(["fp32", "fp16"], gpu=True)
    base = defaults_point(gpu)
    assert (base["runs_in_flight"], base["cuda_graphs"]) == (1, False)
    assert {p["cuda_graphs"] for k, _, p in neighbours(base, gpu, None) if k == "cuda_graphs"} == {True}
    assert {p["runs_in_flight"] for k, _, p in neighbours(base, gpu, None) if k == "runs_in_flight"} == {2}


def _trial(n, rps, p99, failures=0, meets=True):
    return {"trial": n, "label": "defaults" if n == 1 else f"workers={n}", "settings": {"workers": n},
            "meets": meets, "rows": [{"concurrency": 64, "throughput_rps": rps, "p99_ms": p99, "failures": failures}]}


def test_a_setting_is_ranked_by_what_it_serves_over_every_concurrency():
    """The tuner's figure is the geometric mean of req/s over the concurrencies: a setting level with the defaults
    at the highest and far faster for a lone client beats them (ResNet-18's one worker against two), and one that
    gains a little at the highest by keeping a lone client waiting does not."""
    from bench.tune_search import better, score, served

    def rows(*rates):
        return [{"concurrency": c, "throughput_rps": r, "p99_ms": 50.0, "failures": 0}
                for c, r in zip((1, 8, 32), rates)]

    two_workers, one_worker = rows(91, 178, 200), rows(139, 182, 198)
    assert served(rows(10, 100, 1000)) == pytest.approx(100)
    assert better(score(one_worker, 100), score(two_workers, 100))
    assert not better(score(rows(60, 178, 210), 100), score(two_workers, 100))


def test_the_winner_is_kept_only_beyond_the_defaults_spread():
    from argparse import Namespace

    from bench.tune_search import better, score
    from bench.tune_report import verdict

    a = Namespace(p99_ms=100.0, concurrency=[64], out="tuned.yaml")
    d, w = _trial(1, 1000, 50), _trial(3, 1200, 60)
    assert better(score(w["rows"], 100), score(d["rows"], 100))
    assert not better(score(_trial(4, 1010, 50)["rows"], 100), score(d["rows"], 100))  # within GAIN: noise
    assert better(score(d["rows"], 100), score(_trial(5, 5000, 150)["rows"], 100))  # meeting p99 comes first
    check = {"concurrency": 64, "median": {"winner": 1200, "defaults": 1000}, "meets": {"winner": True, "defaults": True},
             "kept": True}
    assert verdict(a, d, w, check)[0] is w
    check.update(kept=False, median={"winner": 1050, "defaults": 1000})
    chosen, met, summary = verdict(a, d, w, check)
    assert chosen is d and met and "did not beat them beyond their spread" in summary[0]
