"""Batch segmentation that never loses, mixes or half-writes results (``docs/batch.md``).

Output sets committed as a whole under a per-case lock, interruption (SIGINT / SIGTERM sent to a
running ``napari-tae segment``), resume, two concurrent runs on one folder, ``--jobs`` and
``torchrun`` with two CPU processes (same voxels as one process), the output-folder check, input
folders holding earlier outputs, the default checkpoint, checkpoint calibration validated at
load, and ``--summary``.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import _logged, _write_case

from napari_tae import batch
from napari_tae.cli import main
from napari_tae.export import OUTPUT_KINDS, file_sha256

ROOT = Path(__file__).resolve().parents[1]
# a real (tiny, random) network: outputs that depend on every weight, so process-count changes
# that altered the numbers would show
TINY = {"img_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}
CALIBRATION = {"p99": 2.0, "p99.5": 3.0, "p99.9": 4.0, "default": 2.0}
# imported at start-up by every Python process of a test run (workers included): slows each
# inference down, so a signal lands inside a case and two runs overlap; the product is unchanged
SLOW_SITECUSTOMIZE = """
import os, time
delay = float(os.environ.get("NAPARI_TAE_TEST_SLOW_S", "0"))
if delay:
    import napari_tae.inference as inference
    real = inference.segment
    def slow(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)
    inference.segment = slow
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("batch_inputs")
    for i in range(5):
        _write_case(folder / f"s{i}.nii.gz", 10 + i)
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from napari_tae.checkpoint import save_checkpoint
    from napari_tae.models import build_model

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", build_model("b_tae", **TINY),
                           preprocessing={"normalisation": "per_volume", "upper_percentile": 99.5},
                           calibration=CALIBRATION)


def _env(slow_dir: Path | None = None, delay: float = 0.0) -> dict[str, str]:
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    if slow_dir is not None:
        (slow_dir / "sitecustomize.py").write_text(SLOW_SITECUSTOMIZE)
        paths.insert(0, str(slow_dir))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "NAPARI_TAE_TEST_SLOW_S": str(delay)}


def _segment_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "napari_tae.cli", *args]


def _case(out_dir: Path, name: str) -> batch.Case:
    return batch.Case(source=Path(f"{name}.nii.gz"), name=name, folder=out_dir)


def _assert_only_complete_sets(out_dir: Path) -> set[str]:
    """Every file in the folder belongs to a complete set whose record hashes match; no hidden file."""
    files = sorted(p.name for p in out_dir.iterdir())
    assert not [f for f in files if f.startswith(".")], files  # no temporary, lock or probe
    names = {f.rsplit("_", 1)[0] for f in files}
    for name in names:
        record = batch.complete_record(_case(out_dir, name))
        assert record is not None, f"{name}: incomplete set {files}"
        for kind, entry in record["files"].items():
            assert file_sha256(out_dir / entry["file"]) == entry["sha256"], (name, kind)
        expected = {f"{name}{OUTPUT_KINDS[k]}" for k in [*record["files"], "provenance"]}
        assert {f for f in files if f.rsplit("_", 1)[0] == name} == expected
    return names


def _summary(path: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(path.read_text())["cases"]}


# --------------------------------------------------------------------------------------------
# output folder, inputs, checkpoint


