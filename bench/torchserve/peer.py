"""PEER, NOT CNNSERVE: TorchServe serving the same trained model, for `cnnserve bench --sections torchserve`.

TorchServe 0.12 (the last release; the project is archived) is installed by the harness
into ``bench/work/torchserve-pkgs`` (``pip install --target``, no dependencies beyond what
the project's environment has), so it never becomes a dependency of cnnserve. Java 11+
must be on the PATH. The model is the workload's checkpoint traced to TorchScript,
archived with ``torch-model-archiver`` and ``handler.py``; TorchServe runs it with
``workers`` Python workers and its own dynamic batching (``batch_size``, ``max_batch_delay``
in ms), on loopback ports. Clients POST multipart form data with the image in ``data``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / "bench" / "work" / "torchserve"
PKGS = ROOT / "bench" / "work" / "torchserve-pkgs"
VERSION = "0.12.0"


class Unavailable(RuntimeError):
    """TorchServe cannot run here; the message says why."""


def install() -> Path:
    """TorchServe and its archiver into ``bench/work/torchserve-pkgs`` (once)."""
    if not shutil.which("java"):
        raise Unavailable("no java on the PATH (TorchServe's frontend is a Java server)")
    if not (PKGS / "ts" / "frontend" / "model-server.jar").is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(PKGS), "--no-deps",
                               f"torchserve=={VERSION}", f"torch-model-archiver=={VERSION}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise Unavailable(f"pip could not install torchserve {VERSION}: {proc.stderr.strip()[-300:]}")
    return PKGS


def archive(run: Path, name: str) -> Path:
    """The run's checkpoint as TorchScript in a .mar with ``handler.py``; rebuilt when the checkpoint changes."""
    import torch

    from cnnserve.models.checkpoint import classifier_from_checkpoint, load_checkpoint

    store = WORK / "model-store"
    mar = store / f"{name}.mar"
    ckpt_path = run / "model.pt"
    if mar.is_file() and mar.stat().st_mtime > ckpt_path.stat().st_mtime:
        return mar
    store.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path)
    model = classifier_from_checkpoint(ckpt).eval()
    spec = model.spec
    example = torch.zeros((1, *spec.input_shape), dtype=torch.uint8)
    traced = WORK / f"{name}.torchscript.pt"
    with torch.inference_mode():
        torch.jit.trace(model, example).save(str(traced))
    config = WORK / f"{name}.yaml"
    config.write_text(json.dumps({"handler": {"input_shape": list(spec.input_shape), "labels": list(spec.labels)}}))
    env = {**os.environ, "PYTHONPATH": str(PKGS)}
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1",
                    "--serialized-file", str(traced), "--handler", str(HERE / "handler.py"), "--config-file",
                    str(config), "--export-path", str(store), "--force"], check=True, env=env)
    return mar


class TorchServe:
    """``torchserve --foreground`` with one model, on free loopback ports, until ``stop()``."""

    def __init__(self, mar: Path, workers: int, batch_size: int, max_batch_delay_ms: int, ready_timeout: float = 180):
        from tests.support.server import free_port

        self.name = mar.stem
        port, mgmt, metrics = free_port(), free_port(), free_port()
        self.url, self.management = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mgmt}"
        home = WORK / f"home-{port}"
        home.mkdir(parents=True, exist_ok=True)
        models = {self.name: {"1": {"marName": mar.name, "minWorkers": workers, "maxWorkers": workers,
                                    "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
                                    "responseTimeout": 60}}}
        (home / "config.properties").write_text("\n".join([
            f"inference_address=http://127.0.0.1:{port}", f"management_address=http://127.0.0.1:{mgmt}",
            f"metrics_address=http://127.0.0.1:{metrics}", f"model_store={mar.parent}",
            "grpc_inference_address=127.0.0.1", "grpc_management_address=127.0.0.1",
            f"grpc_inference_port={free_port()}", f"grpc_management_port={free_port()}",
            f"load_models={mar.name}", "disable_token_authorization=true", "enable_envvars_config=false",
            "install_py_dep_per_model=false", f"default_workers_per_model={workers}",
            f"models={json.dumps(models)}", ""]))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PKGS), str(ROOT)]), "LOG_LOCATION": str(home / "logs"),
               "METRICS_LOCATION": str(home / "logs"), "TS_CONFIG_FILE": str(home / "config.properties"),
               "TMPDIR": str(home),  # TorchServe keeps its pid file there: one per instance
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.log = open(home / "torchserve.out", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs", "--ts-config",
             str(home / "config.properties"), "--model-store", str(mar.parent)],
            cwd=home, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.home = home
        self._wait(ready_timeout)

    def _wait(self, timeout: float) -> None:
        """Until the management API lists every worker of the model as READY."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"torchserve exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"{self.management}/models/{self.name}", timeout=2) as r:
                    workers = json.loads(r.read())[0].get("workers", [])
                if workers and all(w.get("status") == "READY" for w in workers):
                    return
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(1)
        self.stop()
        raise Unavailable(f"torchserve not ready after {timeout:.0f}s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.home / "torchserve.out").read_text()[-1500:]

    def stop(self) -> None:
        from tests.support.server import stop_group

        stop_group(self.proc, 30)
        self.log.close()
