"""The README's first command, and its examples, as a user would run them."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CNNSERVE, ROOT, free_port, health_of

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    quick = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^(\./run\.sh \w+)", quick, flags=re.M)
    assert commands == ["./run.sh up", "./run.sh test"]
    assert "./run.sh test" in (ROOT / ".ci" / "run").read_text()


def expected_label(run: Path, sample: str) -> str:
    """What the run's own exported model says of a sample, in-process: the served answer must agree
    (the sample's true class is in its name, but a 98% model may miss one)."""
    from cnnserve.core.preprocess import load_file
    from cnnserve.core.runtime import load_model

    model = load_model(run / "model.onnx", providers="cpu", warm_up=False)
    probs = model.predict(load_file(run / sample, model.spec)[None])
    return model.spec.labels[int(probs.argmax())]


def test_up_trains_exports_stores_and_serves(tmp_path):
    """`cnnserve up` (what ./run.sh up runs) on a fresh run folder ends with the service answering, gRPC
    on the port after HTTP's (never a fixed 3001 that another server on the host may hold: a container of
    another test did, and this server stopped); the README's curl and Python examples work against it as
    written."""
    from grpc_health.v1 import health_pb2

    run = tmp_path / "runs" / "lenet5-digits"
    port = free_port(then_free=1)
    log = open(tmp_path / "up.log", "w+")
    # a store of its own: two BentoML servers sharing one BENTOML_HOME reset each other's Prometheus
    # multiprocess files at start (the session's server then lost its cnnserve_* counters)
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    proc = subprocess.Popen([*CNNSERVE, "up", "--run", str(run), "--port", str(port), "--host", "127.0.0.1"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, tail(log.name)
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("service not ready:\n" + tail(log.name))
        for name in ("model.pt", "model.onnx", "model.verify.json", "curves.png", "sample-7.png"):
            assert (run / name).is_file(), name
        # the README's examples, with the run folder and port of this test
        fix = lambda text: text.replace("runs/lenet5-digits", str(run)).replace(":3000", f":{port}")  # noqa: E731
        curl = fix(re.search(r"^curl .*/classify$", README, flags=re.M).group(0))
        out = subprocess.run(curl, shell=True, capture_output=True, text=True, check=True).stdout
        assert json.loads(out)["predictions"][0]["label"] == expected_label(run, "sample-7.png")
        code = fix(README.split("```python", 1)[1].split("```", 1)[0])
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.splitlines()[0].split()[0] == expected_label(run, "sample-3.png")
        assert f"gRPC on port {port + 1}" in Path(log.name).read_text()
        assert health_of(f"127.0.0.1:{port + 1}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that stopped by itself has failed above
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def tail(path, lines: int = 60) -> str:
    """The end of a log, where a server says why it stopped (CI's report keeps a failure's first lines and
    its last, and a training log's first lines say nothing of it)."""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def test_up_puts_grpc_on_the_port_after_https_unless_told(tmp_path):
    """`up --port P`: gRPC on P+1; --grpc-port wins; an --arg-file naming grpc_port is left to say it."""
    from cnnserve.command.cli import build_parser
    from cnnserve.command.serve import _grpc_port

    named, unnamed = tmp_path / "named.yaml", tmp_path / "unnamed.yaml"
    named.write_text("grpc_port: 7001\nworkers: 1\n")
    unnamed.write_text("workers: 1\n")
    parse = build_parser().parse_args
    assert _grpc_port(parse(["up"])) == 3001
    assert _grpc_port(parse(["up", "--port", "4000"])) == 4001
    assert _grpc_port(parse(["up", "--port", "4000", "--grpc-port", "0"])) == 0
    assert _grpc_port(parse(["up", "--port", "4000", "--arg-file", str(named)])) is None
    assert _grpc_port(parse(["up", "--port", "4000", "--arg-file", str(unnamed)])) == 4001
    assert _grpc_port(parse(["up", "--arg-file", str(named), "--grpc-port", "5001"])) == 5001


@contextlib.contextmanager
def held(*ports: int):
    """Listening sockets on 127.0.0.1 holding ``ports``, as another server would."""
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            socks.append(s)
        yield
    finally:
        for s in socks:
            s.close()


# which ports a socket holds: HTTP's (P), gRPC's (P+1), both
TAKEN = [("HTTP",), ("gRPC",), ("HTTP", "gRPC")]


def _taken_line(out: str) -> list[str]:
    return [line for line in out.splitlines() if "is taken" in line or "are taken" in line]


@pytest.mark.parametrize("taken", TAKEN, ids=["+".join(t) for t in TAKEN])
def test_up_with_a_port_taken_says_which_in_one_line_before_serving(taken, default_run, tmp_path):
    """`cnnserve up` on a port another server holds: one line naming each taken port, exit non-zero, and
    nothing said about serving (not a "serving ... on" line and then BentoML's 50-line traceback)."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pt", "model.onnx"):  # a trained, exported run: up goes straight to serving
        shutil.copy2(default_run / name, run / name)
    port = free_port(then_free=1)
    ports = {"HTTP": port, "gRPC": port + 1}
    with held(*(ports[k] for k in taken)):
        r = subprocess.run([*CNNSERVE, "up", "--run", str(run), "--port", str(port), "--host", "127.0.0.1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "serving" not in out.lower() and "Traceback" not in out, out[-3000:]
    lines = _taken_line(out)
    assert len(lines) == 1, out[-3000:]
    for k, p in ports.items():
        assert (f"{k}'s port {p}" in lines[0]) == (k in taken), lines[0]


@pytest.mark.parametrize("taken", TAKEN, ids=["+".join(t) for t in TAKEN])
def test_bentoml_serve_with_a_port_taken_says_which_in_one_line(taken, stored_default):
    """`bentoml serve` of the service (what the container and the README's second server run): the same one
    line from its first process, naming each taken port, before any worker starts."""
    from tests.conftest import serve_until_exit

    port = free_port(then_free=1)
    ports = {"HTTP": port, "gRPC": port + 1}
    with held(*(ports[k] for k in taken)):
        status, out, _ = serve_until_exit("--arg", f"models={stored_default}", "--arg", f"grpc_port={port + 1}",
                                          port=port, timeout=120)
    assert status != 0 and "Traceback" not in out and "Starting production" not in out, out[-3000:]
    lines = _taken_line(out)
    assert len(lines) == 1, out[-3000:]
    for k, p in ports.items():
        assert (f"{k}'s port {p}" in lines[0]) == (k in taken), lines[0]


def test_version_prints_cnnserves_own():
    """`cnnserve --version`: cnnserve's version (the package's, as pyproject.toml gives it), nothing else."""
    import tomllib

    from cnnserve import __version__

    r = subprocess.run([*CNNSERVE, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"cnnserve {__version__}", r.stdout + r.stderr
    assert __version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
