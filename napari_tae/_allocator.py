"""Keeping freed tensor memory in the process between forward passes (glibc only; docs/speed.md).

glibc serves every block above its mmap threshold (which grows to at most 32 MiB by itself) with
a fresh ``mmap``, unmaps it on ``free``, and trims the heap's free top above twice that. A forward
pass at batch 8 frees and asks again for hundreds of MiB of activations, so every pass faults in
each 4 KiB page anew and the kernel zeroes it (about 94,000 page faults per pass for
``ae_spatial``, a third or more of the CPU time). :func:`keep_freed_memory` raises both limits once
per process, so activations are reused from the heap; blocks of :data:`MMAP_THRESHOLD` or more (a
large volume) are still mapped and handed back when freed, and :func:`release_freed_memory` hands
the free heap back when a run ends, so a run's peak does not stay resident after it.

A thread other than the main one (napari's worker) allocates from its own glibc heaps of 64 MiB:
blocks larger than that are mapped afresh whatever the limits. Elsewhere than glibc (macOS,
Windows, musl) both functions are no-ops that return False; they never raise.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from typing import Any

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory", "release_freed_memory"]

_logger = logging.getLogger(__name__)

#: blocks this large or larger are still mapped on their own and unmapped when freed
MMAP_THRESHOLD = 256 << 20
#: the largest free heap top kept for reuse (mallopt takes a C int: at most 2 GiB - 1)
TRIM_THRESHOLD = 1 << 30
#: the highest mmap threshold older glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit)
_LEGACY_MMAP_THRESHOLD = 32 << 20

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: what a C call through ctypes can raise (a foreign libc must never stop a model run)
_CALL_ERRORS = (OSError, AttributeError, TypeError, ValueError, ctypes.ArgumentError)

_lock = threading.Lock()
_kept: bool | None = None  # None: not tried yet in this process
_libc: Any = None  # glibc, once the limits are set


def _load_glibc() -> Any:
    """The process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that does nothing
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except _CALL_ERRORS:
        return None
    return libc


def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks below :data:`MMAP_THRESHOLD` instead of unmapping them.

    Called where model runs start (inference and training); the first call sets the process's
    allocator, later calls return the first one's result. True when the limits are in place.
    """
    global _kept, _libc
    with _lock:
        if _kept is None:
            libc = _load_glibc()
            _kept = _set_limits(libc)
            _libc = libc if _kept else None
        return _kept


def _set_limits(libc: Any) -> bool:
    if libc is None:
        return False
    try:
        mapped = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or (
            libc.mallopt(_M_MMAP_THRESHOLD, _LEGACY_MMAP_THRESHOLD) == 1)
        trimmed = mapped and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except _CALL_ERRORS as exc:
        _logger.debug("mallopt failed: %s", exc)
        return False
    return bool(trimmed)


def release_freed_memory() -> bool:
    """Return the free heap to the system (``malloc_trim(0)``); True when glibc released pages.

    Called when a model run ends, so that the run's working set does not stay resident after it.
    """
    if _libc is None:
        return False
    try:
        return _libc.malloc_trim(0) == 1
    except _CALL_ERRORS as exc:
        _logger.debug("malloc_trim failed: %s", exc)
        return False
