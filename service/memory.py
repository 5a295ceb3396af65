"""Giving freed memory back to the operating system (glibc; elsewhere these do nothing).

A serving process decodes images of very different sizes; without these, what a few large
images took stays with the process long after they are answered."""

from __future__ import annotations


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def return_freed_memory() -> bool:
    """Make freed image buffers go back to the operating system (glibc only).

    glibc raises its mmap threshold after a large buffer is freed, up to 32 MiB, so the next
    image buffers come from heap arenas that rarely shrink (four 7000x7000 RGBA
    decodes leave 3.4 GB held after they finished). A fixed threshold of 1 MiB keeps every
    larger buffer in its own mapping, returned the moment it is freed. Its effect was not
    measured on its own; the soak figures in the benchmark report include it."""
    try:
        return bool(_LIBC.mallopt(-3, 1024 * 1024))  # M_MMAP_THRESHOLD
    except AttributeError:
        return False


def trim_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing). Large
    request bodies arrive in 64-256 kB pieces, below the mmap threshold; once freed, the heap
    keeps them unless trimmed."""
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
