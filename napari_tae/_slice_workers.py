"""A CPU batch run as one chunk of slices per core, each chunk on its own thread.

Slices are independent, and on the CPU torch's threads share out each operation of one batch
less well than separate chunks share out the cores: at 2 threads, up to about 1.15x on a real
head, never consistently slower (docs/speed.md, section 7).
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

__all__ = ["SliceWorkers"]


class SliceWorkers:
    """Runs ``fn`` on a batch split into one chunk per torch thread, the chunks at the same time.

    Each chunk runs with ``threads // chunks`` torch threads (1 when there are as many slices as
    threads); the calling thread runs the first chunk, a pool thread each other one. The pool lives
    for a whole run, so that its threads keep reusing their memory; :meth:`close` ends it. With
    ``threads`` 1 (or a batch of one slice) ``fn`` gets the whole batch on the calling thread.

    ``fn`` runs on other threads: it must enter the grad and autocast modes it needs itself
    (torch keeps them per thread). Torch's thread count is ``threads`` again whenever :meth:`map`
    returns or raises, and no chunk is still running then.
    """

    def __init__(self, threads: int) -> None:
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads - 1, "napari-tae-slices") if self.threads > 1 else None

    def map(self, fn: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
        """``fn`` over ``batch`` (slices first) in chunks; their results concatenated in order."""
        chunks = np.array_split(batch, min(self.threads, len(batch)))
        if self._pool is None or len(chunks) < 2:
            return fn(batch)
        threads_each = self.threads // len(chunks)
        others = [self._pool.submit(_with_threads, threads_each, fn, chunk) for chunk in chunks[1:]]
        try:
            first = _with_threads(threads_each, fn, chunks[0])
        finally:
            wait(others)  # an error in one chunk does not leave the others running behind it
            torch.set_num_threads(self.threads)
        return np.concatenate([first, *(future.result() for future in others)])

    def close(self) -> None:
        """End the pool (waits for a chunk still running, e.g. after an interrupt)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            torch.set_num_threads(self.threads)  # also when an interrupt cut map() short

    def __enter__(self) -> SliceWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _with_threads(threads: int, fn: Callable[[np.ndarray], np.ndarray], chunk: np.ndarray) -> np.ndarray:
    # torch's thread count belongs to each thread's OpenMP state: set where the chunk runs
    torch.set_num_threads(threads)
    return fn(chunk)
