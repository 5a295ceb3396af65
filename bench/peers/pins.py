"""Every peer's version, in one place: what its environment installs, and on which Python.

onnxruntime and Pillow are those of the serving lock (``lock/requirements-serving.txt``) in every peer's
environment, numpy too where the peer allows it. PyTriton 0.7.0 declares ``numpy<2`` and means it: its Python
backend stub reads numpy 2 arrays' sizes wrongly (every answer fails with "output tensor shape does not match size
of output"), and no numpy 1.x has a wheel for Python 3.13, so it runs on Python 3.12 with numpy 1.26.4. Its stub
links the interpreter's ``libpython``, which must be the environment's own (``base.Running`` puts its folder
first on ``LD_LIBRARY_PATH``): the ``'_thread.RLock' object has no attribute '_recursion_count'`` seen under
Python 3.11 is the stub loading the system's libpython3.11 beside pyenv's Python 3.11.
"""

from __future__ import annotations

ONNXRUNTIME, NUMPY, PILLOW = "1.31.1", "2.4.6", "13.0.0"

PEERS = {
    # name: (Python it needs, its packages, whether the lock's numpy fits)
    "triton": ("3.12", ["nvidia-pytriton==0.7.0"], False),
    "kserve": ("3.11", ["kserve==0.21.0"], True),
    "rayserve": ("3.11", ["ray[serve]==2.60.0"], True),
    # uvloop 0.22 and later refuse asyncio.get_event_loop() without a running loop, which MLServer 1.7.1's
    # inference workers call at start ("There is no current event loop"): the last uvloop it ran with
    "mlserver": ("3.11", ["mlserver==1.7.1", "uvloop==0.21.0"], True),
}


def requirements(name: str) -> list[str]:
    _, packages, lock_numpy = PEERS[name]
    return [*packages, f"onnxruntime=={ONNXRUNTIME}", f"pillow=={PILLOW}", *([f"numpy=={NUMPY}"] if lock_numpy else [])]
