"""Build the serving container in one command: the project's wheel, ``bentoml build``, then ``bentoml containerize``.

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
import sys
import tempfile
from collections import deque
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


WHEEL_DIR = ROOT / "build" / "wheel"  # git-ignored, as all of build/


def build_wheel(bentofile: str = "bentofile.yaml") -> Path:
    """The project as a wheel, built from the working tree into build/wheel/, where ``bentofile`` names it
    (``python.wheels``); the image installs it, and the serving lock, with ``--no-deps``. Returns its path."""
    import yaml

    named = (yaml.safe_load((ROOT / bentofile).read_text()).get("python") or {}).get("wheels") or []
    shutil.rmtree(WHEEL_DIR, ignore_errors=True)
    # setuptools builds in the tree and packs all of build/lib: a module deleted since the last build would
    # still be in the wheel unless that goes first
    for scratch in (ROOT / "build").glob("bdist.*"):
        shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(ROOT / "build" / "lib", ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
           "--wheel-dir", str(WHEEL_DIR), str(ROOT)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        output = "\n".join(line for line in (proc.stderr + proc.stdout).splitlines()
                           if "is ignored: it is neither a file nor a directory" not in line)
        raise ContainerError("building the cnnserve wheel for the bento failed (" + " ".join(cmd[2:]) + "):\n"
                             + output.strip()[-2000:])
    built = sorted(WHEEL_DIR.glob("*.whl"))
    if [ROOT / w for w in named] != built:
        made = ", ".join(str(w.relative_to(ROOT)) for w in built) or "none"
        raise ContainerError(f"{bentofile} names the wheel {', '.join(named) or '(none)'} (python.wheels), but the "
                             f"build made {made}: make them agree (the file name carries pyproject.toml's version)")
    return built[0]


def build_bento(tags: list[str], gpu: bool = False, args: list[str] | None = None) -> str:
    """``bentoml build`` with the models (and any other service arguments, KEY=VALUE) as the bento's
    arguments, after the wheel it carries; returns the bento tag. Settings read when the service is declared
    (``workers``) are fixed here; per-worker ones (``providers``, limits) can still be overridden by
    ``serve --arg``."""
    bentofile = "bentofile-gpu.yaml" if gpu else "bentofile.yaml"
    build_wheel(bentofile)
    extra = [a for kv in (args or []) for a in ("--arg", kv)]
    cmd = [_bentoml(), "build", "-f", bentofile, "--arg", "models=" + " ".join(tags), *extra, "--output", "tag"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    match = re.search(r"__tag__:(\S+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise ContainerError(f"bentoml build failed:\n{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return match.group(1)


CA = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle, on the host and in the image: the one mounted over
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")

# A build through a proxy that re-signs TLS with its own CA: uv (the bento's Dockerfile installs the lock with it)
# says UnknownIssuer; pip and Python's ssl say CERTIFICATE_VERIFY_FAILED.
_TLS = re.compile(r"invalid peer certificate: UnknownIssuer|CERTIFICATE_VERIFY_FAILED|certificate verify failed", re.I)
# runc: "error setting rlimit type 7: operation not permitted"; crun: "setrlimit `RLIMIT_NOFILE`: Operation not
# permitted": the host refuses the engine's default open-file and process limits
_RLIMIT = re.compile(r"(setrlimit|setting rlimit)[^\n]*operation not permitted", re.I)


def build_hints(output: str, backend: str) -> list[str]:
    """The remedies for the failures a build's ``output`` shows that have a known one (docs/containers.md); the
    build's own error stays above them, so these name only what to pass."""
    hints = []
    if _TLS.search(output):
        hints.append(
            "the image's package downloads failed TLS verification: a proxy on this network re-signs TLS with a CA "
            "the build does not trust. Build on the host's network with the host's CA bundle mounted over the "
            f"image's: --opt network=host --opt volume={CA}:{CA}:ro (uv in the build reads it where the base sets "
            "SSL_CERT_FILE or UV_NATIVE_TLS, as deploy/local-base-image.sh's does; docs/containers.md)")
    if _RLIMIT.search(output):
        hints.append(
            f"this host refuses {backend}'s default ulimits: build with "
            + " ".join(f"--opt ulimit={u}" for u in ULIMITS) + f", and run the image with "
            + " ".join(f"--ulimit {u}" for u in ULIMITS) + " (docs/containers.md)")
    return hints


def run_needs_ulimits(engine: str, image: str) -> bool:
    """Whether ``engine run`` of ``image`` is refused the engine's default ulimits on this host (a container that
    runs ``true`` and exits, started once to find out)."""
    try:
        probe = subprocess.run([engine, "run", "--rm", "--network=none", "--entrypoint", "true", image],
                               capture_output=True, text=True, errors="replace", timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode != 0 and bool(_RLIMIT.search(probe.stdout + probe.stderr))


def containerize(bento: str, backend: str, image_tag: str | None, opts: list[str]) -> str:
    image = image_tag or bento
    cmd = [_bentoml(), "containerize", bento, "--backend", backend, "--image-tag", image,
           *[f"--opt={o}" for o in opts]]
    print("+ " + " ".join(cmd), flush=True)
    # Run from the temporary directory's parent: containerize copies the bento to a temporary directory and
    # refuses the Dockerfile template it finds there (deploy/bento/) as "outside of the working directory"
    # unless the working directory holds it (BentoML 1.4.40, bentoml/_internal/container/generate.py).
    # Its output goes to the user as it comes, and its end is kept to be read for a known failure.
    tail: deque[str] = deque(maxlen=5000)
    with subprocess.Popen(cmd, cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
    if proc.returncode != 0:
        hints = build_hints("".join(tail), backend)
        raise ContainerError(f"bentoml containerize with {backend} failed (see its output above)"
                             + "".join(f"\n  {h}" for h in hints))
    return image


def main(models: str = DEFAULT_MODELS, gpu: bool = False, backend: str = "auto", image_tag: str | None = None,
         opts: list[str] | None = None, args: list[str] | None = None) -> int:
    tags = models.split()
    check_models(tags)
    engine = choose_backend(backend)
    bento = build_bento(tags, gpu, args)
    print(f"built bento {bento}")
    image = containerize(bento, engine, image_tag, opts or [])
    # a host that refused the engine's default ulimits for the build refuses them for `run` too; and podman's
    # `run` can be refused them where its build was not (so on this project's machines): asked once, here
    ulimits = [o.split("=", 1)[1] for o in opts or [] if o.startswith("ulimit=")]
    if not ulimits and engine == "podman" and run_needs_ulimits(engine, image):
        ulimits = list(ULIMITS)
    ulimits = "".join(f"--ulimit {u} " for u in ulimits)
    print(f"built image {image} with {engine}. Run it:\n"
          f"  {engine} run --rm {ulimits}-p 3000:3000 {image}" + (" --gpus all" if gpu else "") +
          "\n  curl -F image=@runs/lenet5-digits/sample-7.png http://localhost:3000/classify")
    return 0
