"""Batch runs that never lose, mix or half-write results (the rules: ``docs/batch.md``).

Each input is a *case*: a set of output files ``<name><suffix>`` (:data:`napari_tae.export.OUTPUT_KINDS`)
in one output folder. A case is written under its lock (``.<name>.lock``, created with
``O_CREAT | O_EXCL``), to temporary names, and put in place by :class:`napari_tae._atomic.FileSet`
with the provenance record last; the record lists every file of the set with its size and
sha256, and a case is *complete* when its record is readable and every file it lists is there
with that size. Complete cases made with the same request (input hash, checkpoint, settings) are
skipped; what a killed run left is redone; other files under the case's names are never replaced
without ``overwrite``.

The work per case (segmenting, writing the files) is a :class:`CaseWork` given by the caller
(``napari-tae segment`` in :mod:`napari_tae.cli`); this module runs it one case at a time, in
``--jobs`` worker processes, or as one rank of ``torchrun``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from napari_tae._atomic import FileSet, temporary_patterns, write_text_atomic
from napari_tae.export import OUTPUT_KINDS
from napari_tae.io import error_line

__all__ = [
    "BatchInterrupted",
    "Case",
    "CaseLock",
    "CaseLocked",
    "CaseResult",
    "CaseWork",
    "OutputFolderError",
    "WorkerError",
    "complete_record",
    "failure",
    "gather_results",
    "is_output_file",
    "plan_cases",
    "prepare_output_folder",
    "rank_info",
    "run_case",
    "run_cases",
    "run_parallel",
    "shard",
    "stop_on_signals",
    "write_summary",
]

_logger = logging.getLogger("napari_tae.batch")

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
#: A lock or break file this old without readable content is taken as left by a dead writer
#: (a writer fills its lock file microseconds after creating it).
_EMPTY_LOCK_STALE_S = 60.0
#: How long rank 0 of a torchrun batch waits for the slowest rank (shards can differ by hours).
_GATHER_TIMEOUT = _dt.timedelta(days=7)


class OutputFolderError(OSError):
    """The output folder cannot be made or written; the message is one line naming the folder."""


class CaseLocked(RuntimeError):
    """Another live run holds the case's lock."""


class WorkerError(RuntimeError):
    """A worker process or rank could not start or report (one line; cases done stay complete)."""


class BatchInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a batch; ``cases`` are the inputs that were in progress."""

    def __init__(self, cases: Sequence[str | os.PathLike]) -> None:
        self.cases = [os.fspath(c) for c in cases]
        super().__init__(", ".join(self.cases))


# --------------------------------------------------------------------------------------------
# output folder and planning


def prepare_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if missing and prove it writable by creating and removing a probe file.

    Permission bits are not trusted (root ignores them, read-only mounts and ACLs do not show in
    them): only a real ``O_EXCL`` create tells.

    Raises
    ------
    OutputFolderError
        One line naming the folder: not a folder, cannot be created, or not writable.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{folder}: the output folder exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    probe = folder / f".napari-tae-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:  # a probe of a dead run with our pid: removing it proves as much
            probe.unlink()
            return folder
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(f"{folder}: the output folder is not writable ({exc.strerror or exc})") from None
    return folder


def is_output_file(path: str | os.PathLike) -> bool:
    """Whether the file name is one napari-tae writes (ends with a suffix of ``OUTPUT_KINDS``)."""
    name = os.path.basename(os.fspath(path)).lower()
    return any(name.endswith(suffix) for suffix in OUTPUT_KINDS.values())


@dataclass(frozen=True)
class Case:
    """One input and the folder its output set goes to (``series``: the DICOM series of a folder)."""

    source: Path
    name: str
    folder: Path
    series: Any = None

    def target(self, kind: str) -> Path:
        return self.folder / f"{self.name}{OUTPUT_KINDS[kind]}"

    def targets(self, kinds: Sequence[str] | None = None) -> dict[str, Path]:
        return {kind: self.target(kind) for kind in (OUTPUT_KINDS if kinds is None else kinds)}

    @property
    def lock_path(self) -> Path:
        return self.folder / f".{self.name}.lock"


@dataclass
class CaseResult:
    """One row of the batch summary."""

    input: str
    name: str
    status: str
    lesions: int | None = None
    lesion_volume_ml: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def plan_cases(candidates: Sequence[Case]) -> tuple[list[Case], list[CaseResult]]:
    """The cases sorted by name; one whose name repeats another's, or whose outputs would land
    on an input, is a failure (checked before any model runs)."""
    cases: dict[str, Case] = {}
    failed: list[CaseResult] = []
    # one pass: a cohort of thousands must not cost n x n path checks
    inputs = _file_keys([c.source for c in candidates])
    for case in candidates:
        if case.name in cases:
            failed.append(failure(case.source, case.name,
                                  f"same output name '{case.name}' as {cases[case.name].source}; rename one"))
            continue
        clash = next((out for out in case.targets().values() if _file_keys([out]) & inputs), None)
        if clash is not None:
            failed.append(failure(case.source, case.name,
                                  f"output {clash} is one of the inputs; choose another --out-dir"))
            continue
        cases[case.name] = case
    return [cases[name] for name in sorted(cases)], failed


def _file_keys(paths: Sequence[Path]) -> set[Any]:
    """Resolved paths, and device and inode of those that exist (hard links are one file too)."""
    keys: set[Any] = set()
    for path in paths:
        keys.add(os.path.realpath(path))
        try:
            info = os.stat(path)
        except OSError:
            continue
        keys.add((info.st_dev, info.st_ino))
    return keys


def failure(source: Path, name: str, problem: str) -> CaseResult:
    """A failed row of the summary, its message naming the input."""
    return CaseResult(input=str(source), name=name, status=FAILED, error=error_line(ValueError(problem), source))


def shard(cases: Sequence[Case], rank: int, world: int) -> list[Case]:
    """Round-robin share of one rank: cases ``rank, rank + world, ...`` of the sorted list."""
    return list(cases[rank::world])


# --------------------------------------------------------------------------------------------
# the per-case lock


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count fields after the last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str | None:
    """This machine's boot id (Linux): containers that share a host name on two machines differ here."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the run that wrote a lock may still be running (see the lock rule in docs/batch.md)."""
    if holder.get("host") != socket.gethostname() or holder.get("boot") not in (None, _boot_id()):
        return True  # another machine's process cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class CaseLock:
    """Exclusive right to write one case: ``.<name>.lock`` created with ``O_CREAT | O_EXCL``.

    The file holds the holder's pid, host, process start time and the time taken. A lock whose
    holder is on this host and no longer running is stale and broken (under a ``.break`` file
    taken the same way, so two runs never break and retake it at once); a lock from another host
    is respected until removed by hand.
    """

    def __init__(self, case: Case) -> None:
        self.path = case.lock_path
        self._held = False
        #: True when a dead run's lock was broken to take this one (its files are partial)
        self.broke_stale = False

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, breaking a stale one; raises :class:`CaseLocked` naming a live holder."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(),
                  "process_start": _process_start(os.getpid()),
                  "taken": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = self._read()
                if not self._stale(seen) or not self._break(seen):
                    raise CaseLocked(self._describe(seen)) from None
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(holder))
            self._held = True
            return
        raise CaseLocked("its lock keeps being taken by other runs")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def _read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return ""

    def _stale(self, text: str | None) -> bool:
        if text is None:
            return True  # released meanwhile: try again
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if not isinstance(holder, dict):
            return _age_s(self.path) > _EMPTY_LOCK_STALE_S
        return not _holder_alive(holder)

    def _break(self, seen: str | None) -> bool:
        """Remove the lock if it still holds ``seen``; False when another run is breaking it."""
        if seen is None:
            return True
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _age_s(breaker) > _EMPTY_LOCK_STALE_S:
                breaker.unlink(missing_ok=True)  # its breaker died; the next attempt retries
            return False
        try:
            if self._read() != seen:
                return self._read() is None
            self.path.unlink(missing_ok=True)
            self.broke_stale = True
            _logger.info("%s: removed a stale lock (%s)", self.path, self._describe(seen))
            return True
        finally:
            os.close(fd)
            breaker.unlink(missing_ok=True)

    def _describe(self, text: str | None) -> str:
        try:
            holder = json.loads(text or "")
            return f"being written by pid {holder['pid']} on {holder['host']} since {holder['taken']}"
        except (ValueError, KeyError, TypeError):
            return f"locked by {self.path}"


# --------------------------------------------------------------------------------------------
# one case


class CaseWork(Protocol):
    """What a batch does per case (``napari-tae segment``'s is :class:`napari_tae.cli.Segmenter`)."""

    def request(self, case: Case) -> dict[str, Any]:
        """JSON-able fingerprint of what would be computed (input hash, model, settings)."""

    def __call__(self, case: Case, files: FileSet) -> dict[str, Any]:
        """Write every kind but ``provenance`` to ``files.temporary(kind)``; return the provenance
        record (:func:`napari_tae.export.provenance_record`) without its ``files`` listing."""


