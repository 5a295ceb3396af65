"""cnnserve: CNN image classification, from PyTorch training to ONNX served by BentoML.

Every file has one module name, ``cnnserve.*``, wherever it runs. The repository keeps the design's
top-level folders (``service/``, ``models/``, ...); installed, they are ``cnnserve.service``,
``cnnserve.models``, ... (pyproject.toml's package-dir): the editable install of a checkout maps them so, and
the wheel carries them so, in a virtual environment and in the bento alike (bentofile.yaml's python.wheels).
"""

import sys
from pathlib import Path

__version__ = "0.1.0"


def modules_with_two_names() -> list[list[str]]:
    """Source files this process has imported under more than one module name (each such file runs twice
    and keeps two copies of its state: drain flags, metrics), such as ``service.engine`` beside
    ``cnnserve.service.engine`` where the repository root is on ``sys.path``. Empty where the layout holds; the
    service reports it in ``/v2``'s ``runtime`` and logs it at start-up."""
    modules = [(name, getattr(module, "__file__", None)) for name, module in list(sys.modules.items())]
    # the second names a file could have: those of its folder as a top-level package (service/ -> service),
    # read from the subpackages imported so far, so a folder added to the package needs no list kept here
    bare = {Path(path).parent.name for name, path in modules
            if path and name.startswith(__name__ + ".") and name.count(".") == 1 and path.endswith("__init__.py")}
    by_file: dict[str, list[str]] = {}
    for name, path in modules:
        if path and name.split(".")[0] in (__name__, *bare):
            by_file.setdefault(str(Path(path).resolve()), []).append(name)
    return sorted(sorted(names) for names in by_file.values() if len(names) > 1)
