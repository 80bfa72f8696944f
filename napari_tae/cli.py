"""Command-line interface: batch segmentation, the model list and the one-command demo.

``napari-tae segment`` runs the same code path as the plugin (:func:`napari_tae.inference.segment`,
Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in Brain MR Images",
BrainLes 2022, https://arxiv.org/abs/2207.02059) on many NIfTI files or DICOM series and writes,
per input, the reconstruction, residual, anomaly mask and the brain mask used on the input's grid,
a lesion table and a provenance record; for a DICOM series also a DICOM SEG of the mask referencing it. Each input's
outputs are committed as one set (:mod:`napari_tae.batch`, rules in ``docs/batch.md``).
``napari-tae models`` lists the model zoo and the bundled checkpoints; ``napari-tae demo`` opens
napari with the sample volume and the anomaly widget. Heads that are not skull-stripped get a
brain mask from deepbet (``--skull-strip``, :mod:`napari_tae.brain`).

Heavy modules (torch, napari) are imported inside the subcommands so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_tae import batch, dicom
from napari_tae._atomic import FileSet
from napari_tae.batch import Case, CaseResult
from napari_tae.brain import SKULL_STRIP_CHOICES
from napari_tae.export import OUTPUT_KINDS
from napari_tae.io import (
    NIFTI_SUFFIXES,
    VolumeError,
    error_line,
    nifti_files,
    nifti_stem,
)
from napari_tae.options import DEVICE_CHOICES, MEDIAN_MODES, PRECISIONS, check_median_kernel
from napari_tae.scores import SCORES

__all__ = [
    "OUTPUT_SUFFIXES",
    "Segmenter",
    "build_parser",
    "find_inputs",
    "main",
]

_logger = logging.getLogger("napari_tae.cli")

#: The demo's score: the sample comes from the generator the bundled models were trained on, where
#: the residual is what they are good at; the checkpoints' default (fused) is for real scans, on
#: which their residual is weak (napari_tae/checkpoints/README.md, quality benchmark)
DEMO_SCORE = "residual"

#: Kinds of ``export.OUTPUT_KINDS`` written for DICOM inputs only.
_DICOM_ONLY_KINDS = ("seg",)
#: Files written per NIfTI input, ``<name><suffix>`` in the output folder (a DICOM input adds the SEG).
OUTPUT_SUFFIXES = tuple(suffix for kind, suffix in OUTPUT_KINDS.items() if kind not in _DICOM_ONLY_KINDS)
#: Exit statuses above 125 mean "killed by a signal" or "command not found" to a shell.
_MAX_EXIT = 125
_EXIT_INTERRUPTED = 130


class CLIError(ValueError):
    """A user error with a one-line message (no traceback is shown); raised for one input, it
    fails that input only (a ValueError to :func:`napari_tae.batch.run_case`)."""


# --------------------------------------------------------------------------------------------
# helpers shared by the subcommands


def _is_dicom_input(path: Path) -> bool:
    """A folder holding DICOM files other than napari-tae's own SEG outputs."""
    return dicom.is_dicom_folder(path) and any(not batch.is_output_file(f) for f in dicom.dicom_files(path))


def find_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into the inputs: NIfTI files, and DICOM folders as themselves.

    A folder holding DICOM files is one DICOM input (its series are chosen by
    :func:`_plan_cases`); any other folder stands for its NIfTI files (sorted, not recursive),
    skipping those named like napari-tae outputs (``*_residual.nii.gz``, ...), so a folder that
    is also the output folder is not segmented again. Paths that do not exist are kept, so the
    batch reports them by name as failures instead of silently dropping them. A folder with
    neither is an error.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if _is_dicom_input(path):
            files.append(path)
        elif path.is_dir():
            found = nifti_files(path)
            volumes = [f for f in found if not batch.is_output_file(f)]
            if not volumes:
                skipped = f" (only {len(found)} napari-tae output file(s))" if found else ""
                raise CLIError(f"{path}: folder holds no NIfTI (.nii, .nii.gz) or DICOM file{skipped}")
            if len(volumes) < len(found):
                _logger.info("%s: skipped %d file(s) named like napari-tae outputs", path,
                             len(found) - len(volumes))
            files.extend(volumes)
        else:
            files.append(path)
    return files


