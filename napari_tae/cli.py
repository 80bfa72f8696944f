"""Command-line interface: batch segmentation, the model list and the one-command demo.

``napari-tae segment`` runs the same code path as the plugin (:func:`napari_tae.inference.segment`,
Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in Brain MR Images",
BrainLes 2022, https://arxiv.org/abs/2207.02059) on many NIfTI files or DICOM series and writes,
per input, the reconstruction, residual and mask on the input's grid, a lesion table and a
provenance record; for a DICOM series also a DICOM SEG of the mask referencing it.
``napari-tae models`` lists the model zoo and the bundled checkpoints; ``napari-tae demo`` opens
napari with the sample volume and the anomaly widget.

Heavy modules (torch, napari) are imported inside the subcommands so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_tae import dicom
from napari_tae._atomic import write_text_atomic
from napari_tae.io import (
    NIFTI_SUFFIXES,
    VolumeError,
    error_line,
    nifti_files,
    nifti_stem,
    same_file,
)
from napari_tae.options import DEVICE_CHOICES, MEDIAN_MODES, check_median_kernel

__all__ = [
    "OUTPUT_SUFFIXES",
    "build_parser",
    "find_inputs",
    "main",
]

_logger = logging.getLogger("napari_tae.cli")

#: Files written per input, ``<name><suffix>`` in the output folder.
OUTPUT_SUFFIXES = (
    "_reconstruction.nii.gz",
    "_residual.nii.gz",
    "_mask.nii.gz",
    "_lesions.csv",
    "_provenance.json",
)
#: Provenance ``outputs`` key of the DICOM SEG (the NIfTI mask already has "mask").
_SEG_KEY = "seg"
#: Exit statuses above 125 mean "killed by a signal" or "command not found" to a shell.
_MAX_EXIT = 125


class CLIError(Exception):
    """A user error with a one-line message (no traceback is shown)."""


# --------------------------------------------------------------------------------------------
# helpers shared by the subcommands


def find_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into the inputs: NIfTI files, and DICOM folders as themselves.

    A folder holding DICOM files is one DICOM input (its series are chosen by :func:`_plan_jobs`);
    any other folder stands for its NIfTI files (sorted, not recursive). Paths that do not exist
    are kept, so the batch reports them by name as failures instead of silently dropping them.
    A folder with neither is an error.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if dicom.is_dicom_folder(path):
            files.append(path)
        elif path.is_dir():
            found = nifti_files(path)
            if not found:
                raise CLIError(f"{path}: folder holds no NIfTI (.nii, .nii.gz) or DICOM file")
            files.extend(found)
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


@dataclass
class _Job:
    """One input (a NIfTI file, or a DICOM folder and its chosen series) and where results go."""

    source: Path
    name: str
    outputs: dict[str, Path]
    series: dicom.DicomSeries | None = None


def _choose_series(folder: Path, series_uid: str | None) -> dicom.DicomSeries:
    """The folder's series ``series_uid``, or its only series (``series_uid`` may name a series of
    another input folder); CLIError listing the series when that does not decide."""
    found = dicom.list_series(folder)
    try:
        return dicom.pick_series(found, series_uid if len(found) > 1 else None)
    except VolumeError as exc:
        # several series and no (right) choice: the command must change, so nothing runs
        raise CLIError(str(exc)) from None


def _plan_jobs(
    files: list[Path], out_dir: Path, series_uid: str | None = None
) -> tuple[list[_Job], list[tuple[Path, str]]]:
    """Output paths per input; inputs whose name repeats another's are failures, not overwrites.

    A DICOM input is named after its series' description (else its folder), and writes the SEG
    too. ``series_uid`` picks the series of the folder that holds it.
    """
    jobs: list[_Job] = []
    failed: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for source in files:
        series = None
        if dicom.is_dicom_folder(source):
            try:
                series = _choose_series(source, series_uid)
            except VolumeError as exc:
                failed.append((source, exc.problem))
                continue
            name = dicom.output_name(series)
            if name in seen:  # two studies of the same protocol: tell them by their folders
                name = f"{source.resolve().name}_{name}"
        else:
            name = nifti_stem(source)
        if name in seen:
            failed.append((source, f"same output name '{name}' as {seen[name]}; rename one"))
            continue
        seen[name] = source
        suffixes = OUTPUT_SUFFIXES if series is None else (*OUTPUT_SUFFIXES, dicom.SEG_SUFFIX)
        outputs = {suffix: out_dir / f"{name}{suffix}" for suffix in suffixes}
        jobs.append(_Job(source=source, name=name, outputs=outputs, series=series))
    if series_uid is not None and not any(j.series and j.series.uid == series_uid for j in jobs):
        raise CLIError(f"--series {series_uid}: no input DICOM folder holds this series")
    return jobs, failed


def _check_outputs(job: _Job, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before computing anything, outputs that exist or that are one of the inputs."""
    for out in job.outputs.values():
        if any(same_file(out, src) for src in inputs):
            raise CLIError(f"{job.source}: output {out} is one of the inputs; choose another --out-dir")
    existing = [out.name for out in job.outputs.values() if out.exists()]
    if existing and not overwrite:
        raise CLIError(
            f"{job.source}: outputs exist in the output folder ({', '.join(existing)}); "
            "pass --overwrite to replace them"
        )


