"""cnnserve: CNN image classification, from PyTorch training to ONNX served by BentoML.

Every file has one module name, ``cnnserve.*``, wherever it runs. The repository keeps the design's
top-level folders (``service/``, ``models/``, ...); the wheel installs them as ``cnnserve.service``,
``cnnserve.models``, ... (pyproject.toml's package-dir). A bento carries the folders without the wheel,
so there the finder below gives them the same names: ``cnnserve.service`` is ``<src>/service/``. It is
consulted only after the regular finders (an installed or editable cnnserve answers first) and only for
these names, so nothing is ever importable as a bare ``service.*`` beside ``cnnserve.service.*``.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

SOURCE_FOLDERS = ("bench", "command", "export", "models", "scoring", "service")


class _SourceFolders(importlib.abc.MetaPathFinder):
    """``cnnserve.<folder>[.sub]`` -> ``<root>/<folder>/...`` where the repository's folders sit beside
    this package (a checkout or a bento's src), for a cnnserve that was not installed from the wheel."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        parts = name.split(".")
        if len(parts) != 2 or parts[0] != __name__ or parts[1] not in SOURCE_FOLDERS:
            return None  # subpackages and modules come from the package's own __path__
        folder = self.root / parts[1]
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _install() -> None:
    root = Path(__file__).resolve().parent.parent
    if not any(isinstance(f, _SourceFolders) for f in sys.meta_path):
        sys.meta_path.append(_SourceFolders(root))

_install()


def modules_with_two_names() -> list[list[str]]:
    """Source files this process has imported under more than one module name (each such file runs twice
    and keeps two copies of its state: drain flags, metrics). Empty where the layout holds; the service
    reports it in ``/v2``'s ``runtime`` and logs it at start-up."""
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.split(".")[0] in (__name__, *SOURCE_FOLDERS):
            by_file.setdefault(str(Path(path).resolve()), []).append(name)
    return sorted(sorted(names) for names in by_file.values() if len(names) > 1)