def _load_model(name_or_path: str) -> tuple[Any, Any, Path | None]:
    """(model, meta or None, checkpoint path or None) for a file, a bundled name or intensity."""
    from napari_tae.checkpoint import CheckpointError, load_model, resolve_checkpoint

    try:
        path = resolve_checkpoint(name_or_path)
        model, meta = load_model(name_or_path)
    except (CheckpointError, OSError, ValueError) as exc:
        raise CLIError(error_line(exc, name_or_path)) from None
    return model, meta, path


# --------------------------------------------------------------------------------------------
# segment


def _choose_series(folder: Path, series_uid: str | None) -> dicom.DicomSeries:
    """The folder's series ``series_uid``, or its only series (``series_uid`` may name a series of
    another input folder); CLIError listing the series when that does not decide."""
    found = dicom.list_series(folder)
    try:
        return dicom.pick_series(found, series_uid if len(found) > 1 else None)
    except VolumeError as exc:
        # several series and no (right) choice: the command must change, so nothing runs
        raise CLIError(str(exc)) from None


def _plan_cases(files: list[Path], out_dir: Path, series_uid: str | None = None
                ) -> tuple[list[Case], list[CaseResult]]:
    """The cases of the inputs (:func:`napari_tae.batch.plan_cases`) and the inputs that failed.

    A DICOM input is named after its series' description (else its folder), and writes the SEG
    too. ``series_uid`` picks the series of the folder that holds it.
    """
    candidates: list[Case] = []
    failed: list[CaseResult] = []
    names: set[str] = set()
    for source in files:
        series = None
        if _is_dicom_input(source):
            try:
                series = _choose_series(source, series_uid)
            except VolumeError as exc:
                failed.append(batch.failure(source, source.name, exc.problem))
                continue
            name = dicom.output_name(series)
            if name in names:  # two studies of the same protocol: tell them by their folders
                name = f"{source.resolve().name}_{name}"
        else:
            name = nifti_stem(source)
        names.add(name)
        candidates.append(Case(source=source, name=name, folder=out_dir, series=series))
    if series_uid is not None and not any(c.series and c.series.uid == series_uid for c in candidates):
        raise CLIError(f"--series {series_uid}: no input DICOM folder holds this series")
    cases, clashes = batch.plan_cases(candidates)
    return cases, failed + clashes


def _brain_mask_file(case: Case, brain_arg: str | None) -> Path | None:
    """The supplied brain mask file for this input (a file, or a folder of masks named like the inputs)."""
    if brain_arg is None:
        return None
    path = Path(brain_arg)
    if path.is_dir():
        found = [c for c in (path / f"{case.name}{suffix}" for suffix in NIFTI_SUFFIXES) if c.is_file()]
        if not found:
            raise CLIError(f"{case.source}: no brain mask {case.name}.nii[.gz] in {path}")
        path = found[0]
    return path


def _brain_mask_for(path: Path | None, case: Case, geometry: Any) -> Any:
    """The brain mask on the input's grid, refused when it is another scan's or orientation's."""
    if path is None:
        return None
    from napari_tae.io import load_volume

    mask = load_volume(path)
    if mask.data.shape != geometry.shape:
        raise CLIError(
            f"{path}: brain mask shape {mask.data.shape} doesn't match the volume "
            f"{geometry.shape} of {case.source}"
        )
    # same shape is not enough: a mask of another scan or orientation would land off the brain
    if not np.allclose(mask.geometry.ras_affine, geometry.ras_affine, atol=1e-3):
        raise CLIError(f"{path}: brain mask is on another grid (affine) than {case.source}")
    return mask.data > 0


def _digest(path: Path) -> str | None:
    """sha256 of a file (None when it is missing: the load then reports it)."""
    from napari_tae.export import file_sha256

    return file_sha256(path) if path.is_file() else None


def _input_digest(case: Case) -> str | None:
    """sha256 of the input: the file, or the files of the case's DICOM series in order."""
    if case.series is None:
        return _digest(case.source)
    import hashlib

    combined = hashlib.sha256()
    for header in case.series.headers:
        combined.update(f"{_digest(Path(header.filename))}\n".encode())
    return combined.hexdigest()