def complete_record(case: Case) -> dict[str, Any] | None:
    """The case's provenance record if the set is complete (every listed file there, same size)."""
    try:
        record = json.loads(case.target("provenance").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    for kind, entry in files.items():
        if kind not in OUTPUT_KINDS or not isinstance(entry, dict) or entry.get("file") != case.target(kind).name:
            return None
        try:
            if case.target(kind).stat().st_size != entry.get("bytes"):
                return None
        except OSError:
            return None
    return record


def _result_from(case: Case, record: dict[str, Any], status: str) -> CaseResult:
    kinds = [*record.get("files", {}), "provenance"]
    return CaseResult(input=str(case.source), name=case.name, status=status, lesions=record.get("lesions"),
                      lesion_volume_ml=record.get("lesion_volume_ml"),
                      outputs={kind: str(case.target(kind)) for kind in kinds})


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _remove_leftovers(case: Case) -> int:
    """Remove temporaries of this case left by a killed run (only the lock holder writes them);
    returns how many there were."""
    found = [tmp for target in case.targets().values() for pattern in temporary_patterns(target)
             for tmp in case.folder.glob(pattern)]
    for tmp in found:
        tmp.unlink(missing_ok=True)
    return len(found)


def _listed_kinds(case: Case) -> set[str]:
    """Kinds the case's record lists, complete or not (files this tool wrote)."""
    try:
        files = json.loads(case.target("provenance").read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return set(files) & set(OUTPUT_KINDS) if isinstance(files, dict) else set()


def _refuse_unknown_files(case: Case, killed_run: bool) -> None:
    """Files under the case's names that are not a complete set are only redone when a killed run
    of this tool evidently left them; anything else may be the user's (a hand-corrected mask)."""
    present = [path for path in case.targets().values() if path.exists()]
    if not present:
        return
    if killed_run:
        _logger.info("%s: redoing the incomplete outputs of an interrupted run", case.source)
        return
    problem = ("differ from their provenance record (changed since written?)" if case.target("provenance").exists()
               else "are not part of a complete napari-tae output set")
    raise ValueError(f"{', '.join(p.name for p in present)} in {case.folder} {problem}; move them away or "
                     "pass --overwrite to replace them")


def _without_temporaries(message: str, case: Case) -> str:
    """The message with each hidden temporary's name replaced by the file it stands for."""
    for target in case.targets().values():
        hidden = rf"{re.escape(str(case.folder))}{re.escape(os.sep)}\.+{re.escape(target.name)}\.[^'\"\s]*"
        message = re.sub(hidden, lambda _match, final=str(target): final, message)
    return message


def run_case(case: Case, work: CaseWork, *, overwrite: bool = False) -> CaseResult:
    """Write one case's output set as a whole, or skip it when complete; never raises for a bad input.

    Under the case lock: a complete set made with the same request is skipped (``overwrite``
    redoes it), one made with another request is a failure naming what differs; an incomplete
    set is redone when a killed run's traces (a stale lock, temporaries) show it is this tool's,
    else refused unless ``overwrite``. KeyboardInterrupt propagates after the temporaries and the
    lock are removed.
    """
    try:
        with CaseLock(case) as lock:
            killed_run = _remove_leftovers(case) > 0 or lock.broke_stale
            request = work.request(case)
            record = complete_record(case)
            if record is not None and not overwrite:
                if record.get("request") == request:
                    return _result_from(case, record, SKIPPED)
                old = record.get("request")
                what = (f"with another {', '.join(_differences(old, request))}" if isinstance(old, dict)
                        else "by another command (no batch request recorded)")
                raise ValueError(f"complete outputs in {case.folder} were made {what}; --overwrite replaces them")
            if record is None and not overwrite:
                _refuse_unknown_files(case, killed_run)
            # kinds of the old set the new one lacks go too, but never a file this tool did not write
            ours = _listed_kinds(case) | ({k for k, p in case.targets().items() if p.exists()} if killed_run else set())
            with FileSet(case.targets()) as files:
                try:
                    record = _write_set(case, work, files, request, ours)
                except (ValueError, OSError, RuntimeError) as exc:
                    # a hidden temporary means nothing to the user: name the file it stands for
                    raise ValueError(_without_temporaries(error_line(exc, case.source), case)) from None
            return _result_from(case, record, DONE)
    except CaseLocked as exc:
        return CaseResult(input=str(case.source), name=case.name, status=SKIPPED,
                          error=f"{case.source}: {exc}")
    except (ValueError, OSError, RuntimeError) as exc:
        return CaseResult(input=str(case.source), name=case.name, status=FAILED, error=error_line(exc, case.source))


def _write_set(case: Case, work: CaseWork, files: FileSet, request: dict[str, Any],
               old_kinds: set[str]) -> dict[str, Any]:
    from napari_tae.export import describe_files

    record = work(case, files)
    record["request"] = request
    record["files"] = describe_files(files.written, files.targets)
    record["outputs"] = {kind: str(case.target(kind).resolve()) for kind in [*files.written, "provenance"]}
    files.temporary("provenance").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    files.commit(last="provenance", remove=[case.target(k) for k in old_kinds - {*files.written, "provenance"}])
    return record


# --------------------------------------------------------------------------------------------
# many cases: in this process, in worker processes, or as one torchrun rank


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT (Ctrl-C) or SIGTERM (``kill``, a job scheduler, torchrun) stops the block with
    KeyboardInterrupt, once: later signals are ignored so they cannot cut the clean-up short.

    A signal the shell set to be ignored (``nohup``, ``&`` in a script) stays ignored.
    """
    sigs = (signal.SIGINT, signal.SIGTERM)

    def interrupt(_signum: int, _frame: object) -> None:
        for sig in sigs:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    try:
        previous = {sig: signal.getsignal(sig) for sig in sigs}
        for sig in sigs:
            if previous[sig] != signal.SIG_IGN:
                signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_cases(cases: Sequence[Case], work: CaseWork, *, overwrite: bool,
              on_result: Callable[[CaseResult], None] = lambda _r: None) -> list[CaseResult]:
    """Run the cases one after another in this process.

    Raises
    ------
    BatchInterrupted
        On SIGINT / SIGTERM, naming the case it stopped in (whose temporaries and lock are gone).
    """
    results = []
    for case in cases:
        try:
            result = run_case(case, work, overwrite=overwrite)
        except KeyboardInterrupt:
            # a signal held back during the commit arrives once the set is complete
            raise BatchInterrupted([] if complete_record(case) else [case.source]) from None
        results.append(result)
        on_result(result)
    return results


def _worker(make_work: Callable[[], CaseWork], cases: list[Case], overwrite: bool, threads: int,
            tasks: Any, results: Any) -> None:
    """A ``--jobs`` worker: takes case indices from ``tasks`` until ``None``, reports on ``results``."""
    import torch

    torch.set_num_threads(threads)
    current = None
    try:
        with stop_on_signals():
            work = make_work()
            while (index := tasks.get()) is not None:
                current = index
                results.put(("start", index, os.getpid()))
                results.put(("result", index, run_case(cases[index], work, overwrite=overwrite)))
                current = None
    except KeyboardInterrupt:
        # run_case has cleaned up; a second signal must not cut the report short
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        results.put(("interrupted", current, os.getpid()))
    except Exception as exc:  # noqa: BLE001 - the parent reports it; a traceback wall helps no one
        results.put(("crashed", error_line(exc), os.getpid()))


def run_parallel(cases: Sequence[Case], make_work: Callable[[], CaseWork], n_jobs: int, *, overwrite: bool,
                 on_result: Callable[[CaseResult], None] = lambda _r: None) -> list[CaseResult]:
    """Run the cases in ``n_jobs`` spawned worker processes, each taking the next case when free.

    ``make_work`` must pickle (a module-level function or a ``functools.partial`` of one); each
    worker calls it once (loading the model) and uses ``cores / n_jobs`` torch threads. A worker
    that dies fails its case, the others go on.

    Raises
    ------
    BatchInterrupted
        On SIGINT / SIGTERM, naming the cases in progress; every worker cleans up first.
    """
    import multiprocessing

    cases = list(cases)
    context = multiprocessing.get_context("spawn")
    tasks, replies = context.Queue(), context.Queue()
    for index in range(len(cases)):
        tasks.put(index)
    n_jobs = max(1, min(n_jobs, len(cases)))
    threads = max(1, len(os.sched_getaffinity(0)) // n_jobs) if hasattr(os, "sched_getaffinity") else 1
    for _ in range(n_jobs):
        tasks.put(None)
    workers = [context.Process(target=_worker, args=(make_work, cases, overwrite, threads, tasks, replies),
                               daemon=True) for _ in range(n_jobs)]
    results: dict[int, CaseResult] = {}
    running: dict[int, int] = {}  # pid -> index of the case it is on
    try:
        for process in workers:
            process.start()
        while len(results) < len(cases):
            try:
                reply = replies.get(timeout=0.5)
            except queue.Empty:
                _fail_dead_workers(workers, running, cases, results, on_result)
                if not any(p.is_alive() for p in workers) and replies.empty():
                    break
                continue
            kind, value, detail = reply
            if kind == "start":
                running[detail] = value
            elif kind == "result":
                running = {pid: i for pid, i in running.items() if i != value}
                results[value] = detail
                on_result(detail)
            elif kind == "crashed":
                _stop(workers)
                raise WorkerError(f"a worker process failed: {value}")
    except KeyboardInterrupt:
        stopped = set(running.values())
        # Ctrl-C reaches the workers too: give them a moment to clean up before SIGTERM, which
        # stops those it did not reach (a signal sent to this process alone)
        _stop(workers, grace_s=2.0)
        while True:  # the workers name the cases they stopped in
            try:
                kind, value, _pid = replies.get(timeout=0.1)
            except queue.Empty:
                break
            if kind == "interrupted" and value is not None:
                stopped.add(value)
            elif kind == "result":
                stopped.discard(value)
        # a signal held back during a commit arrives once that set is complete
        raise BatchInterrupted([cases[i].source for i in sorted(stopped) if complete_record(cases[i]) is None]) from None
    finally:
        for process in workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    for index, case in enumerate(cases):  # cases no worker reached (all died)
        if index not in results:
            results[index] = CaseResult(input=str(case.source), name=case.name, status=FAILED,
                                        error=f"{case.source}: not run (every worker process stopped)")
    return [results[i] for i in range(len(cases))]


def _stop(workers: list[Any], grace_s: float = 0.0) -> None:
    """SIGTERM every worker still running after ``grace_s`` (each cleans up its case); wait for them."""
    end = time.monotonic() + grace_s
    for process in workers:
        process.join(timeout=max(0.0, end - time.monotonic()))
    for process in workers:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    for process in workers:
        process.join(timeout=60)


def _fail_dead_workers(workers: list[Any], running: dict[int, int], cases: list[Case],
                       results: dict[int, CaseResult], on_result: Callable[[CaseResult], None]) -> None:
    for process in workers:
        index = running.get(process.pid)
        if index is not None and not process.is_alive() and process.exitcode not in (0, None):
            del running[process.pid]
            case = cases[index]
            results[index] = CaseResult(
                input=str(case.source), name=case.name, status=FAILED,
                error=f"{case.source}: the worker process died (exit code {process.exitcode}); "
                      "its partial files are redone by the next run")
            on_result(results[index])


def rank_info() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the environment ``torchrun`` sets; (0, 1, 0) alone."""
    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0)


def gather_results(results: list[CaseResult], rank: int, world: int) -> list[CaseResult] | None:
    """Every rank's results on rank 0 (None on the others), after all ranks have finished.

    Uses ``torch.distributed`` with the gloo backend (CPU, no GPU needed, several nodes alike)
    and the rendezvous ``torchrun`` sets up; the process group is made only here so a long shard
    never trips a timeout.
    """
    if world <= 1:
        return results
    import torch.distributed as dist

    created = not dist.is_initialized()
    try:
        if created:
            dist.init_process_group("gloo", timeout=_GATHER_TIMEOUT)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object([asdict(r) for r in results], gathered, dst=0)
    except (RuntimeError, ValueError) as exc:  # no rendezvous (WORLD_SIZE set by hand?), a rank lost
        raise WorkerError(f"rank {rank} of {world}: cannot gather the ranks' results "
                          f"({error_line(exc)}); the cases done are complete, run again to report") from None
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
    if gathered is None:
        return None
    return [CaseResult(**row) for part in gathered for row in part]


# --------------------------------------------------------------------------------------------
# summary


_SUMMARY_COLUMNS = ("input", "name", "status", "lesions", "lesion_volume_ml", "error")


def write_summary(path: str | os.PathLike, results: Sequence[CaseResult]) -> Path:
    """One row per input, as JSON (``.json``) or CSV (``.csv``, one ``output_<kind>`` column per
    kind), written atomically."""
    path = Path(path)
    rows = [asdict(r) for r in sorted(results, key=lambda r: (r.name, r.input))]
    if path.suffix.lower() == ".json":
        counts = {status: sum(r["status"] == status for r in rows) for status in (DONE, SKIPPED, FAILED)}
        return write_text_atomic(path, json.dumps({"counts": counts, "cases": rows}, indent=2) + "\n")
    columns = [*_SUMMARY_COLUMNS, *(f"output_{kind}" for kind in OUTPUT_KINDS)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        outputs = row.pop("outputs")
        writer.writerow({**row, **{f"output_{kind}": outputs.get(kind, "") for kind in OUTPUT_KINDS}})
    return write_text_atomic(path, buffer.getvalue())