def _no_model(monkeypatch) -> None:
    from napari_tae import cli

    def fail(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded before the output folder is checked")

    monkeypatch.setattr(cli, "_load_model", fail)


def test_out_dir_that_cannot_be_created_is_named_before_the_model(inputs, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out_dir = blocker / "results"
    assert main(["segment", str(inputs / "s0.nii.gz"), "-o", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out_dir}: cannot create the output folder" in err, err
    assert "Traceback" not in err


def test_unwritable_out_dir_is_named_before_the_model(inputs, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    if os.geteuid() != 0:
        out_dir = tmp_path / "read_only"
        out_dir.mkdir()
        out_dir.chmod(0o555)
    else:
        # root ignores permission bits, so the check must try a real create: sysfs refuses
        # new files even to root
        out_dir = Path("/sys/kernel")
    try:
        assert main(["segment", str(inputs / "s0.nii.gz"), "-o", str(out_dir)]) == 2
    finally:
        if out_dir.is_relative_to(tmp_path):
            out_dir.chmod(0o755)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out_dir}: the output folder is not writable" in err, err
    assert "/." not in err  # never a hidden temporary or probe name


def test_write_error_names_the_output_file_not_a_temporary(inputs, tmp_path, capsys, monkeypatch):
    import nibabel

    def disk_full(_img, filename):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(nibabel, "save", disk_full)
    out_dir = tmp_path / "out"
    assert main(["-q", "segment", str(inputs / "s0.nii.gz"), "-m", "intensity", "-o", str(out_dir)]) == 1
    errors = [m for m in _logged(capsys, "ERROR") if "No space left" in m]
    assert errors and str(out_dir / "s0_reconstruction.nii.gz") in errors[0], errors
    assert "/." not in errors[0]
    assert not list(out_dir.iterdir())  # nothing half-written, no temporary, no lock


def test_folder_input_skips_earlier_outputs(inputs, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("s0", "s1"):
        (folder / f"{name}.nii.gz").write_bytes((inputs / f"{name}.nii.gz").read_bytes())
    args = ["-q", "segment", str(folder), "-m", "intensity", "-o", str(folder)]
    assert main([*args, "--summary", str(tmp_path / "first.json")]) == 0
    assert main([*args, "--summary", str(tmp_path / "second.json")]) == 0
    assert sorted(_summary(tmp_path / "second.json")) == ["s0", "s1"]
    assert {r["status"] for r in _summary(tmp_path / "second.json").values()} == {"skipped"}
    assert not list(folder.glob("*_residual_*")) and not list(folder.glob("*_mask_*"))


def test_default_checkpoint_is_the_bundled_default(inputs, tmp_path):
    from napari_tae.checkpoint import (
        default_checkpoint,
        read_metadata,
        resolve_checkpoint,
    )

    assert main(["-q", "segment", str(inputs / "s0.nii.gz"), "-o", str(tmp_path)]) == 0
    path = resolve_checkpoint(default_checkpoint())
    model = json.loads((tmp_path / "s0_provenance.json").read_text())["model"]
    assert model["checkpoint"] == str(path.resolve())
    assert model["weights_sha256"] == read_metadata(path).sha256


@pytest.mark.parametrize("value", [float("nan"), 250.0, -1.0])
def test_calibration_outside_a_percentage_is_refused_at_load(tiny_checkpoint, inputs, tmp_path, capsys, value):
    from test_checkpoint import _rewrite

    from napari_tae.checkpoint import CheckpointError, read_metadata

    bad = _rewrite(tiny_checkpoint, tmp_path / "bad.safetensors",
                   edit=lambda meta: meta["calibration"].update(default=value))
    with pytest.raises(CheckpointError, match=r"calibration value 'default' .* not a percentage") as info:
        read_metadata(bad)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    status = main(["segment", str(inputs / "s0.nii.gz"), "-m", str(bad), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    # one line naming the checkpoint, before any input
    assert status == 2 and err.count("\n") == 1 and str(bad) in err and "s0.nii.gz" not in err, err
    assert not list((tmp_path / "out").iterdir())


def test_save_refuses_a_calibration_it_could_not_load(tmp_path):
    from napari_tae.checkpoint import CheckpointError, save_checkpoint
    from napari_tae.models import build_model

    with pytest.raises(CheckpointError, match="not a percentage"):
        save_checkpoint(tmp_path / "m.safetensors", build_model("b_tae", **TINY), preprocessing={},
                        calibration={"default": 250.0})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# resume, locks, summary


def test_resume_redoes_a_partial_set_and_removes_leftovers(inputs, tmp_path):
    out_dir = tmp_path / "out"
    args = ["-q", "segment", str(inputs / "s0.nii.gz"), str(inputs / "s1.nii.gz"), "-m", "intensity",
            "-o", str(out_dir), "--summary", str(tmp_path / "s.json")]
    assert main(args) == 0
    # what a killed run leaves: a set without its record, a temporary and a lock of a dead process
    (out_dir / "s1_provenance.json").unlink()
    (out_dir / ".s1_mask.nii.gz.x1y2z3.nii.gz").write_bytes(b"half")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out_dir / ".s1.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                  "taken": "2026-01-01T00:00:00+00:00"}))
    assert main(args) == 0
    rows = _summary(tmp_path / "s.json")
    assert rows["s0"]["status"] == "skipped" and rows["s1"]["status"] == "done"
    assert _assert_only_complete_sets(out_dir) == {"s0", "s1"}


def test_files_of_unknown_origin_are_never_replaced_without_overwrite(inputs, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hand_mask = out_dir / "s0_mask.nii.gz"
    hand_mask.write_bytes(b"a mask drawn by hand")
    args = ["-q", "segment", str(inputs / "s0.nii.gz"), str(inputs / "s1.nii.gz"), "-m", "intensity",
            "-o", str(out_dir)]
    assert main(args) == 1
    assert hand_mask.read_bytes() == b"a mask drawn by hand"
    errors = _logged(capsys, "ERROR")
    assert any("s0_mask.nii.gz" in m and "--overwrite" in m and "overwrite=True" not in m for m in errors), errors
    assert batch.complete_record(_case(out_dir, "s1")) is not None
    # an output edited after it was written no longer matches its record: kept as well
    edited = out_dir / "s1_lesions.csv"
    edited.write_text(edited.read_text() + "99,1,0.1,0.5,0.5,1,1,1\n")
    assert main(args) == 2
    errors = _logged(capsys, "ERROR")
    assert any("s1_lesions.csv" in m and "differ from their provenance record" in m for m in errors), errors
    assert edited.read_text().endswith("99,1,0.1,0.5,0.5,1,1,1\n")
    assert main([*args, "--overwrite"]) == 0
    assert _assert_only_complete_sets(out_dir) == {"s0", "s1"}


def test_live_lock_is_respected_and_stale_ones_broken(tmp_path):
    out_dir = tmp_path
    case = _case(out_dir, "c")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "taken": "now",
          "process_start": batch._process_start(os.getpid())}
    for holder, live in [
        (me, True),
        ({**me, "host": "another-node"}, True),  # cannot be checked from here: respected
        ({**me, "boot": "another-machine"}, True),  # same host name, another machine's boot
        ({**me, "process_start": "1"}, False),  # our pid, but another process (pid reused)
        ({**me, "pid": 2 ** 22 + 7}, False),  # beyond pid_max: no such process
    ]:
        case.lock_path.write_text(json.dumps(holder))
        if live:
            with pytest.raises(batch.CaseLocked, match=f"pid {holder['pid']} on {holder['host']}"):
                batch.CaseLock(case).acquire()
            assert json.loads(case.lock_path.read_text()) == holder
        else:
            with batch.CaseLock(case):
                assert json.loads(case.lock_path.read_text())["pid"] == os.getpid()
            assert not case.lock_path.exists()


def test_locked_case_is_skipped_with_the_holder_named(inputs, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "taken": "2026-01-01T00:00:00+00:00",
              "process_start": batch._process_start(os.getpid())}
    (out_dir / ".s0.lock").write_text(json.dumps(holder))
    assert main(["-q", "segment", str(inputs / "s0.nii.gz"), "-m", "intensity", "-o", str(out_dir),
                 "--summary", str(tmp_path / "s.json")]) == 0
    row = _summary(tmp_path / "s.json")["s0"]
    assert row["status"] == "skipped" and f"being written by pid {os.getpid()}" in row["error"]
    assert not (out_dir / "s0_provenance.json").exists()


def test_summary_json_and_csv(inputs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("s0", "s1"):
        (folder / f"{name}.nii.gz").write_bytes((inputs / f"{name}.nii.gz").read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    out_dir = tmp_path / "out"
    args = ["-q", "segment", str(folder), "-m", "intensity", "-o", str(out_dir), "--squash", "20"]
    assert main([*args, "--summary", str(tmp_path / "s.json")]) == 1
    rows = _summary(tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    assert rows["broken"]["status"] == "failed" and "broken.nii.gz" in rows["broken"]["error"]
    assert rows["broken"]["outputs"] == {} and rows["broken"]["lesions"] is None
    for name in ("s0", "s1"):
        row = rows[name]
        assert row["status"] == "done" and row["error"] is None
        assert set(row["outputs"]) == set(OUTPUT_KINDS) - {"seg"}  # the SEG is for DICOM inputs
        assert all(Path(p).is_file() for p in row["outputs"].values())
        with open(row["outputs"]["lesions"], newline="") as fh:
            table = list(csv.DictReader(fh))
        assert row["lesions"] == len(table) > 0
        assert row["lesion_volume_ml"] == pytest.approx(sum(float(r["volume_ml"]) for r in table))
    # CSV: the same rows, one output column per kind; a re-run reports the sets as skipped
    assert main([*args, "--summary", str(tmp_path / "s.csv")]) == 1
    with open(tmp_path / "s.csv", newline="") as fh:
        table = {r["name"]: r for r in csv.DictReader(fh)}
    assert {n: r["status"] for n, r in table.items()} == {"broken": "failed", "s0": "skipped", "s1": "skipped"}
    assert table["s0"]["output_mask"] == rows["s0"]["outputs"]["mask"]
    assert float(table["s1"]["lesion_volume_ml"]) == pytest.approx(rows["s1"]["lesion_volume_ml"])
    assert not list(tmp_path.glob(".s.*"))


def test_summary_needs_json_or_csv(inputs, tmp_path, capsys):
    assert main(["segment", str(inputs), "-m", "intensity", "-o", str(tmp_path), "--summary",
                 str(tmp_path / "s.txt")]) == 2
    assert "--summary must end in .json or .csv" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# interruption and concurrency (real processes, real signals)


def _wait_for(predicate, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.02)


def _interrupt_mid_batch(tmp_path: Path, inputs: Path, out_dir: Path, signum: int, *extra: str) -> str:
    """Start ``python -m napari_tae.cli segment`` (1 s per inference), signal it once the first
    case is complete and another is under way, as Ctrl-C does (the whole process group); its
    stderr."""
    command = _segment_command("segment", str(inputs), "-m", "intensity", "-o", str(out_dir), *extra)
    process = subprocess.Popen(command, env=_env(tmp_path, 1.0), stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _wait_for(lambda: list(out_dir.glob("*_provenance.json")) or process.poll() is not None)
        time.sleep(0.3)
        os.killpg(process.pid, signum)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    return err


def _rerun_finishes(inputs: Path, out_dir: Path, done: set[str], summary: Path) -> None:
    assert main(["-q", "segment", str(inputs), "-m", "intensity", "-o", str(out_dir), "--summary", str(summary)]) == 0
    rows = _summary(summary)
    assert {n for n, r in rows.items() if r["status"] == "skipped"} == done
    assert {n for n, r in rows.items() if r["status"] == "done"} == {f"s{i}" for i in range(5)} - done
    assert _assert_only_complete_sets(out_dir) == {f"s{i}" for i in range(5)}


@pytest.mark.usefixtures("sigint_raises")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_batch_leaves_only_complete_sets_and_rerun_finishes(inputs, tmp_path, signum):
    out_dir = tmp_path / "out"
    err = _interrupt_mid_batch(tmp_path, inputs, out_dir, signum)
    stopped = [line for line in err.splitlines() if "interrupted in" in line]
    assert len(stopped) == 1 and str(inputs / "s") in stopped[0] and "run the same command again" in stopped[0], err
    done = _assert_only_complete_sets(out_dir)
    assert 1 <= len(done) < 5
    _rerun_finishes(inputs, out_dir, done, tmp_path / "s.json")


@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_stops_jobs_workers_cleanly(inputs, tmp_path):
    out_dir = tmp_path / "out"
    err = _interrupt_mid_batch(tmp_path, inputs, out_dir, signal.SIGINT, "--jobs", "2")
    assert "interrupted in" in err and "Traceback" not in err, err
    done = _assert_only_complete_sets(out_dir)
    assert 1 <= len(done) < 5
    _rerun_finishes(inputs, out_dir, done, tmp_path / "s.json")


def test_two_concurrent_runs_never_mix_or_repeat(inputs, tmp_path):
    out_dir = tmp_path / "out"
    runs = [subprocess.Popen(_segment_command("-q", "segment", str(inputs), "-m", "intensity", "-o", str(out_dir),
                                              "--summary", str(tmp_path / f"run{i}.json")),
                             env=_env(tmp_path, 0.4), stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errs
    summaries = [_summary(tmp_path / f"run{i}.json") for i in range(2)]
    for name in (f"s{i}" for i in range(5)):
        statuses = sorted(s[name]["status"] for s in summaries)
        assert statuses == ["done", "skipped"], (name, statuses)
    assert _assert_only_complete_sets(out_dir) == {f"s{i}" for i in range(5)}


# --------------------------------------------------------------------------------------------
# several processes: --jobs and torchrun give the voxels of one process, each case once


def _volumes(out_dir: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out_dir.glob("*.nii.gz"))}


@pytest.fixture(scope="module")
def one_process(inputs, tiny_checkpoint, tmp_path_factory) -> dict[str, np.ndarray]:
    out_dir = tmp_path_factory.mktemp("one_process")
    assert main(["-q", "segment", str(inputs), "-m", str(tiny_checkpoint), "-o", str(out_dir),
                 "--device", "cpu"]) == 0
    return _volumes(out_dir)


def _assert_same_voxels(out_dir: Path, expected: dict[str, np.ndarray]) -> None:
    found = _volumes(out_dir)
    # 5 cases x their NIfTI outputs: reconstruction, residual, score, mask and brain mask
    assert sorted(found) == sorted(expected) and len(found) == 5 * 5
    for name, data in expected.items():
        np.testing.assert_array_equal(found[name], data, err_msg=name)


def test_jobs_two_workers_same_voxels_each_case_once(inputs, tiny_checkpoint, one_process, tmp_path):
    out_dir = tmp_path / "out"
    assert main(["-q", "segment", str(inputs), "-m", str(tiny_checkpoint), "-o", str(out_dir),
                 "--jobs", "2", "--summary", str(tmp_path / "s.json")]) == 0
    rows = _summary(tmp_path / "s.json")
    assert sorted(rows) == [f"s{i}" for i in range(5)] and {r["status"] for r in rows.values()} == {"done"}
    records = [json.loads((out_dir / f"s{i}_provenance.json").read_text()) for i in range(5)]
    assert all(r["settings"]["device"] == "cpu" for r in records)
    _assert_same_voxels(out_dir, one_process)
    _assert_only_complete_sets(out_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_same_voxels_each_case_once(inputs, tiny_checkpoint, one_process, tmp_path):
    out_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "napari_tae.cli", "segment", str(inputs), "-m", str(tiny_checkpoint), "-o", str(out_dir),
               "--summary", str(tmp_path / "s.json")]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    # rank 0 reports for every rank, once
    assert done.stderr.count("5 input(s): 5 segmented, 0 skipped, 0 failed") == 1, done.stderr
    rows = _summary(tmp_path / "s.json")
    assert sorted(rows) == [f"s{i}" for i in range(5)] and {r["status"] for r in rows.values()} == {"done"}
    _assert_same_voxels(out_dir, one_process)
    _assert_only_complete_sets(out_dir)


def test_jobs_refused_on_a_gpu_and_under_torchrun(inputs, tmp_path, capsys, monkeypatch):
    from napari_tae import inference

    monkeypatch.setattr(inference, "select_device", lambda _name: torch.device("cuda"))
    assert main(["segment", str(inputs), "-o", str(tmp_path), "--jobs", "2"]) == 2
    assert "--jobs is for CPU runs" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["segment", str(inputs), "-o", str(tmp_path), "--jobs", "2"]) == 2
    assert "under torchrun use --nproc_per_node" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