class Segmenter:
    """The per-case work of ``napari-tae segment`` (a :class:`napari_tae.batch.CaseWork`).

    Loads the model once per process; :meth:`__call__` segments one input and writes its
    reconstruction, residual, mask, brain mask and lesion table into the case's file set.
    """

    def __init__(self, args: argparse.Namespace, loaded: tuple[Any, Any, Path | None] | None = None) -> None:
        self.args = args
        self.model, self.meta, self.checkpoint = loaded if loaded is not None else _load_model(args.checkpoint)

    def request(self, case: Case) -> dict[str, Any]:
        """Input, model and settings asked for: a complete set with the same request is skipped."""
        args = self.args
        brain = _brain_mask_file(case, args.brain_mask)
        return {
            "input_sha256": _input_digest(case),
            "dicom_series_uid": None if case.series is None else case.series.uid,
            "weights_sha256": getattr(self.meta, "sha256", "intensity"),
            "median_kernel": args.median_kernel,
            "median_mode": args.median_mode,
            "squash": args.squash,
            "score": args.score,
            "min_size": args.min_size,
            "brain_mask_sha256": None if brain is None else _digest(brain),
            "skull_strip": args.skull_strip,
            "precision": args.precision,
        }

    def __call__(self, case: Case, files: FileSet) -> dict[str, Any]:
        from napari_tae.export import provenance_record, write_lesion_csv
        from napari_tae.inference import segment
        from napari_tae.io import load_volume, save_volume

        args = self.args
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            volume = dicom.load_series(case.series) if case.series is not None else load_volume(case.source)
            brain = _brain_mask_for(_brain_mask_file(case, args.brain_mask), case, volume.geometry)
            result = segment(volume, self.model, self.meta, kernel=args.median_kernel, squash=args.squash,
                             mode=args.median_mode, min_size=args.min_size, brain=brain,
                             skull_strip=args.skull_strip, device=args.device, precision=args.precision,
                             score=args.score)
        # a warning (e.g. not skull-stripped) is about this file: say which, on one line
        for warning in caught:
            _logger.warning("%s: %s", case.source, str(warning.message).splitlines()[0])
        geometry = volume.geometry
        # the temporaries exist (created empty, private to this run): overwrite=True fills them
        save_volume(result.reconstruction, geometry, files.temporary("reconstruction"), overwrite=True)
        save_volume(result.residual, geometry, files.temporary("residual"), overwrite=True)
        save_volume(result.score, geometry, files.temporary("score"), overwrite=True)
        save_volume(result.mask, geometry, files.temporary("mask"), labels=True, overwrite=True)
        # the brain mask used, so a user can check it, correct it and pass it back with --brain-mask
        save_volume(result.brain, geometry, files.temporary("brain"), labels=True, overwrite=True)
        write_lesion_csv(result.lesions, files.temporary("lesions"))
        settings = dict(result.settings)
        settings.setdefault("device", args.device)
        settings["brain_mask_supplied"] = args.brain_mask is not None
        if case.series is not None:
            dicom.write_seg(result.mask, geometry, case.series, files.temporary("seg"), overwrite=True)
            settings["dicom_series_uid"] = case.series.uid
        return provenance_record(
            input_file=case.source, checkpoint=self.checkpoint, meta=self.meta, settings=settings,
            outputs=case.targets([*files.written, "provenance"]), n_lesions=len(result.lesions),
            lesion_volume_ml=float(sum(lesion["volume_ml"] for lesion in result.lesions)),
            command="napari-tae segment")


def _make_segmenter(args: argparse.Namespace) -> Segmenter:
    """A ``--jobs`` worker's :class:`Segmenter` (module level, so a spawned process can unpickle it)."""
    _setup_logging(args.verbose, args.quiet)
    return Segmenter(args)


def _progress(total: int, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="segment", disable=quiet, file=sys.stderr)


def _rank_device(device: str, local_rank: int, world: int) -> str:
    """This process's device: under torchrun each rank of a node takes GPU ``LOCAL_RANK``."""
    import torch

    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def _check_segment_args(args: argparse.Namespace, world: int) -> None:
    if args.brain_mask is not None and not Path(args.brain_mask).exists():
        raise CLIError(f"{args.brain_mask}: no such brain mask file or folder")
    if args.summary is not None:
        summary = Path(args.summary)
        if summary.suffix.lower() not in (".json", ".csv"):
            raise CLIError(f"{summary}: --summary must end in .json or .csv")
        if not summary.parent.is_dir():
            raise CLIError(f"{summary.parent}: the folder of --summary does not exist")
    if args.jobs > 1:
        if world > 1:
            raise CLIError("--jobs runs worker processes on one machine; under torchrun use "
                           "--nproc_per_node instead")
        from napari_tae.inference import resolve_run_options

        try:
            device = resolve_run_options(args.device, args.precision)[0].type
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        if device != "cpu":
            raise CLIError(f"--jobs is for CPU runs (the device is {device}); for several GPUs run "
                           "torchrun --nproc_per_node N -m napari_tae.cli segment ...")


