"""Build the serving container in one command: ``bentoml build``, then ``bentoml containerize``.

    ./run.sh container                      # CPU image of the default model
    ./run.sh container --models "lenet5-digits:latest resnet18-shapes:latest" --image-tag cnnserve:1
    ./run.sh container --gpu                # CUDA 13 / cuDNN 9 base (build deploy/gpu/Containerfile first)
    ./run.sh container --arg workers=2 --arg threads=1   # service arguments baked into the image

The engine is docker when a Docker engine answers (``docker info``), podman otherwise.
Extra ``--opt KEY=VALUE`` pass through to the engine's build (``bentoml containerize --opt``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from cnnserve.core.config import DEFAULT_MODEL
from cnnserve.core.store import NotStored, bentoml_command, stored_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = DEFAULT_MODEL


class ContainerError(ValueError):
    """A container build that cannot go ahead; the message says what is missing and how to fix it."""


def _bentoml() -> str:
    try:
        return bentoml_command()
    except FileNotFoundError as e:
        raise ContainerError(str(e)) from None


def choose_backend(preferred: str = "auto") -> str:
    def docker_answers() -> bool:
        if not shutil.which("docker"):
            return False
        try:
            return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    if preferred == "docker" or (preferred == "auto" and docker_answers()):
        if not docker_answers():
            raise ContainerError("docker was asked for, but no Docker engine answers `docker info`")
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise ContainerError("no container engine: no Docker engine answers `docker info` and podman is not installed "
                         "(Debian/Ubuntu: apt-get install podman)")


def check_models(tags: list[str]) -> None:
    """Every tag must be in the model store: the bento carries the models it serves."""
    if not tags:
        raise ContainerError("no model to put in the image (--models is empty)")
    for tag in tags:
        try:
            stored_model(tag)
        except NotStored as e:
            raise ContainerError(f"{e} (the image carries the models it serves)") from None


def build_bento(tags: list[str], gpu: bool = False, args: list[str] | None = None) -> str:
    """``bentoml build`` with the models (and any other service arguments, KEY=VALUE) as the bento's
    arguments; returns the bento tag. Settings read when the service is declared (``workers``) are
    fixed here; per-worker ones (``providers``, limits) can still be overridden by ``serve --arg``."""
    bentofile = "bentofile-gpu.yaml" if gpu else "bentofile.yaml"
    extra = [a for kv in (args or []) for a in ("--arg", kv)]
    cmd = [_bentoml(), "build", "-f", bentofile, "--arg", "models=" + " ".join(tags), *extra, "--output", "tag"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    match = re.search(r"__tag__:(\S+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise ContainerError(f"bentoml build failed:\n{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return match.group(1)


def containerize(bento: str, backend: str, image_tag: str | None, opts: list[str]) -> str:
    image = image_tag or bento
    cmd = [_bentoml(), "containerize", bento, "--backend", backend, "--image-tag", image,
           *[f"--opt={o}" for o in opts]]
    print("+ " + " ".join(cmd), flush=True)
    # Run from the temporary directory's parent: containerize copies the bento to a temporary directory and
    # refuses the Dockerfile template it finds there (deploy/bento/) as "outside of the working directory"
    # unless the working directory holds it (BentoML 1.4.40, bentoml/_internal/container/generate.py).
    if subprocess.run(cmd, cwd=tempfile.gettempdir()).returncode != 0:
        raise ContainerError(f"bentoml containerize with {backend} failed (see its output above)")
    return image


def main(models: str = DEFAULT_MODELS, gpu: bool = False, backend: str = "auto", image_tag: str | None = None,
         opts: list[str] | None = None, args: list[str] | None = None) -> int:
    tags = models.split()
    check_models(tags)
    engine = choose_backend(backend)
    bento = build_bento(tags, gpu, args)
    print(f"built bento {bento}")
    image = containerize(bento, engine, image_tag, opts or [])
    print(f"built image {image} with {engine}. Run it:\n"
          f"  {engine} run --rm -p 3000:3000 {image}" + (" --gpus all" if gpu else "") +
          "\n  curl -F image=@runs/lenet5-digits/sample-7.png http://localhost:3000/classify")
    return 0
