"""One way to start the widget's work, on this thread or in a Qt worker, that never raises.

The widget runs two kinds of work: inference (a generator yielding progress) and the whole-volume
post-processing (a function). Both go through :func:`start_task`, synchronously (tests, scripts,
the headless demo) or in a worker thread, with the same outcome handlers:

* an exception of the job ends in ``on_error(exc)`` once, and nowhere else: the worker comes from
  :func:`superqt.utils.create_worker` with ``_ignore_errors=True``, because napari's own
  ``create_worker`` also relays errors to its notification manager and re-raises them in the
  GUI thread (a second and a third report; outside ``napari.run()`` an exception escaping a Qt
  slot aborts the process);
* a warning of the job (e.g. :class:`napari_tae.preprocess.NotSkullStrippedWarning`) ends in
  ``on_warning(message, category)``, in both modes;
* an exception raised by a handler itself is logged and passed to ``on_error`` as well, so no
  exception ever leaves a Qt slot.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["guarded", "start_task"]

_logger = logging.getLogger(__name__)


def guarded(handler: Callable[..., Any], on_error: Callable[[BaseException], Any]
            ) -> Callable[..., None]:
    """``handler`` whose exceptions go to ``on_error`` (logged with their traceback)."""

    def call(*args: Any) -> None:
        try:
            handler(*args)
        except Exception as exc:  # a Qt slot must never raise (PyQt aborts the process)
            name = getattr(getattr(handler, "func", handler), "__name__", "a handler")
            _logger.exception("napari-tae: %s failed", name)
            on_error(exc)

    return call


def _run_here(job: Callable[[], Any], on_yield: Callable[[Any], Any] | None,
              on_warning: Callable[[str, type], Any]) -> Any:
    """Run ``job`` to completion on this thread; warnings are handed to ``on_warning``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if not inspect.isgeneratorfunction(job):
                return job()
            gen = job()
            while True:
                try:
                    value = next(gen)
                except StopIteration as stop:
                    return stop.value
                if on_yield is not None:
                    on_yield(value)
        finally:
            for w in caught:
                on_warning(str(w.message), w.category)


def start_task(
    job: Callable[[], Any],
    *,
    synchronous: bool,
    on_return: Callable[[Any], Any],
    on_error: Callable[[BaseException], Any],
    on_warning: Callable[[str, type], Any],
    on_yield: Callable[[Any], Any] | None = None,
) -> Any:
    """Start ``job`` (a function or a generator function, no arguments).

    Returns the started worker, or None when ``synchronous`` (the job has then finished and its
    handlers have run).
    """
    on_return, on_yield = guarded(on_return, on_error), on_yield and guarded(on_yield, on_error)
    if synchronous:
        try:
            value = _run_here(job, on_yield, on_warning)
        except Exception as exc:  # noqa: BLE001 (the one report of any failure of the job)
            on_error(exc)
        else:
            on_return(value)
        return None
    from superqt.utils import create_worker

    worker = create_worker(job, _start_thread=False, _ignore_errors=True)
    worker.returned.connect(on_return)
    worker.errored.connect(guarded(on_error, lambda exc: _logger.error("%s", exc)))
    worker.warned.connect(guarded(lambda w: on_warning(str(w[0]), w[1]), on_error))
    if on_yield is not None:
        worker.yielded.connect(on_yield)
    worker.start()
    return worker
