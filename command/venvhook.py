"""An import hook for the project's virtual environment: ``import torchvision`` and ``import timm`` work
in ``.venv`` although its torchvision is PyPI's CUDA build beside the lock's CPU-only torch.

``./run.sh`` writes ``cnnserve-venvhook.pth`` into the venv's site-packages, whose one line calls
``install()`` when Python starts. That puts a finder on ``sys.meta_path`` that does nothing until the
first ``import torchvision``; then, once, it runs ``cnnserve.models.pretrained.declare_torchvision_ops``
(which only acts, with one warning, where torchvision's compiled operators cannot load) and steps
aside, so the import proceeds as usual. Python's start-up pays for this module alone (no torch).
"""

from __future__ import annotations

import importlib.abc
import sys


class TorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        uninstall()
        try:
            from cnnserve.models.pretrained import declare_torchvision_ops

            declare_torchvision_ops(warn=True)
        except Exception:  # noqa: BLE001 - a hook must never break the import it watches
            pass
        return None  # the regular finders find torchvision


def install() -> None:
    if not any(isinstance(f, TorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionOps())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TorchvisionOps)]