def _log_result(result: CaseResult, bar: Any) -> None:
    if result.status == batch.FAILED:
        _logger.error("%s", result.error)
    elif result.error:  # skipped because another run holds it
        _logger.warning("%s; skipped", result.error)
    elif result.status == batch.SKIPPED:
        _logger.info("%s: outputs already complete; skipped (--overwrite redoes them)", result.input)
    else:
        _logger.info("%s: %d lesion(s), %.2f mL", result.input, result.lesions, result.lesion_volume_ml or 0.0)
    bar.update(1)


def cmd_segment(args: argparse.Namespace) -> int:
    """Run ``napari-tae segment``; returns the number of failed inputs (capped), 130 if interrupted."""
    rank, world, local_rank = batch.rank_info()
    out_dir = Path(args.out_dir)
    files = find_inputs(args.inputs)
    _check_segment_args(args, world)
    # the folder before the model: a folder that cannot be written fails in a second, by name
    try:
        batch.prepare_output_folder(out_dir)
    except batch.OutputFolderError as exc:
        raise CLIError(str(exc)) from None
    # planned before the model: a DICOM folder with several series and no --series stops here
    cases, results = _plan_cases(files, out_dir, args.series)
    if args.checkpoint is None:
        from napari_tae.checkpoint import default_checkpoint

        args.checkpoint = default_checkpoint()
    args.device = _rank_device(args.device, local_rank, world)
    # the model is loaded once, before any file, so a bad checkpoint (or score) fails fast
    loaded = _load_model(args.checkpoint)
    if args.score is not None:
        from napari_tae.scores import score_spec

        try:
            score_spec(loaded[1], args.score)
        except ValueError as exc:
            raise CLIError(f"{args.checkpoint}: {exc}") from None
    from napari_tae.inference import resolve_run_options

    try:  # an unusable device or precision, too, before any file
        resolve_run_options(args.device, args.precision)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if rank > 0:
        results = []  # planning failures are reported once, by rank 0
    mine = batch.shard(cases, rank, world)
    with batch.stop_on_signals(), _progress(len(mine), args.quiet or rank > 0) as bar:
        for failure in results:
            _logger.error("%s", failure.error)
        report = functools.partial(_log_result, bar=bar)
        try:
            if args.jobs > 1:
                results += batch.run_parallel(mine, functools.partial(_make_segmenter, args), args.jobs,
                                              overwrite=args.overwrite, on_result=report)
            else:
                results += batch.run_cases(mine, Segmenter(args, loaded), overwrite=args.overwrite,
                                           on_result=report)
        except batch.BatchInterrupted as stop:
            where = ", ".join(stop.cases) or "between cases"
            _logger.error("interrupted in %s; no partial files are left, finished cases are "
                          "complete; run the same command again to do the rest", where)
            return _EXIT_INTERRUPTED
        except batch.WorkerError as exc:
            raise CLIError(str(exc)) from None
    try:
        everyone = batch.gather_results(results, rank, world)
    except batch.WorkerError as exc:
        raise CLIError(str(exc)) from None
    if everyone is None:
        return 0  # rank 0 reports for all
    return _report(everyone, out_dir, args.summary)


def _report(results: list[CaseResult], out_dir: Path, summary: str | None) -> int:
    """The batch's last line (and the --summary file); returns the exit status."""
    counts = {status: [r for r in results if r.status == status] for status in (batch.DONE, batch.SKIPPED, batch.FAILED)}
    if summary is not None:
        batch.write_summary(summary, results)
    line = (f"{len(results)} input(s): {len(counts[batch.DONE])} segmented, {len(counts[batch.SKIPPED])} "
            f"skipped, {len(counts[batch.FAILED])} failed; outputs in {out_dir}")
    if counts[batch.FAILED]:
        _logger.error("%s; failed: %s", line, ", ".join(r.input for r in counts[batch.FAILED]))
    else:
        _logger.info("%s", line)
    return min(len(counts[batch.FAILED]), _MAX_EXIT)


# --------------------------------------------------------------------------------------------
# models


