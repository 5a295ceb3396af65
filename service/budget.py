"""The memory budget of loaded model versions (``max_model_memory_mb``): what a version costs, and which
idle versions a load evicts, least recently used first (``registry.py`` holds the versions).

A version's size is what the worker's resident memory grew by while it loaded (sessions, the precision
choice's candidates that were dropped are freed by then, warm-up buffers), and at least its file: one
figure per version, measured once, in the process that serves it.
"""

from __future__ import annotations

import os

MB = 2**20


class OverBudget(Exception):
    """A version that does not fit beside those that cannot be evicted; the message has the figures."""


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def evictions(resident: list, new, budget: float) -> list:
    """The versions among ``resident`` to evict so that ``new`` fits ``budget`` bytes (0: no budget): idle ones
    (no request holds them), least recently used first; ``OverBudget`` when evicting every idle one is not
    enough. Each version has ``size``, ``holders``, ``last_used`` and ``key``."""
    if not budget:
        return []
    total = sum(s.size for s in resident) + new.size
    evict = []
    for s in sorted((s for s in resident if s.holders <= 0), key=lambda s: s.last_used):
        if total <= budget:
            break
        evict.append(s)
        total -= s.size
    if total > budget:
        held = sum(s.size for s in resident if s not in evict)
        raise OverBudget(f"{new.key} needs {new.size / MB:.1f} MB; the budget (max_model_memory_mb) is "
                         f"{budget / MB:.1f} MB and {held / MB:.1f} MB are held by versions with requests in "
                         "flight, with nothing idle left to evict")
    return evict
