"""Installs come from the lock (lock/, docs/dependencies.md): the environment the suite runs in holds
exactly the lock, the lock satisfies pyproject.toml, and the serving images' locks are the same versions
without torch. The container test checks the image itself against its lock."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

LOCK = ROOT / "lock" / "requirements.txt"
SERVING = {"bentofile.yaml": ROOT / "lock" / "requirements-serving.txt",
           "bentofile-gpu.yaml": ROOT / "lock" / "requirements-serving-gpu.txt"}
RUNTIME = {"bentofile.yaml": "cpu", "bentofile-gpu.yaml": "gpu"}  # each image's onnxruntime: an extra


def pins(path: Path) -> dict[str, str]:
    """name -> version of a pip-compile lock (names canonical, as pip freeze compares them)."""
    found = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s;]+)", line)
        if m:
            found[canonicalize_name(m.group(1))] = m.group(2)
    return found


def hashes(path: Path) -> dict[str, set[str]]:
    text = path.read_text()
    return {canonicalize_name(m.group(1)): set(re.findall(r"--hash=(sha256:[0-9a-f]{64})", m.group(3)))
            for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)[^\\\n]*((?:\s*\\\n\s+--hash=\S+)+)", text, re.M)}


def installed() -> dict[str, str]:
    """What ``pip freeze`` would list for this interpreter, the project itself left out."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()
            if canonicalize_name(d.metadata["Name"]) != "cnnserve"}


def test_the_venv_holds_exactly_the_lock():
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"the suite runs in {sys.prefix}, not the project's .venv that ./run.sh installs from the lock")
    want, have = pins(LOCK), installed()
    differ = {n: (want.get(n), have.get(n)) for n in set(want) | set(have) if want.get(n) != have.get(n)}
    assert not differ, "installed != lock (name: (lock, installed)): " + repr(sorted(differ.items()))


def test_every_pin_has_hashes_and_no_machine_path():
    for path in (LOCK, *SERVING.values()):
        text = path.read_text()
        assert set(hashes(path)) == set(pins(path)), f"{path.name}: a pin without --hash"
        assert not re.search(r"(^|\s)(/opt/|/work/|/tmp/|/root/|file://)", text), f"{path.name} names a local path"


def test_the_lock_satisfies_pyproject():
    """A dependency added to pyproject.toml without ./run.sh lock fails here, not on a fresh machine; the
    serving locks name the requirements they were made from."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: v for k, v in project["optional-dependencies"].items() if k != "cpu"}  # cpu: the CPU image's
    declared = list(project["dependencies"]) + [r for extra in extras.values() for r in extra]
    unsatisfied(declared, pins(LOCK))
    for bentofile, serving in SERVING.items():
        wanted = project["dependencies"] + project["optional-dependencies"][RUNTIME[bentofile]]
        unsatisfied(wanted, pins(serving))
        # made from exactly these (a dependency the lock happened to hold already still rewrites it)
        assert resolved_from(serving) == wanted, f"{serving.name} was made from other requirements: ./run.sh lock"


def resolved_from(path: Path) -> list[str]:
    """The requirements a serving lock's header says it was resolved from."""
    head = path.read_text().split("# Resolved from these requirements of pyproject.toml:\n", 1)[-1]
    return [line.removeprefix("#   ") for line in head.splitlines() if line.startswith("#   ")]


def unsatisfied(declared: list[str], locked: dict[str, str]) -> None:
    wrong = []
    for line in declared:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = locked.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{line} (locked: {version})")
    assert not wrong, "pyproject.toml asks for what the lock lacks; run ./run.sh lock: " + "; ".join(wrong)


@pytest.mark.parametrize("bentofile", sorted(SERVING))
def test_serving_locks_are_the_suites_versions_without_torch(bentofile):
    serving, main = SERVING[bentofile], pins(LOCK)
    conf = yaml.safe_load((ROOT / bentofile).read_text())["python"]
    assert conf["requirements_txt"] == str(serving.relative_to(ROOT)) and conf["lock_packages"] is False
    assert "packages" not in conf  # one source of versions: the lock
    got = pins(serving)
    shared = {n: v for n, v in got.items() if n != "onnxruntime"}  # the CPU image's runtime is not the suite's
    assert {n: main.get(n) for n in shared} == shared  # the versions the suite ran on
    assert all(hashes(serving)[n] <= hashes(LOCK)[n] for n in shared)
    assert got.get("onnxruntime", got.get("onnxruntime-gpu")) == main["onnxruntime-gpu"]  # the same release
    assert ("onnxruntime" in got) != ("onnxruntime-gpu" in got)  # one runtime: both install the same module
    assert not {"torch", "torchvision", "onnx", "pytest", "ray"} & set(got)