def bundled_summary() -> list[dict[str, Any]]:
    """Name, file, size, model, calibration and training note of every bundled checkpoint."""
    from napari_tae.checkpoint import (
        bundled_checkpoints,
        default_checkpoint,
        read_metadata,
    )

    rows = []
    default = default_checkpoint()
    for name, path in sorted(bundled_checkpoints().items()):
        meta = read_metadata(path)
        rows.append(
            {
                "name": name,
                "default": name == default,
                "file": str(path),
                "size_mb": round(Path(path).stat().st_size / 1e6, 2),
                "model": meta.model_name,
                "img_size": meta.img_size,
                "weights_sha256": meta.sha256,
                "calibration": meta.calibration,
                "training_data": (meta.training or {}).get("data", (meta.training or {}).get("dataset")),
            }
        )
    return rows


def _format_calibration(calibration: dict[str, Any]) -> str:
    if not calibration:
        return "none (squash 1%)"
    order = ["p99", "p99.5", "p99.9", "default"]
    keys = [k for k in order if k in calibration] + [k for k in calibration if k not in order]
    return ", ".join(f"{k}={float(calibration[k]):.3g}%" for k in keys)


def cmd_models(args: argparse.Namespace) -> int:
    """Run ``napari-tae models``: the zoo, then the bundled checkpoints."""
    bundled = bundled_summary()
    if args.json:
        import torch

        from napari_tae import models
        from napari_tae.export import jsonable

        zoo = {}
        for name in models.list_models():
            with torch.device("meta"):  # counts only: no memory, no initialisation
                n_params = models.count_parameters(models.build_model(name))
            zoo[name] = {"defaults": models.model_defaults(name), "parameters": n_params}

        print(json.dumps({"models": zoo, "bundled": jsonable(bundled)}, indent=2))
        return 0
    print("Models (paper default configs):")
    from napari_tae.models import format_model_table

    print(format_model_table())
    print()
    print("Bundled checkpoints (use the name with --checkpoint; 'intensity' needs none):")
    if not bundled:
        print("  none installed")
    for row in bundled:
        print(
            f"  {row['name']:<24} {row['model']:<8} img {row['img_size']:<4} "
            f"{row['size_mb']:>6.2f} MB  sha256 {row['weights_sha256']}"
            f"{'  (default)' if row['default'] else ''}"
        )
        print(f"  {'':<24} calibration (squash %): {_format_calibration(row['calibration'])}")
        if row["training_data"]:
            print(f"  {'':<24} trained on: {row['training_data']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``napari-tae demo`` from the plugin folder: the one command that needs napari and Qt."""
    from napari_tae.plugin._demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------------------------
# parser and entry point


def _median_kernel(text: str) -> int:
    try:
        return check_median_kernel(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _percentage(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be a percentage in [0, 100] (got {text})")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-tae`` parser with its ``segment``, ``models`` and ``demo`` subcommands."""
    from napari_tae import __version__

    # accepted before or after the subcommand; SUPPRESS keeps a subparser from resetting them
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_argument_group("logging").add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
        help="errors only, no progress bar",
    )
    parser = argparse.ArgumentParser(
        prog="napari-tae",
        description="Unsupervised brain-lesion segmentation in FLAIR MRI (Ghorbel et al. 2022). "
        "Research software, not a medical device.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    seg = sub.add_parser(
        "segment",
        parents=[common],
        help="segment NIfTI files, folders of them or DICOM series headlessly",
        description="For each input writes <name>_reconstruction/_residual/_score/_mask/_brain.nii.gz "
        "on the input's grid (the score is what the mask thresholds, before the median; the brain "
        "mask is the one used), <name>_lesions.csv and <name>_provenance.json; a DICOM series also gets "
        "<name>_mask.seg.dcm (DICOM SEG referencing the series), <name> being its "
        "SeriesDescription or folder name. An input's outputs are written as one set: complete or "
        "absent. Complete sets made with the same settings are skipped, those a killed run left "
        "redone. Runs unchanged under torchrun --nproc_per_node N. Exit status: number of failed "
        "inputs (capped at 125), 2 for a usage error, 130 when interrupted.",
    )
    io_group = seg.add_argument_group("input and output")
    io_group.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="NIfTI files, folders of them, or folders holding a DICOM series",
    )
    io_group.add_argument(
        "--series", metavar="UID",
        help="SeriesInstanceUID to segment in a DICOM folder holding several series "
        "(without it such a folder is refused with the list of its series)",
    )
    io_group.add_argument("-o", "--out-dir", required=True, help="output folder (created if missing)")
    io_group.add_argument(
        "--overwrite", action="store_true",
        help="redo inputs whose outputs are complete (default: skip them when made with the same "
        "input, model and settings; refuse when made with others)",
    )
    io_group.add_argument(
        "--summary", metavar="FILE", help="write one row per input (status, lesions, mL, outputs, "
        "error) to FILE, JSON or CSV by its ending",
    )
    io_group.add_argument(
        "--brain-mask",
        metavar="FILE_OR_DIR",
        help="brain mask NIfTI for every input, or a folder of masks named like the inputs "
        "(default: see --skull-strip)",
    )
    io_group.add_argument(
        "--skull-strip",
        choices=SKULL_STRIP_CHOICES,
        default="auto",
        help="brain extraction with deepbet: auto (default) only for heads that are not "
        "skull-stripped, always, or never (the non-background voxels are the brain)",
    )
    model_group = seg.add_argument_group("model")
    model_group.add_argument(
        "-m",
        "--checkpoint",
        default=None,
        metavar="FILE_OR_NAME",
        help="a .safetensors checkpoint, a bundled name (see 'napari-tae models') or 'intensity' "
        "(default: the bundled default model)",
    )
    model_group.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="default: auto"
    )
    model_group.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="the model's arithmetic: auto = bfloat16 on CUDA, float32 elsewhere; bfloat16 on the CPU "
        "is about 2x faster for the transformers where the CPU has bfloat16 instructions (AVX-512 "
        "BF16, AMX), far slower where it has not",
    )
    model_group.add_argument(
        "-j", "--jobs", type=_positive_int, default=1, metavar="N",
        help="CPU worker processes, each with cores/N torch threads (default 1)",
    )
    post = seg.add_argument_group("post-processing")
    post.add_argument("--median-kernel", type=_median_kernel, default=5, help="odd, 1 = off (default 5)")
    post.add_argument(
        "--median-mode", choices=MEDIAN_MODES, default="2d", help="per-slice or volume median (default 2d)"
    )
    post.add_argument(
        "--score",
        choices=SCORES,
        default=None,
        help="anomaly score the mask thresholds: the residual, FLAIR + w * residual ('fused') or "
        "the residual where the FLAIR is bright ('prior'); default: the checkpoint's",
    )
    post.add_argument(
        "--squash",
        type=_percentage,
        default=None,
        metavar="Q",
        help="threshold in percent of the intensity range (default: the checkpoint's calibrated "
        "value for the score and median, else a robust per-scan one)",
    )
    post.add_argument(
        "--min-size", type=_non_negative_int, default=0, metavar="N", help="drop lesions under N voxels"
    )
    seg.set_defaults(func=cmd_segment)

    models_parser = sub.add_parser("models", parents=[common], help="list models and bundled checkpoints")
    models_parser.add_argument("--json", action="store_true", help="machine-readable output")
    models_parser.set_defaults(func=cmd_models)

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="open napari with the sample volume, the widget and the default model",
    )
    demo.add_argument(
        "--screenshot",
        metavar="FILE",
        help="run the model, save a screenshot of the viewer to FILE and exit (headless use)",
    )
    demo.add_argument("--checkpoint", metavar="FILE_OR_NAME", default=None, help="default: bundled default")
    demo.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    demo.add_argument(
        "--score",
        choices=SCORES,
        default=DEMO_SCORE,
        help=f"score of the run (default: {DEMO_SCORE}, what the bundled models do best on the sample, "
        "which comes from their own training generator; real scans: the checkpoint's default)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    logger = logging.getLogger("napari_tae")
    if not any(getattr(h, "_napari_tae_cli", False) for h in logger.handlers):
        handler = _TqdmHandler()
        handler._napari_tae_cli = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("napari-tae: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    # our handler prints; the root logger must not print the same line again
    logger.propagate = False


class _TqdmHandler(logging.StreamHandler):
    """Log lines written through tqdm so they do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``napari-tae``; returns the exit status (also used in-process by tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = bool(getattr(args, "quiet", False))
    args.verbose = bool(getattr(args, "verbose", False))
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args))
    except CLIError as exc:
        _logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        _logger.error("interrupted")
        return _EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