def _brain_mask_for(job: _Job, brain_arg: str | None, geometry: Any) -> Any:
    """The supplied brain mask for this input (a file, or a folder of masks named like the inputs)."""
    if brain_arg is None:
        return None
    from napari_tae.io import load_volume

    path = Path(brain_arg)
    if path.is_dir():
        candidates = [path / f"{job.name}{suffix}" for suffix in NIFTI_SUFFIXES]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CLIError(f"{job.source}: no brain mask {job.name}.nii[.gz] in {path}")
        path = found[0]
    mask = load_volume(path)
    if mask.data.shape != geometry.shape:
        raise CLIError(
            f"{path}: brain mask shape {mask.data.shape} doesn't match the volume "
            f"{geometry.shape} of {job.source}"
        )
    # same shape is not enough: a mask of another scan or orientation would land off the brain
    if not np.allclose(mask.geometry.ras_affine, geometry.ras_affine, atol=1e-3):
        raise CLIError(f"{path}: brain mask is on another grid (affine) than {job.source}")
    return mask.data > 0


def _segment_one(job: _Job, args: argparse.Namespace, model: Any, meta: Any, ckpt: Path | None) -> int:
    """Segment one file and write its five outputs; returns the number of lesions."""
    from napari_tae.inference import segment
    from napari_tae.io import load_volume, save_volume
    from napari_tae.export import provenance_record, write_lesion_csv

    volume = dicom.load_series(job.series) if job.series else load_volume(job.source)
    brain = _brain_mask_for(job, args.brain_mask, volume.geometry)
    result = segment(
        volume,
        model,
        meta,
        kernel=args.median_kernel,
        squash=args.squash,
        mode=args.median_mode,
        min_size=args.min_size,
        brain=brain,
        device=args.device,
    )
    geometry = volume.geometry
    out = job.outputs
    save_volume(result.reconstruction, geometry, out["_reconstruction.nii.gz"], overwrite=args.overwrite)
    save_volume(result.residual, geometry, out["_residual.nii.gz"], overwrite=args.overwrite)
    save_volume(result.mask, geometry, out["_mask.nii.gz"], labels=True, overwrite=args.overwrite)
    write_lesion_csv(result.lesions, out["_lesions.csv"])
    if job.series is not None:
        dicom.write_seg(result.mask, geometry, job.series, out[dicom.SEG_SUFFIX],
                        overwrite=args.overwrite)
    settings = dict(result.settings)
    settings.setdefault("device", args.device)
    settings["brain_mask_supplied"] = args.brain_mask is not None
    if job.series is not None:
        settings["dicom_series_uid"] = job.series.uid
    outputs = {_SEG_KEY if suffix == dicom.SEG_SUFFIX else suffix.strip("_").split(".")[0]: path
               for suffix, path in out.items()}
    record = provenance_record(input_file=job.source, checkpoint=ckpt, meta=meta, settings=settings,
                               outputs=outputs, n_lesions=len(result.lesions),
                               command="napari-tae segment")
    # provenance last: its presence says the other files are complete
    write_text_atomic(out["_provenance.json"], json.dumps(record, indent=2) + "\n")
    return len(result.lesions)


