"""`cnnserve tune` end to end: real servers on loopback, real wrk, a tiny budget; the file it writes starts a
server with those settings."""

from __future__ import annotations

import shutil
import struct

import pytest
import yaml

from cnnserve.bench.faults import worker_pids

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

    doc = yaml.safe_load(out.read_text())
    assert doc["models"] == stored_default
    assert {"workers", "threads", "max_batch_size", "max_wait_ms"} <= set(doc)
    report = (tmp_path / "tuned.md").read_text()
    rows = table_rows(report)
    trials = sorted({row[0].split()[0] for row in rows})
    assert 2 <= len(trials) <= 3 and len(rows) == len(trials)  # one row per trial at the one concurrency
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
