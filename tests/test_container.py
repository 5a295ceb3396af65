"""The serving container: built with podman and run for real (slow; skipped, with the reason, where
podman cannot run), plus the checks that need no engine: the bentos' contents (the project as its wheel, the
locks) and one name per module in a served process."""

import json
import shutil
import subprocess
import time
import uuid
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnserve import __version__
from tests.conftest import ROOT, Server, encode, free_port, run_cli
from tests.test_lock import SERVING, pins

PODMAN = ["podman", "--runtime", "runc"]
RUN_OPTS = ["--network=host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CA = "/etc/ssl/certs/ca-certificates.crt"
BASE = "docker.io/library/python:3.11-slim"
IMAGE_BUDGET = 500_000_000  # bytes, uncompressed, the default model included (README "Deploying at scale")
# pip freeze, without pip (the image's environment is made by uv and has none): canonical names
FREEZE = ("import importlib.metadata as m, re; print('\\n'.join(sorted("
          "re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() + '==' + d.version for d in m.distributions())))")
SRC = "/home/bentoml/bento/src"  # the served process's working directory in the image (BentoML's entrypoint)
# where the image's cnnserve.service comes from, and every folder on sys.path that holds a service/ of its own
WHERE = ("import os, sys, cnnserve.service as s; print(s.__file__); "
         "print([p for p in sys.path if os.path.isdir(os.path.join(p or '.', 'service'))])")
WHEEL = f"cnnserve-{__version__}-py3-none-any.whl"
# the repository's folders the wheel installs under cnnserve (pyproject.toml's package-dir)
FOLDERS = ("bench", "command", "export", "models", "scoring", "service")


def podman_unusable() -> str | None:
    for tool in ("podman", "runc"):
        if not shutil.which(tool):
            return f"{tool} is not installed (.ci/run installs podman and runc with apt where it can)"
    try:
        info = subprocess.run([*PODMAN, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "podman info timed out"
    return None if info.returncode == 0 else f"podman cannot run here: {info.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    reason = podman_unusable()
    if reason:
        pytest.skip(reason)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\n')  # crun fails on these hosts' cgroups
    if subprocess.run([*PODMAN, "image", "exists", BASE]).returncode != 0:
        if not shutil.which("debootstrap"):
            pytest.skip(f"no {BASE} locally and no debootstrap to build a stand-in")
        build = subprocess.run(["bash", str(ROOT / "deploy" / "local-base-image.sh")], capture_output=True,
                               text=True, timeout=600)
        if build.returncode != 0:
            pytest.skip(f"could not build the local base image: {build.stdout[-500:]} {build.stderr[-500:]}")
    return {"CONTAINERS_CONF": str(conf)}


@pytest.mark.slow
def test_container_end_to_end(podman_env, stored_default, default_onnx, digits_test, capsys):
    image = f"localhost/cnnserve-test:{uuid.uuid4().hex[:8]}"
    name = f"cnnserve-test-{uuid.uuid4().hex[:8]}"
    opts = ["--opt", "network=host", "--opt", "ulimit=nofile=1024:1024", "--opt", "ulimit=nproc=1024:1024"]
    if shutil.os.path.exists(CA):  # registries are reached through a proxy whose CA lives here
        opts += ["--opt", f"volume={CA}:{CA}:ro"]
    try:
        run_cli("container", "--backend", "podman", "--models", stored_default, "--image-tag", image, *opts,
                env=podman_env, check=True, timeout=900)
        size = int(subprocess.run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", image],
                                  capture_output=True, text=True, check=True).stdout.strip())
        with capsys.disabled():
            print(f"\n[container] image {image}: {size / 1e6:.0f} MB (base image included)")
        assert size <= IMAGE_BUDGET, f"the CPU image is {size / 1e6:.0f} MB, over its {IMAGE_BUDGET / 1e6:.0f} MB budget"
        # the serving image carries no PyTorch
        torch = subprocess.run([*PODMAN, "run", "--rm", *RUN_OPTS, "--entrypoint", "python", image, "-c",
                                "import torch"], capture_output=True, text=True, env={**podman_env, **shutil.os.environ})
        assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
        # the image's Python packages are the serving lock's, version for version (what the suite tested)
        freeze = subprocess.run([*PODMAN, "run", "--rm", *RUN_OPTS, "--entrypoint", "python", image, "-c", FREEZE],
                                capture_output=True, text=True, env={**podman_env, **shutil.os.environ})
        image_pins = dict(line.split("==", 1) for line in freeze.stdout.split())
        assert image_pins.pop("cnnserve", None) == __version__, image_pins  # the project itself, from its wheel
        assert image_pins == pins(SERVING["bentofile.yaml"]), (freeze.stderr[-500:], image_pins)

        port = free_port()
        # locked down as the Kubernetes manifests run it: read-only root, /tmp the one writable path, no
        # capabilities, no privilege escalation, the image's own non-root user
        subprocess.run([*PODMAN, "run", "-d", "--name", name, *RUN_OPTS, "--read-only", "--tmpfs", "/tmp:rw,mode=1777",
                        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", image, "serve", "--port", str(port)],
                       check=True, capture_output=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/readyz", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            logs = subprocess.run([*PODMAN, "logs", name], capture_output=True, text=True).stdout
            pytest.fail(f"container not ready:\n{logs[-3000:]}")

        # one name per module: the served process reports no second name and no bare `service` it could import;
        # in its working directory `import service` fails, and cnnserve.service is the installed wheel's
        runtime = json.load(urllib.request.urlopen(url + "/v2", timeout=10))["runtime"]
        assert runtime["bare_service_importable"] is False and runtime["modules_with_two_names"] == [], runtime
        for bare in ("service", "service.engine"):
            probe = subprocess.run([*PODMAN, "exec", "-w", SRC, name, "python", "-c", f"import {bare}"],
                                   capture_output=True, text=True)
            assert probe.returncode != 0 and "No module named 'service'" in probe.stderr, (bare, probe.stderr)
        where = subprocess.run([*PODMAN, "exec", "-w", SRC, name, "python", "-c", WHERE], capture_output=True,
                               text=True)
        assert where.returncode == 0, where.stderr
        module_file, folders = where.stdout.split("\n")[:2]
        assert module_file.startswith("/app/.venv/lib/") and "/site-packages/cnnserve/service/" in module_file
        assert folders == "[]", folders

        from cnnserve.core.runtime import load_model

        uid = subprocess.run([*PODMAN, "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
        assert uid not in ("", "0"), uid

        x = digits_test[0][11]
        req = urllib.request.Request(url + "/classify?top_k=3", data=encode(x[0]), headers={"Content-Type": "image/png"})
        got = json.load(urllib.request.urlopen(req, timeout=30))["predictions"]
        ref = load_model(default_onnx, warm_up=False)
        probs = ref.predict(x[None])[0]
        assert got[0]["index"] == int(np.argmax(probs))
        assert got[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
        # a larger image is decoded in a decoding process (service/decoding.py): it must start and answer inside
        # the locked-down container too (no /dev/shm files, no capabilities, a read-only root)
        from cnnserve.core.preprocess import preprocess

        big = encode(np.kron(x[0], np.ones((12, 12), np.uint8)))  # 336x336
        req = urllib.request.Request(url + "/classify?top_k=3", data=big, headers={"Content-Type": "image/png"})
        got = json.load(urllib.request.urlopen(req, timeout=60))["predictions"]
        assert got[0]["index"] == int(np.argmax(ref.predict(preprocess(big, ref.spec)[None])[0]))
        metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        assert "cnnserve_batch_size_count" in metrics and "bentoml_service_request_total" in metrics

        # SIGTERM: the container must stop by itself well within the 30 s grace period
        t = time.time()
        subprocess.run([*PODMAN, "stop", "-t", "30", name], check=True, capture_output=True)
        elapsed = time.time() - t
        code = subprocess.run([*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True,
                              text=True).stdout.strip()
        assert elapsed < 25 and code == "0", (elapsed, code)
    finally:
        subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True)
        subprocess.run([*PODMAN, "rmi", "-f", image], capture_output=True)


def test_a_server_outside_the_repository_serves_the_package_under_one_name(stored_default, digits_test, tmp_path):
    """`bentoml serve cnnserve.service.service:CnnServe` needs nothing from the repository root, only the installed
    package (editable here, the wheel in the image): served from another working directory, its process has no
    folder on its path that `import service` could find, no file under two names, and it answers."""
    srv = Server("--arg", f"models={stored_default}", "--working-dir", str(tmp_path))
    try:
        runtime = json.load(urllib.request.urlopen(srv.url + "/v2", timeout=10))["runtime"]
        assert runtime["bare_service_importable"] is False and runtime["modules_with_two_names"] == [], runtime
        req = urllib.request.Request(srv.url + "/classify", data=encode(digits_test[0][11][0]),
                                     headers={"Content-Type": "image/png"})
        assert json.load(urllib.request.urlopen(req, timeout=30))["predictions"]
    finally:
        srv.stop()


def test_the_suites_server_has_no_bare_service_to_import(server):
    """A served process (the suite's, started as `cnnserve up` starts one: from an empty working directory) finds
    no ``service`` beside ``cnnserve.service``: bentoml serve puts its working directory on sys.path, and from the
    repository root ``import service`` found the folder."""
    runtime = json.load(urllib.request.urlopen(server.url + "/v2", timeout=10))["runtime"]
    assert runtime["bare_service_importable"] is False, runtime
    assert runtime["modules_with_two_names"] == [], runtime


def test_the_wheel_is_built_as_the_bentofile_names_it_or_the_build_stops_saying_why(tmp_path, monkeypatch):
    from cnnserve.command import container

    assert container.build_wheel() == ROOT / "build" / "wheel" / WHEEL
    # a bentofile naming another version's wheel than the tree builds
    other = tmp_path / "bentofile.yaml"
    other.write_text("python:\n  wheels:\n    - build/wheel/cnnserve-9.9.9-py3-none-any.whl\n")
    with pytest.raises(container.ContainerError) as e:
        container.build_wheel(str(other))
    assert "names the wheel build/wheel/cnnserve-9.9.9-py3-none-any.whl" in str(e.value)
    assert f"the build made build/wheel/{WHEEL}" in str(e.value) and "pyproject.toml's version" in str(e.value)
    # a build that fails: pip's own words, after what was run
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'error: configuration error: project.name must be pep508-identifier' >&2\n"
                      "exit 1\n")
    python.chmod(0o755)
    monkeypatch.setattr(container.sys, "executable", str(python))
    with pytest.raises(container.ContainerError) as e:
        container.build_wheel()
    assert "building the cnnserve wheel for the bento failed (pip wheel --quiet --no-deps" in str(e.value)
    assert "project.name must be pep508-identifier" in str(e.value)


def test_missing_model_stops_the_build_with_its_name():
    proc = run_cli("container", "--models", "no-such-model:latest")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'no-such-model:latest' is not in BentoML's model store" in proc.stderr and "./run.sh up" in proc.stderr


def test_gpu_bento_builds_from_the_cuda_base_with_its_lock(stored_default):
    """The GPU image cannot be built here (its CUDA base is not pullable): its bento must build, its
    Dockerfile start from the CUDA base, and its packages be the GPU serving lock's."""
    import bentoml

    from cnnserve.command.container import build_bento

    tag = build_bento([stored_default], gpu=True)
    try:
        bento = bentoml.get(tag)
        dockerfile = (shutil.os.path.join(bento.path, "env", "docker", "Dockerfile"))
        text = open(dockerfile).read()
        assert "FROM cnnserve-cuda-base:13.0" in text
        # the GPU lock, and BentoML's own line for itself, at the same version
        requirements = Path(bento.path, "env", "python", "requirements.txt")
        assert pins(requirements) == pins(SERVING["bentofile-gpu.yaml"])
        assert "torch" not in pins(requirements)
        doc = yaml.safe_load(open(shutil.os.path.join(bento.path, "bento.yaml")))
        assert [m["tag"].split(":")[0] for m in doc["services"][0]["models"]] == [stored_default.split(":")[0]]
        assert doc["args"]["models"] == stored_default
        assert_carries_the_wheel(Path(bento.path))
    finally:
        bentoml.delete(tag)
    base = (ROOT / "deploy" / "gpu" / "Containerfile").read_text()
    assert "nvidia/cuda:13" in base and f"uv=={pins(ROOT / 'lock' / 'requirements.txt')['uv']}" in base
    cpu, gpu = (yaml.safe_load((ROOT / f).read_text()) for f in ("bentofile.yaml", "bentofile-gpu.yaml"))
    assert gpu["service"] == cpu["service"] and gpu["include"] == cpu["include"] == []
    assert gpu["python"]["lock_packages"] is cpu["python"]["lock_packages"] is False
    assert gpu["python"]["wheels"] == cpu["python"]["wheels"] == [f"build/wheel/{WHEEL}"]
    assert gpu["python"]["pip_args"] == cpu["python"]["pip_args"] == "--no-deps"


def assert_carries_the_wheel(bento: Path) -> None:
    """The bento's code is the project's wheel, built from this tree and installed with the lock, --no-deps; its
    source folder holds no Python, so the image has nothing that `import service` could find."""
    src = bento / "src"
    assert [f.name for f in src.iterdir()] == ["bentofile.yaml"], sorted(src.rglob("*"))
    wheels = sorted((bento / "env" / "python" / "wheels").iterdir())
    assert [w.name for w in wheels] == [WHEEL]
    with zipfile.ZipFile(wheels[0]) as whl:
        names = [n for n in whl.namelist() if not n.startswith(f"cnnserve-{__version__}.dist-info/")]
        assert {n.split("/")[0] for n in names} == {"cnnserve"}, names
        # every file of the wheel is the tree's own, byte for byte (none left over from an earlier build)
        for n in names:
            parts = n.split("/")[1:]
            tree = ROOT.joinpath(*parts) if parts[0] in FOLDERS else ROOT.joinpath("cnnserve", *parts)
            assert tree.is_file() and whl.read(n) == tree.read_bytes(), n
        assert {"cnnserve/service/service.py", "cnnserve/service/demo/index.html",
                "cnnserve/core/runtime.py"} <= set(names)
    # the lock and then the wheel, both with --no-deps: nothing resolved, nothing else fetched in the image
    assert "PIP_ARGS=(--no-deps)" in (bento / "env" / "python" / "install.sh").read_text()


def test_the_image_listens_on_every_interface_and_up_on_loopback(stored_default):
    """`cnnserve up` is a development command: it listens on 127.0.0.1 unless told (`--host 0.0.0.0`). The image
    runs BentoML's own entrypoint, `bentoml serve` with no --host, which listens on every interface (as a
    container must, to be reached through its published port); nothing in the bento, the Kubernetes manifests
    or the build narrows that."""
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    from cnnserve.command.cli import build_parser
    from cnnserve.command.container import build_bento

    assert build_parser().parse_args(["up"]).host == "127.0.0.1"
    assert build_parser().parse_args(["up", "--host", "0.0.0.0"]).host == "0.0.0.0"
    assert BentoMLContainer.http.host.get() == "0.0.0.0"  # `bentoml serve` without --host
    tag = build_bento([stored_default])
    try:
        docker = Path(bentoml.get(tag).path, "env", "docker")
        text = (docker / "Dockerfile").read_text() + (docker / "entrypoint.sh").read_text()
        assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in text
        assert "BENTOML_HOST" not in text and "--host" not in text and "127.0.0.1" not in text
        assert_carries_the_wheel(Path(bentoml.get(tag).path))
    finally:
        bentoml.delete(tag)
    for manifest in ("cnnserve.yaml", "cnnserve-gpu.yaml"):
        for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / manifest).read_text()):
            for c in (doc or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                assert "--host" not in c.get("args", []) and "BENTOML_HOST" not in str(c.get("env", [])), manifest


# What a build prints where a proxy re-signs TLS with a CA the image does not trust: uv inside the build (the
# bento's Dockerfile installs the serving lock with it; its error chain as uv words it, ending in the line a user
# reported) and pip (which installs uv on a base without it; Python's ssl wording). And runc's refusal of podman's
# default ulimits, as `podman --runtime runc run` printed it on this project's machine.
UV_TLS = """#12 [base-container 5/9] RUN uv pip install --system -r /home/bentoml/bento/env/python/requirements.txt
#12 1.911 error: Request failed after 3 retries
#12 1.911   Caused by: Failed to fetch: `https://pypi.org/simple/numpy/`
#12 1.911   Caused by: error sending request for url (https://pypi.org/simple/numpy/)
#12 1.911   Caused by: client error (Connect)
#12 1.911   Caused by: invalid peer certificate: UnknownIssuer
Error: building at STEP "RUN uv pip install": exit status 2
"""
PIP_TLS = """WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection
broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local
issuer certificate (_ssl.c:1006)'))': /simple/uv/
ERROR: No matching distribution found for uv
"""
RLIMIT = ("Error: runc: runc create failed: unable to start container process: error during container init: "
          "error setting rlimits for ready process: error setting rlimit type 7: operation not permitted: "
          "OCI permission denied")
CA_VOLUME = f"--opt volume={CA}:{CA}:ro"


@pytest.mark.parametrize("output, says, not_says", [
    (UV_TLS, ["TLS", "--opt network=host", CA_VOLUME, "docs/containers.md"], ["ulimit"]),
    (PIP_TLS, ["TLS", CA_VOLUME], ["ulimit"]),
    (RLIMIT, ["--opt ulimit=nofile=1024:1024", "--opt ulimit=nproc=1024:1024", "--ulimit nofile=1024:1024"],
     [CA_VOLUME]),
    (UV_TLS + RLIMIT, [CA_VOLUME, "--opt ulimit=nofile=1024:1024"], []),
    ("Error: building at STEP \"COPY . .\": no space left on device", [], [CA_VOLUME, "ulimit"]),
], ids=["uv-tls", "pip-tls", "rlimit", "both", "other"])
def test_a_failed_builds_output_is_read_for_its_known_remedies(output, says, not_says):
    from cnnserve.command.container import build_hints

    hints = "\n".join(build_hints(output, "podman"))
    assert bool(hints) == bool(says), hints
    for text in says:
        assert text in hints, hints
    for text in not_says:
        assert text not in hints, hints


def test_containerize_names_the_remedy_after_the_builds_own_output(tmp_path, monkeypatch, capsys):
    """The build's output still streams to the user as it comes; a failure it recognises ends with the remedy."""
    from cnnserve.command import container

    fake = tmp_path / "bentoml"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{UV_TLS}EOF\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(container, "_bentoml", lambda: str(fake))
    with pytest.raises(container.ContainerError) as e:
        container.containerize("cnnserve:x", "podman", None, [])
    assert "invalid peer certificate: UnknownIssuer" in capsys.readouterr().out  # streamed
    assert "bentoml containerize with podman failed" in str(e.value) and CA_VOLUME in str(e.value)


def test_the_run_line_carries_the_builds_ulimits(stored_default, monkeypatch, capsys):
    """Where the build needed --opt ulimit=... (podman's defaults refused), `podman run` needs --ulimit too:
    the command the build prints to run the image says so."""
    from cnnserve.command import container

    monkeypatch.setattr(container, "choose_backend", lambda preferred: "podman")
    monkeypatch.setattr(container, "build_bento", lambda tags, gpu, args: "cnnserve:x")
    monkeypatch.setattr(container, "containerize", lambda bento, engine, tag, opts: "cnnserve:x")
    monkeypatch.setattr(container, "run_needs_ulimits", lambda engine, image: False)
    opts = ["network=host", "ulimit=nofile=1024:1024", "ulimit=nproc=1024:1024"]
    assert container.main(stored_default, backend="podman", opts=opts) == 0
    out = capsys.readouterr().out
    assert "podman run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -p 3000:3000 cnnserve:x" in out, out
    assert container.main(stored_default, backend="podman", opts=[]) == 0
    assert "podman run --rm -p 3000:3000 cnnserve:x" in capsys.readouterr().out
    # a host that refuses them to `run` only (this project's machines: the build ran its steps, `run` failed)
    monkeypatch.setattr(container, "run_needs_ulimits", lambda engine, image: True)
    assert container.main(stored_default, backend="podman", opts=[]) == 0
    assert "podman run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -p 3000:3000" in capsys.readouterr().out


def test_a_refused_run_is_recognised(tmp_path):
    """The probe behind that line: a `run` that fails with runc's rlimit refusal needs --ulimit; one that fails
    otherwise, or works, does not."""
    from cnnserve.command.container import run_needs_ulimits

    engine = tmp_path / "podman"
    for script, needs in ((f"echo '{RLIMIT}' >&2; exit 126", True), ("echo 'no such image' >&2; exit 125", False),
                          ("exit 0", False)):
        engine.write_text(f"#!/bin/sh\n{script}\n")
        engine.chmod(0o755)
        assert run_needs_ulimits(str(engine), "cnnserve:x") is needs, script
