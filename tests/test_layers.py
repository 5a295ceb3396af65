"""The project's floors, checked from its own imports (read with ``ast``, nothing is imported).

ground  cnnserve/ (core/)       the spec, the ONNX contract and runtime, decoding, config: imports nothing else
models  models/                 the ground floor
export  export/                 models and the ground floor
service service/                the ground floor only; no torch reachable (the serving image)
scoring scoring/                the ground floor only; no torch reachable (batch scoring)
command command/, bench/        anything; nothing imports it

Across floors, code names the installed namespace (``cnnserve.models``); within a floor it imports
relatively. The wheel maps the repository's folders to that namespace (pyproject.toml). No module
imports itself back through others (a cycle), at any depth, function-level imports included.
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"models": "models", "export": "export", "service": "service", "scoring": "scoring",
           "command": "command", "bench": "bench"}
ALLOWED = {
    "ground": {"ground"},
    "models": {"ground", "models"},
    "export": {"ground", "models", "export"},
    "service": {"ground", "service"},
    "scoring": {"ground", "scoring"},
    "command": {"ground", "models", "export", "service", "scoring", "command"},
}


def module_of(path: Path) -> str:
    """The installed name of a repository file: models/data.py -> cnnserve.models.data."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "cnnserve" else ["cnnserve", *parts])


def floor_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cnnserve":
        return None  # not the project's
    if len(parts) == 1:
        return "ground"
    # cnnserve.core and the names cnnserve/__init__.py defines (__version__, ...) are the ground's
    return {"models": "models", "export": "export", "service": "service", "scoring": "scoring",
            "command": "command", "bench": "command"}.get(parts[1], "ground")


def project_files() -> list[Path]:
    files = sorted((ROOT / "cnnserve").rglob("*.py"))
    for folder in FOLDERS.values():
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, at any depth (function-level imports included), resolved to
    absolute names: (line, module). ``from X import y`` yields X.y as well, since y may be a module."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return found


def test_every_import_goes_down_a_floor_or_stays():
    wrong = []
    for path in project_files():
        here = floor_of(module_of(path))
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in FOLDERS:  # `from models import ...` works in a checkout only; the wheel has no `models`
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (use cnnserve.{name})")
                continue
            there = floor_of(name)
            if there and there not in ALLOWED[here]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {name} ({there})")
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def reachable(start: set[str]) -> dict[str, str]:
    """Project modules reachable from ``start`` through imports: module -> the module that imported it."""
    files = {module_of(p): p for p in project_files()}
    seen, todo = {m: "" for m in start}, list(start)
    while todo:
        m = todo.pop()
        for _, name in imports(files[m]):
            if name in files and name not in seen:
                seen[name] = m
                todo.append(name)
    return seen


@pytest.mark.parametrize("floor", ["service", "scoring"])
def test_no_torch_is_reachable_from_the_serving_path(floor):
    start = {module_of(p) for p in (ROOT / floor).rglob("*.py")}
    via = reachable(start)
    files = {module_of(p): p for p in project_files()}
    torch = [f"{m} (reached from {via[m] or floor + '/'})" for m in via
             if any(name.split(".")[0] == "torch" for _, name in imports(files[m]))]
    assert not torch, "torch is imported on the serving path: " + ", ".join(torch)
    assert {floor_of(m) for m in via} <= {"ground", floor}


def cycles() -> list[list[str]]:
    """Every import cycle among the project's modules (Tarjan's strongly connected components; a module
    importing a name of its own package's ``__init__`` counts as importing the package)."""
    files = {module_of(p): p for p in project_files()}
    graph = {m: sorted({n for _, n in imports(p) if n in files and n != m}) for m, p in files.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles()
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    """The walk itself: a service module importing training code, or torch through the ground floor,
    is caught (run against a copy of the tree with one bad line added)."""
    for path in project_files():
        dest = tmp_path / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    api = tmp_path / "service" / "api.py"
    api.write_text(api.read_text() + "\nfrom cnnserve.models.data import load_dataset\n")
    with pytest.raises(AssertionError, match="service imports cnnserve.models.data"):
        test_every_import_goes_down_a_floor_or_stays()
    api.write_text(api.read_text().replace("from cnnserve.models.data import load_dataset", ""))
    spec = tmp_path / "cnnserve" / "core" / "spec.py"
    spec.write_text(spec.read_text() + "\ndef f():\n    import torch\n")
    with pytest.raises(AssertionError, match="cnnserve.core.spec"):
        test_no_torch_is_reachable_from_the_serving_path("scoring")
    # a cycle through a function-level import
    store = tmp_path / "export" / "store.py"
    store.write_text(store.read_text() + "\ndef g():\n    from .verify import verify\n")
    verify = tmp_path / "export" / "verify.py"
    verify.write_text(verify.read_text() + "\ndef h():\n    from .store import MODEL_FILE\n")
    with pytest.raises(AssertionError, match="cnnserve.export.store <-> cnnserve.export.verify"):
        test_no_import_cycles()


def test_the_wheel_maps_every_package_folder_under_cnnserve():
    """Every folder of Python files is a package the wheel installs, under the cnnserve namespace,
    from the repository folder of the same name."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_of(p.parent / "__init__.py") for p in project_files() if "results" not in p.parts}
    assert set(tool["packages"]) == folders
    assert tool["package-dir"] == {f"cnnserve.{k}": v for k, v in FOLDERS.items()}
    # those names only: a folder imported under its bare name too (the repository root on sys.path) is reported
    import subprocess

    code = "import cnnserve, cnnserve.service.errors, service.errors; print(cnnserve.modules_with_two_names())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "['cnnserve.service.errors', 'service.errors']" in out, out


# import name -> the distribution that provides it, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "prometheus_client": "prometheus-client",
                 "onnxruntime": "onnxruntime-gpu", "yaml": "pyyaml", "tritonclient": "tritonclient",
                 "grpc": "grpcio", "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
                 "google": "protobuf"}
ON_DEMAND = {"ts"}  # TorchServe: the harness installs it into bench/work/ on first use (bench/torchserve/)


def test_every_third_party_import_is_declared():
    """Each package the project's code imports is a dependency in pyproject.toml (base or an extra),
    not something that happens to arrive with bentoml or fastapi."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower()
                for d in project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]}
    missing = set()
    for path in [*project_files(), *(ROOT / "tests").glob("*.py")]:
        for _, name in imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("cnnserve", "tests", *FOLDERS) or top in ON_DEMAND:
                continue
            if DISTRIBUTIONS.get(top, top).lower().replace("_", "-") not in declared:
                missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(sorted(missing))
