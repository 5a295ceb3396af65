"""A peer's own virtual environment: the Python it needs found on this machine, its packages installed with pip
on first use into ``<work>/peers/<name>-venv`` and kept (a stamp file holds what was installed; a change of the
pins makes a new environment)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

from .pins import PEERS, requirements


class Unavailable(RuntimeError):
    """The peer cannot run here; the message says why (the report shows it as not run)."""


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` (``"3.13"``) that runs: ``pythonX.Y`` on the PATH, unless it is a pyenv shim
    of a version that is installed but not selected (it then fails), else pyenv's own copy of that version."""
    candidates = [shutil.which(f"python{version}")]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
    for exe in filter(None, candidates):
        try:
            ok = subprocess.run([exe, "-c", "import sys, venv; print(sys.version_info[:2])"], capture_output=True,
                                text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok.returncode == 0 and ok.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return exe
    return None


def venv(name: str, work: Path, log=print) -> Path:
    """The peer's environment's Python, installing it first where needed (the time it took is logged)."""
    version, _, _ = PEERS[name]
    folder = work / "peers" / f"{name}-venv"
    python, stamp = folder / "bin" / "python", folder / ".peer-requirements"
    wanted = "\n".join(requirements(name)) + "\n"
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    exe = find_python(version)
    if exe is None:
        raise Unavailable(f"{name} needs Python {version}, and this machine has none (python{version} on the PATH "
                          "or under pyenv)")
    log(f"peers: installing {name} into {folder} ({' '.join(wanted.split())}) ...")
    t0 = time.time()
    shutil.rmtree(folder, ignore_errors=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    steps = [[exe, "-m", "venv", str(folder)], [*pip, *requirements(name)]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            err = "\n".join(ln for ln in proc.stderr.splitlines() if "is ignored: it is neither" not in ln)
            raise Unavailable(f"pip could not install {name}: {err.strip()[-400:]}")
    stamp.write_text(wanted)
    log(f"peers: {name} installed in {time.time() - t0:.0f} s")
    return python


def freeze(python: Path, packages: tuple[str, ...] = ("onnxruntime", "numpy", "pillow")) -> dict[str, str]:
    """The versions of the packages that matter for the comparison, as installed in the environment."""
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True).stdout
    pins = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    lower = {k.lower(): v for k, v in pins.items()}
    return {p: lower[p] for p in packages if p in lower}
