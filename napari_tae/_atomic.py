"""Atomic file writes: a crash or an error never leaves half a file where the user expects one.

:func:`atomic_path` writes one file; :class:`FileSet` writes several and puts them in place
together, the one named last (a record listing the others) marking the set complete. The rule is
written down in ``docs/batch.md``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["FileSet", "atomic_path", "deferred_interrupts", "temporary_patterns", "write_text_atomic"]

_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _temporary_beside(path: Path) -> Path:
    """A new empty hidden file beside ``path`` that keeps its ending (nibabel reads ``.gz``)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def temporary_patterns(path: str | os.PathLike) -> tuple[str, str]:
    """Glob patterns of the temporaries made for ``path``: its own, and those of a writer that is
    itself atomic writing to the :class:`FileSet` temporary (``save_volume`` does)."""
    name = glob.escape(Path(path).name)
    return f".{name}.*", f"..{name}.*"


def _plain_permissions(path: Path) -> None:
    # mkstemp creates 0600; give the file the permissions a plain open() would have
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` when the block succeeds.

    The temporary name keeps the file's ending (nibabel chooses gzip from ``.gz``). On error the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp_path = None
    try:
        with deferred_interrupts():  # a Ctrl-C inside mkstemp would leave its file behind
            tmp_path = _temporary_beside(path)
        yield tmp_path
        _plain_permissions(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block, then act on them as the handlers in force would.

    Used around the few renames that put a file set in place, so Ctrl-C cannot stop the commit
    half-way, and around making a temporary, so none is made without its owner knowing it. Outside the main thread signals cannot be caught and the block runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in _INTERRUPTS}

    def hold(signum: int, _frame: object) -> None:
        pending.append(signum)

    for sig in _INTERRUPTS:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in pending[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


class FileSet:
    """Several files written under temporary names beside their targets, put in place together.

    ``temporary(kind)`` gives the path to write each file to; :meth:`commit` renames them onto
    their targets with the ``last`` kind renamed last, so a reader that trusts the ``last`` file
    (a record listing the others) never sees a mix of old and new files. Leaving the ``with``
    block without a commit removes every temporary and touches no target.

    Parameters
    ----------
    targets : dict
        Final path of each kind of file; all in one folder (renames stay on one file system).
    """

    def __init__(self, targets: dict[str, Path]) -> None:
        self.targets = {kind: Path(path) for kind, path in targets.items()}
        self._temporaries: dict[str, Path] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()

    def temporary(self, kind: str) -> Path:
        """The temporary path to write the ``kind`` file to (created empty, hidden, same ending)."""
        if kind not in self._temporaries:
            with deferred_interrupts():  # recorded before a Ctrl-C can stop us, so discard() finds it
                self._temporaries[kind] = _temporary_beside(self.targets[kind])
        return self._temporaries[kind]

    @property
    def written(self) -> dict[str, Path]:
        """Temporary path of each kind asked for so far."""
        return dict(self._temporaries)

    def discard(self) -> None:
        """Remove the temporaries not yet committed."""
        for tmp in self._temporaries.values():
            tmp.unlink(missing_ok=True)
        self._temporaries.clear()

    def commit(self, last: str, remove: Iterable[str | os.PathLike] = ()) -> dict[str, Path]:
        """Put the written files in place; returns their final paths by kind.

        The old ``last`` file goes first (the old set is no longer complete), then the files in
        ``remove`` (an old set's kinds this one lacks), then the new files, ``last`` at the end.
        SIGINT and SIGTERM wait until the renames are done.
        """
        if last not in self._temporaries:
            raise ValueError(f"the set has no {last!r} file to commit last")
        order = [k for k in self._temporaries if k != last] + [last]
        with deferred_interrupts():
            self.targets[last].unlink(missing_ok=True)
            for stale in remove:
                Path(stale).unlink(missing_ok=True)
            for kind in order:
                _plain_permissions(self._temporaries[kind])
                os.replace(self._temporaries[kind], self.targets[kind])
                del self._temporaries[kind]
        return {kind: self.targets[kind] for kind in order}
