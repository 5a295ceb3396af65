"""The README's first command, and its examples, as a user would run them."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CNNSERVE, ROOT, free_port

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
    """`cnnserve up` (what ./run.sh up runs) on a fresh run folder ends with the service answering;
    the README's curl and Python examples work against it as written."""
    run = tmp_path / "runs" / "lenet5-digits"
    port = free_port()
    log = open(tmp_path / "up.log", "w+")
    # a store of its own: two BentoML servers sharing one BENTOML_HOME reset each other's Prometheus
    # multiprocess files at start (the session's server then lost its cnnserve_* counters)
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    proc = subprocess.Popen([*CNNSERVE, "up", "--run", str(run), "--port", str(port), "--host", "127.0.0.1"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("service not ready:\n" + Path(log.name).read_text())
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
