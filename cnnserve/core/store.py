"""BentoML's command and model store, found and asked the same way by every entry point."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


class NotStored(LookupError):
    """A model tag that BentoML's model store does not hold; the message says how to make it."""


def bentoml_command() -> str:
    """The ``bentoml`` executable of this Python's environment, else the first on PATH."""
    found = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if not found:
        raise FileNotFoundError("the bentoml command is not installed beside this Python "
                                "(./run.sh installs it into .venv)")
    return found


def stored_model(tag: str):
    """The store's ``bentoml.Model`` for ``tag``, or ``NotStored`` naming the tag, the store and
    how to fill it."""
    import bentoml

    try:
        return bentoml.models.get(tag)
    except (bentoml.exceptions.BentoMLException, ValueError):  # NotFound, and a tag it cannot parse
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise NotStored(f"model {tag!r} is not in BentoML's model store ({home}). Make the default model "
                        "with `./run.sh up --no-serve`, or store an export with "
                        "`cnnserve export RUN/model.pt --store`; `bentoml models list` shows what is there") from None
