"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # the suite's tensors are small and the machine has 2 cores: intra-op threading costs more
    # than it gains (about 10x slower under load)
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt here and in the processes a test starts, as at a terminal,
    even when the suite was started with SIGINT ignored (a background job of a script: nohup, &)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def two_torch_threads():
    """Torch at 2 threads for one test (the suite runs at 1), as a 2-core machine runs the program."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)
