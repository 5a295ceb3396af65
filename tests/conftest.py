"""Shared fixtures: one real training run of the default model, reused by the slower tests."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from tests.support.server import Server, free_port  # noqa: E402,F401  (a real `bentoml serve`, shared with the harness)
# the installed console script when there is one (the real entry point), else the module
_SCRIPT = Path(sys.executable).with_name("cnnserve")
CNNSERVE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cnnserve.command.cli"]

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Every test (and every server or CLI it starts) uses a model store of its own, never the user's.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="cnnserve-bentoml-")


def run_cli(*args, cwd=None, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """The real ``cnnserve`` command in a subprocess."""
    proc = subprocess.run([*CNNSERVE, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"cnnserve {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def serve_until_exit(*args: str, timeout: float = 120, cap_mb: int = 6144, port: int = 0) -> tuple[int, str, float]:
    """``bentoml serve`` of the service in the foreground, on free ports and a model store of its own, each
    process under an address-space cap, until it exits: (status, output, seconds). For servers that must
    refuse to start. gRPC off unless the arguments name its port."""
    import time

    from tests.support.server import cap_memory, home_of_its_own
    from cnnserve.core.store import bentoml_command

    if not any(a.startswith("grpc_port=") for a in args):
        args = (*args, "--arg", "grpc_port=0")
    t = time.monotonic()
    proc = subprocess.run([bentoml_command(), "serve", "cnnserve.service.service:CnnServe", "--host", "127.0.0.1",
                           "--port", str(port or free_port()), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "BENTOML_HOME": home_of_its_own()},
                          preexec_fn=lambda: cap_memory(cap_mb))
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t


def health_of(target: str) -> int:
    """A gRPC server's overall health (``grpc.health.v1``), e.g. ``HealthCheckResponse.SERVING``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """H x W or H x W x 3 uint8 array to image bytes, by Pillow."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def made_once(tmp_path_factory, name: str, make) -> Path:
    """``make(folder)`` once per test run, whatever the number of pytest-xdist processes: the first to
    get here makes it under a file lock in the run's shared base folder, the others wait and reuse it.
    For read-only products that take long to make (trained runs and their exports)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of one run
    if os.environ.get("CNNSERVE_TEST_KEEP"):  # a developer's cache between runs (stale once training changes)
        base = Path(os.environ["CNNSERVE_TEST_KEEP"])
        base.mkdir(parents=True, exist_ok=True)
    folder = base / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".made").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """The default training run (LeNet-5 on digits, default config), trained once per test run and
    exported (fp32, verified) beside its checkpoint."""
    from cnnserve.export.pipeline import export_checkpoint
    from cnnserve.models.train import TrainConfig, train

    def make(folder: Path) -> None:
        train(TrainConfig(out=str(folder)), progress=False)
        export_checkpoint(folder, log=lambda *a: None)

    return made_once(tmp_path_factory, "lenet5-digits", make)


@pytest.fixture(scope="session")
def default_onnx(default_run) -> Path:
    """The default model exported (fp32, verified) beside its checkpoint."""
    return default_run / "model.onnx"


@pytest.fixture(scope="session")
def stored_default(default_onnx) -> str:
    """The default model in the (test) model store; returns its tag."""
    from cnnserve.export.store import store_model

    return str(store_model(default_onnx).tag)


@pytest.fixture(scope="session")
def server(stored_default):
    srv = Server("--arg", f"models={stored_default}")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def shapes_resnet_run(tmp_path_factory) -> Path:
    """A small ResNet-18 trained on shapes at 32 px (short: fine-tuning and int8 tests need its own weights
    and a GAP + linear head, not accuracy)."""
    from cnnserve.models.train import TrainConfig, train

    # no augmentation: four epochs on 64 images make its answers decisive (an augmented, near-chance
    # model's logits nearly tie, and int8's agreement with fp32 on ties is a coin toss: two epochs
    # gave 99.3%, a hair above the gate; four gave 100%)
    return made_once(tmp_path_factory, "shapes-resnet", lambda folder: train(TrainConfig(
        arch="resnet18", data="shapes", img_size=32, limit=64, epochs=4, patience=0, augment=False,
        out=str(folder)), progress=False))


@pytest.fixture(scope="session")
def digits_test(default_run):
    """The default model's held-out test images (uint8 1x28x28) and labels."""
    from cnnserve.models.checkpoint import load_checkpoint
    from cnnserve.models.data import load_dataset

    split = load_dataset("digits", load_checkpoint(default_run)["spec"]).test
    return (np.stack([split[i][0].numpy() for i in range(len(split))]),
            np.array([int(split[i][1]) for i in range(len(split))]))
