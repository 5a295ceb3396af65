"""The served set that every worker of a server agrees on, kept in files in the server's folder.

BentoML runs several worker processes and a control request (``repository.py``) reaches one of them.
That worker changes the **desired set** (``models.json``: the served versions of each model, oldest to
newest, and a generation number), written atomically under a file lock; every worker polls it and
converges (``registry.py``), then writes its **report** (``workers/PID.json``: the generation it has
applied, what it serves, what failed and why). A control request answers once every live worker has
reported the generation it wrote.

The folder is the server's own (``$BENTOML_HOME/cnnserve-servers/PID``, beside the model store,
``startup.py``): it outlives a worker, so a worker restarted after a crash (kill -9) loads the set its
siblings serve, not the start-up set; it goes with the server, so a new ``bentoml serve`` starts from
its ``--arg models=``. ``stored_file`` finds a version's file in the model store.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cnnserve.core.onnxmeta import MODEL_FILE

from .registry import LoadFailed

DESIRED, LOCK, REPORTS = "models.json", "models.lock", "workers"


def _write_atomically(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServedState:
    """The desired set and the workers' reports of one server (``folder``)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.desired_path = self.folder / DESIRED
        (self.folder / REPORTS).mkdir(parents=True, exist_ok=True)

    # -- the desired set ------------------------------------------------------------------------------

    def read(self) -> dict | None:
        """``{"generation": n, "default": name, "models": {name: [version, ...]}}`` (oldest to newest), or
        None before the server wrote one."""
        return _read(self.desired_path)

    def stamp(self) -> tuple | None:
        """What changes when the desired set is rewritten (cheap to poll)."""
        try:
            st = self.desired_path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    @contextmanager
    def editing(self):
        """The desired set to change in place, under the server's lock; written atomically with the next
        generation on leaving (unless unchanged)."""
        with open(self.folder / LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.read() or {"generation": 0, "default": None, "models": {}}
                before = json.dumps(current, sort_keys=True)
                yield current
                if json.dumps(current, sort_keys=True) != before:
                    current["generation"] = current.get("generation", 0) + 1
                    _write_atomically(self.desired_path, current)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def reset(self, tags: list[tuple[str, str]]) -> None:
        """The start-up set (the server's first process, before any worker starts)."""
        models: dict[str, list[str]] = {}
        for name, version in tags:
            models.setdefault(name, []).append(version)
        with self.editing() as d:
            d.update(default=tags[0][0] if tags else None, models=models)

    # -- the workers' reports -------------------------------------------------------------------------

    def report(self, pid: int, report: dict) -> None:
        _write_atomically(self.folder / REPORTS / f"{pid}.json", {"pid": pid, **report})

    def reports(self) -> list[dict]:
        """The reports of the live workers (a killed worker's report stays until the server ends, ignored)."""
        found = []
        for path in (self.folder / REPORTS).glob("*.json"):
            if path.stem.isdigit() and alive(int(path.stem)):
                r = _read(path)
                if r is not None:
                    found.append(r)
        return found


def stored_file(name: str, version: str = "") -> tuple[str, str]:
    """The version (``latest`` resolved) and the ONNX file of ``name:version`` in the model store
    (``LoadFailed`` 404 when it is not there)."""
    from cnnserve.core.store import NotStored, stored_model

    try:
        stored = stored_model(f"{name}:{version}" if version else name)
    except NotStored:  # its own message names the store's folder: a client has no business with the server's paths
        raise LoadFailed(f"model {name}{':' + version if version else ''} is not in this server's model store "
                         "(`cnnserve repository` lists what is)", 404) from None
    if stored.info.module != "cnnserve":
        raise LoadFailed(f"{stored.tag} is not a model cnnserve stored (module {stored.info.module!r})", 404)
    return stored.tag.version, stored.path_of(MODEL_FILE)