def _progress(total: int, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="segment", disable=quiet, file=sys.stderr)


def cmd_segment(args: argparse.Namespace) -> int:
    """Run ``napari-tae segment``; returns the number of failed inputs (capped)."""
    out_dir = Path(args.out_dir)
    files = find_inputs(args.inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"{out_dir}: --out-dir exists and is not a folder")
    if args.brain_mask is not None and not Path(args.brain_mask).exists():
        raise CLIError(f"{args.brain_mask}: no such brain mask file or folder")
    # planned first: a DICOM folder with several series and no --series stops here
    jobs, failures = _plan_jobs(files, out_dir, args.series)
    # the model is loaded once, before any file, so a bad checkpoint fails fast
    model, meta, ckpt = _load_model(args.checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    for source, problem in failures:
        _logger.error("%s: %s", source, problem)
    n_ok = 0
    with _progress(len(jobs), args.quiet) as bar:
        for job in jobs:
            bar.set_postfix_str(job.source.name, refresh=False)
            try:
                _check_outputs(job, files, args.overwrite)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    n_lesions = _segment_one(job, args, model, meta, ckpt)
                # a warning (e.g. not skull-stripped) is about this file: say which, on one line
                for warning in caught:
                    _logger.warning("%s: %s", job.source, str(warning.message).splitlines()[0])
            except (CLIError, ValueError, OSError, RuntimeError) as exc:
                # one bad file is reported by name on one line and skipped; the rest go on
                message = error_line(exc, job.source)
                failures.append((job.source, message))
                _logger.error("%s", message)
            else:
                n_ok += 1
                _logger.info("%s: %d lesion(s) -> %s", job.source, n_lesions, out_dir)
            bar.update(1)
    n_failed = len(failures)
    summary = f"{n_ok} of {len(files)} file(s) segmented into {out_dir}"
    if n_failed:
        _logger.error("%s; %d failed: %s", summary, n_failed, ", ".join(str(s) for s, _ in failures))
    else:
        _logger.info("%s", summary)
    return min(n_failed, _MAX_EXIT)


# --------------------------------------------------------------------------------------------
# models


def bundled_summary() -> list[dict[str, Any]]:
    """Name, file, size, model, calibration and training note of every bundled checkpoint."""
    from napari_tae.checkpoint import bundled_checkpoints, default_checkpoint, read_metadata

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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
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
        description="For each input writes <name>_reconstruction/_residual/_mask.nii.gz on the "
        "input's grid, <name>_lesions.csv and <name>_provenance.json; a DICOM series also gets "
        "<name>_mask.seg.dcm (DICOM SEG referencing the series), <name> being its "
        "SeriesDescription or folder name. Exit status: number of failed inputs (capped at 125).",
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
    io_group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    io_group.add_argument(
        "--brain-mask",
        metavar="FILE_OR_DIR",
        help="brain mask NIfTI for every input, or a folder of masks named like the inputs "
        "(default: voxels differing from the background value)",
    )
    model_group = seg.add_argument_group("model")
    model_group.add_argument(
        "-m",
        "--checkpoint",
        required=True,
        metavar="FILE_OR_NAME",
        help="a .safetensors checkpoint, a bundled name (see 'napari-tae models') or 'intensity'",
    )
    model_group.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto"
    )
    post = seg.add_argument_group("post-processing")
    post.add_argument("--median-kernel", type=_median_kernel, default=5, help="odd, 1 = off (default 5)")
    post.add_argument(
        "--median-mode", choices=MEDIAN_MODES, default="2d", help="per-slice or volume median (default 2d)"
    )
    post.add_argument(
        "--squash",
        type=_non_negative_float,
        default=None,
        metavar="Q",
        help="threshold in percent of the intensity range (default: the checkpoint's calibrated "
        "value, 1 without one)",
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
