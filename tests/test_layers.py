"""The project's floors, checked from its own imports (read with ``ast``, nothing is imported).

ground  cnnserve/ (core/)       the spec, the ONNX contract and runtime, decoding, config: imports nothing else
models  models/                 the ground floor
export  export/                 models and the ground floor
service service/                the ground floor only; no torch reachable (the serving image)
scoring scoring/                the ground floor only; no torch reachable (batch scoring)
command command/                the product's floors; nothing of the product imports it

Beside the product, a checkout holds two top-level packages that the wheel does not carry and that no
module of the product imports (but for bench and tune, which ``command/cli.py`` and ``clidoc.py`` import
from the checkout inside a function, when they run):

bench   bench/                  the benchmark harness: the product and tests.support
tests   tests/support/          what the tests run against, shared with the harness: the product only

Across floors, code names the installed namespace (``cnnserve.models``); within a floor it imports
relatively. The wheel maps the repository's product folders to that namespace (pyproject.toml). No module
imports itself back through others (a cycle), at any depth, function-level imports included.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the product's folders, each installed as cnnserve.<name>
FOLDERS = {"models": "models", "export": "export", "service": "service", "scoring": "scoring",
           "command": "command"}
# a checkout's own top-level packages: never installed, never under cnnserve
CHECKOUT = {"bench": "bench", "tests.support": "tests/support"}
PRODUCT = {"ground", "models", "export", "service", "scoring", "command"}
ALLOWED = {
    "ground": {"ground"},
    "models": {"ground", "models"},
    "export": {"ground", "models", "export"},
    "service": {"ground", "service"},
    "scoring": {"ground", "scoring"},
    "command": {"ground", "models", "export", "service", "scoring", "command"},
    "bench": PRODUCT | {"bench", "tests"},
    "tests": PRODUCT | {"tests"},
}
# bench and tune: the command's doors to the checkout's harness, which import it inside a function
HARNESS_DOORS = {"cnnserve.command.cli", "cnnserve.command.clidoc"}


def module_of(path: Path) -> str:
    """The module name of a repository file: models/data.py -> cnnserve.models.data (installed), bench/lb.py
    -> bench.lb and tests/support/server.py -> tests.support.server (a checkout's)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] in ("cnnserve", "bench", "tests") else ["cnnserve", *parts])


def floor_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "bench":
        return "bench"
    if parts[0] == "tests":
        return "tests" if parts[1:2] == ["support"] else "the test suite"  # allowed to no one
    if parts[0] != "cnnserve":
        return None  # not the project's
    if len(parts) == 1:
        return "ground"
    # cnnserve.core and the names cnnserve/__init__.py defines (__version__, ...) are the ground's
    return {"models": "models", "export": "export", "service": "service", "scoring": "scoring",
            "command": "command"}.get(parts[1], "ground")


def sources(folder: str) -> list[Path]:
    """The Python files of ``folder`` that git tracks or would track: what git ignores (the harness's work
    folder, with the peers' virtual environments in it) is not the project's."""
    if (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", f"{folder}/*.py"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        return sorted(ROOT / p for p in out if (ROOT / p).is_file())
    return sorted((ROOT / folder).rglob("*.py"))


def product_files() -> list[Path]:
    files = sources("cnnserve")
    for folder in FOLDERS.values():
        files += sources(folder)
    return files


def project_files() -> list[Path]:
    """The product's files and the checkout's packages beside it (bench/ without its results)."""
    files = product_files()
    for folder in CHECKOUT.values():
        files += [p for p in sources(folder) if "results" not in p.relative_to(ROOT).parts]
    return files


def function_level(path: Path) -> set[int]:
    """The lines of the imports ``path`` makes inside a function (run when it is called, not on import)."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


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
        module = module_of(path)
        here, lazy = floor_of(module), function_level(path)
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in FOLDERS:  # `from models import ...` works in a checkout only; the wheel has no `models`
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (use cnnserve.{name})")
                continue
            if name.split(".")[:2] in (["cnnserve", "bench"], ["cnnserve", "tests"]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}: the checkout's packages are "
                             f"{name.split('.', 1)[1]}, never under cnnserve")
                continue
            there = floor_of(name)
            if there == "bench" and module in HARNESS_DOORS and line in lazy:
                continue
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


#: What the serving image does not carry: training's packages, and export's numerics (the train extra).
NOT_SERVED = {"torch", "scipy", "sklearn"}


@pytest.mark.parametrize("floor", ["service", "scoring"])
def test_no_torch_is_reachable_from_the_serving_path(floor):
    start = {module_of(p) for p in (ROOT / floor).rglob("*.py")}
    via = reachable(start)
    files = {module_of(p): p for p in project_files()}
    found = [f"{m} imports {name} (reached from {via[m] or floor + '/'})" for m in via
             for _, name in imports(files[m]) if name.split(".")[0] in NOT_SERVED]
    assert not found, "a package the serving image lacks is imported on the serving path: " + ", ".join(found)
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
    # the product importing the checkout's harness or the tests' support, even inside a function
    for bad, floor in (("from bench.load import percentiles", "scoring imports bench.load"),
                       ("from tests.support.server import Server", "scoring imports tests.support.server"),
                       ("from cnnserve.bench.load import percentiles", "never under cnnserve")):
        scoring = tmp_path / "scoring" / "run.py"
        before = scoring.read_text()
        scoring.write_text(before + f"\ndef harness():\n    {bad}\n")
        with pytest.raises(AssertionError, match=floor):
            test_every_import_goes_down_a_floor_or_stays()
        scoring.write_text(before)
    # the command's doors to the harness import it when they run, never on import
    cli = tmp_path / "command" / "cli.py"
    before = cli.read_text()
    cli.write_text(before + "\nfrom bench.harness import main\n")
    with pytest.raises(AssertionError, match="command imports bench.harness"):
        test_every_import_goes_down_a_floor_or_stays()
    cli.write_text(before)
    # the tests' support never reaches back into the harness
    support = tmp_path / "tests" / "support" / "faults.py"
    before = support.read_text()
    support.write_text(before + "\nfrom bench.report import report\n")
    with pytest.raises(AssertionError, match="tests imports bench.report"):
        test_every_import_goes_down_a_floor_or_stays()
    support.write_text(before)
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
    """Every folder of the product's Python files is a package the wheel installs, under the cnnserve
    namespace, from the repository folder of the same name (the checkout's own packages are not among them)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_of(p.parent / "__init__.py") for p in product_files()}
    assert set(tool["packages"]) == folders
    assert tool["package-dir"] == {f"cnnserve.{k}": v for k, v in FOLDERS.items()}
    # those names only: a folder imported under its bare name too (the repository root on sys.path) is reported
    code = "import cnnserve, cnnserve.service.errors, service.errors; print(cnnserve.modules_with_two_names())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "['cnnserve.service.errors', 'service.errors']" in out, out


def test_the_wheel_carries_the_product_only(tmp_path):
    """The wheel built from the tree holds cnnserve and its dist-info only: not the benchmark harness (bench/,
    as cnnserve/bench/ or bench/), not the tests' support, not the tests; and every product package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "work", "results")
    for folder in ("cnnserve", *FOLDERS.values(), "bench", "tests"):
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    out = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "-w", str(out), "."], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = out.glob("cnnserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"cnnserve"}
    assert not [n for n in names if n.startswith(("cnnserve/bench/", "bench/", "tests/", "cnnserve/tests/"))]
    assert {f"cnnserve/{k}/__init__.py" for k in FOLDERS} | {"cnnserve/core/__init__.py"} <= set(names)
    # installed from it, away from any checkout: bench and tune say where the harness lives, in one line
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    for command in ("bench", "tune"):
        proc = subprocess.run([sys.executable, "-m", "cnnserve.command.cli", command, "--help"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(site)})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"cnnserve: error: `cnnserve {command}`") and proc.stderr.count("\n") == 1
        assert "repository's bench/" in proc.stderr and "Traceback" not in proc.stderr


# import name -> the distribution that provides it, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "prometheus_client": "prometheus-client",
                 "onnxruntime": "onnxruntime-gpu", "yaml": "pyyaml", "tritonclient": "tritonclient",
                 "grpc": "grpcio", "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection",
                 "google": "protobuf", "_bentoml_impl": "bentoml", "bentoml_cli": "bentoml",
                 "opentelemetry": "opentelemetry-sdk", "pythonjsonlogger": "python-json-logger"}
# The peers the harness installs into environments of their own under bench/work/ on first use, and what their
# servers import there: TorchServe (bench/torchserve/), and PyTriton, KServe, MLServer with the peers' shared
# model module (bench/peers/: each server script runs in its peer's environment with that folder on its path)
ON_DEMAND = {"ts", "pytriton", "kserve", "mlserver", "peer_model"}


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
            if top in sys.stdlib_module_names or top in ("cnnserve", "tests", "bench", *FOLDERS) or top in ON_DEMAND:
                continue
            if DISTRIBUTIONS.get(top, top).lower().replace("_", "-") not in declared:
                missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(sorted(missing))
