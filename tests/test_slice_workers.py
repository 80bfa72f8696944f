"""SliceWorkers: a CPU batch in chunks run at the same time, one per torch thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from napari_tae._slice_workers import SliceWorkers


class Recorder:
    """``fn`` for SliceWorkers: records where and how each chunk ran; doubles the chunk."""

    def __init__(self, meet: int = 1, fail_on: float | None = None, slow_on: float | None = None):
        self.calls: list[tuple[int, int, list[float]]] = []
        self.finished: list[float] = []
        self.barrier = threading.Barrier(meet, timeout=10) if meet > 1 else None
        self.fail_on, self.slow_on = fail_on, slow_on

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        self.calls.append((threading.get_ident(), torch.get_num_threads(), chunk.tolist()))
        if self.barrier is not None:
            self.barrier.wait()  # every chunk must be running at once to get past this
        if self.fail_on in chunk:
            raise RuntimeError(f"chunk with {self.fail_on} failed")
        if self.slow_on in chunk:
            time.sleep(0.3)
        self.finished.append(float(chunk[0]))
        return chunk * 2


def _workers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("napari-tae-slices")]


def test_chunks_run_at_once_one_per_thread_in_order(two_torch_threads):
    fn = Recorder(meet=2)
    batch = np.arange(5, dtype=np.float32)
    with SliceWorkers(2) as workers:
        out = workers.map(fn, batch)
        np.testing.assert_array_equal(out, batch * 2)
        assert sorted(c for _, _, c in fn.calls) == [[0.0, 1.0, 2.0], [3.0, 4.0]]
        assert len({ident for ident, _, _ in fn.calls}) == 2
        main = [c for ident, _, c in fn.calls if ident == threading.get_ident()]
        assert main == [[0.0, 1.0, 2.0]]  # the calling thread takes the first chunk
        assert {n for _, n, _ in fn.calls} == {1}
        assert torch.get_num_threads() == 2
    assert not _workers_alive()


def test_fewer_slices_than_threads_share_the_threads_out():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        fn = Recorder(meet=2)
        with SliceWorkers(4) as workers:
            np.testing.assert_array_equal(workers.map(fn, np.array([1.0, 2.0])), [2.0, 4.0])
            assert sorted((t, c) for _, t, c in fn.calls) == [(2, [1.0]), (2, [2.0])]
            single = Recorder()
            np.testing.assert_array_equal(workers.map(single, np.array([7.0])), [14.0])
            assert single.calls == [(threading.get_ident(), 4, [7.0])]
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(n)


def test_one_thread_runs_the_whole_batch_here():
    fn = Recorder()
    with SliceWorkers(1) as workers:
        workers.map(fn, np.arange(4.0))
    assert fn.calls == [(threading.get_ident(), torch.get_num_threads(), [0.0, 1.0, 2.0, 3.0])]


@pytest.mark.parametrize("fail_on, slow_on", [(3.0, 0.0), (0.0, 3.0)], ids=["pool_chunk", "calling_thread_chunk"])
def test_an_error_waits_for_the_other_chunk_and_restores_the_threads(two_torch_threads, fail_on, slow_on):
    fn = Recorder(fail_on=fail_on, slow_on=slow_on)
    with SliceWorkers(2) as workers:
        with pytest.raises(RuntimeError, match=f"chunk with {fail_on} failed"):
            workers.map(fn, np.arange(6.0))
        assert fn.finished == [slow_on]  # the slow chunk ended before the error came out
        assert torch.get_num_threads() == 2
        # the pool still works after an error
        np.testing.assert_array_equal(workers.map(Recorder(), np.arange(4.0)), np.arange(4.0) * 2)
    assert not _workers_alive()
