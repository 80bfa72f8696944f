"""The allocator limits (napari_tae._allocator): set once, harmless everywhere, effective on glibc."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_tae import _allocator

ROOT = Path(__file__).resolve().parents[1]


class FakeLibc:
    """Records mallopt / malloc_trim calls; ``accept`` decides which mallopt values succeed."""

    def __init__(self, accept=lambda param, value: True, trim_result: int = 1) -> None:
        self.accept = accept
        self.trim_result = trim_result
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return int(self.accept(param, value))

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return self.trim_result


@pytest.fixture
def fresh(monkeypatch):
    """A process state where the limits were never tried; returns a setter for the C library."""
    monkeypatch.setattr(_allocator, "_kept", None)
    monkeypatch.setattr(_allocator, "_libc", None)

    def use(libc):
        monkeypatch.setattr(_allocator, "_load_glibc", lambda: libc)
        return libc

    return use


def test_sets_both_limits_once(fresh):
    libc = fresh(FakeLibc())
    assert _allocator.keep_freed_memory() is True
    assert libc.calls == [("mallopt", -3, 256 << 20), ("mallopt", -1, 1 << 30)]
    assert _allocator.keep_freed_memory() is True
    assert len(libc.calls) == 2  # the second call changes nothing
    assert _allocator.release_freed_memory() is True
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_older_glibc_gets_its_highest_threshold(fresh):
    libc = fresh(FakeLibc(accept=lambda param, value: not (param == -3 and value > 32 << 20)))
    assert _allocator.keep_freed_memory() is True
    assert [c[1:] for c in libc.calls] == [(-3, 256 << 20), (-3, 32 << 20), (-1, 1 << 30)]


@pytest.mark.parametrize("libc", [
    None,  # macOS, Windows, musl
    FakeLibc(accept=lambda param, value: False),
    FakeLibc(accept=lambda param, value: param != -1),
], ids=["no-glibc", "all-refused", "trim-refused"])
def test_refusals_give_false_and_no_trim(fresh, libc):
    fresh(libc)
    assert _allocator.keep_freed_memory() is False
    assert _allocator.release_freed_memory() is False
    if libc is not None:
        assert ("malloc_trim", 0) not in libc.calls


def test_a_failing_libc_never_raises(fresh):
    class Broken(FakeLibc):
        def mallopt(self, param, value):
            raise OSError("no such symbol")

    fresh(Broken())
    assert _allocator.keep_freed_memory() is False
    assert _allocator.release_freed_memory() is False


def test_release_survives_a_failing_trim(fresh):
    class BrokenTrim(FakeLibc):
        def malloc_trim(self, pad):
            raise OSError("gone")

    fresh(BrokenTrim())
    assert _allocator.keep_freed_memory() is True
    assert _allocator.release_freed_memory() is False


@pytest.mark.skipif(_allocator._load_glibc() is None, reason="needs glibc")
def test_glibc_reuses_a_freed_64_mib_block():
    """In a fresh process: without the limits every 64 MiB block is mapped (and faulted) again;
    with them only the first one is."""
    script = textwrap.dedent("""
        import ctypes, resource, sys
        from napari_tae import _allocator
        kept = _allocator.keep_freed_memory() if sys.argv[1] == "on" else None
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        n = 64 << 20
        faults = []
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(kept, *faults)
    """)
    pages = (64 << 20) // 4096
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = str(ROOT)
    runs = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                             cwd=ROOT, env=env, check=True).stdout.split()
        runs[mode] = out[0], [int(v) for v in out[1:]]
    assert runs["off"][0] == "None" and runs["on"][0] == "True"
    assert all(f >= pages // 2 for f in runs["off"][1])  # mapped afresh every time
    assert runs["on"][1][0] >= pages // 2 and max(runs["on"][1][1:]) < pages // 100
