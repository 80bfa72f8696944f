"""Writing results: output names, lesion CSV, the provenance record shared by the CLI and the plugin.

No napari, no Qt: the CLI writes through these functions and the plugin's export calls them too,
so both record the same provenance schema.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_tae._atomic import atomic_path
from napari_tae.scores import threshold_percentile

__all__ = [
    "OUTPUT_KINDS",
    "ExportError",
    "describe_files",
    "export_paths",
    "file_sha256",
    "jsonable",
    "mask_settings",
    "provenance_record",
    "write_lesion_csv",
]


class ExportError(ValueError):
    """An export that would overwrite a file or the input volume."""


#: Every kind of file napari-tae writes for one input, ``<name><suffix>``: the one table the CLI,
#: the plugin's export and the input scan (which skips these files) read. The provenance record
#: is written last and lists the others with their hashes (see ``docs/batch.md``).
OUTPUT_KINDS = {
    "reconstruction": "_reconstruction.nii.gz",
    "residual": "_residual.nii.gz",
    "score": "_score.nii.gz",  # what the mask thresholds, before the median (napari_tae.scores)
    "mask": "_mask.nii.gz",
    "brain": "_brain.nii.gz",  # the brain mask used (supplied, deepbet's or the non-background)
    "lesions": "_lesions.csv",
    "seg": "_mask.seg.dcm",  # DICOM inputs only: the mask as a DICOM SEG referencing the series
    "provenance": "_provenance.json",
}
#: What the plugin's export writes (the reconstruction stays in the viewer).
PLUGIN_EXPORT_KINDS = ("mask", "residual", "lesions", "provenance")


def export_paths(folder: str | os.PathLike, base: str,
                 kinds: tuple[str, ...] = PLUGIN_EXPORT_KINDS) -> dict[str, Path]:
    """The files an export writes: ``<folder>/<base><suffix>`` for each kind of :data:`OUTPUT_KINDS`."""
    base = base.strip()
    if not base or os.sep in base or (os.altsep and os.altsep in base):
        raise ExportError(f"{base!r}: the base name must be a plain file name prefix")
    return {k: Path(folder) / f"{base}{OUTPUT_KINDS[k]}" for k in kinds}


def describe_files(written: dict[str, str | os.PathLike],
                   targets: dict[str, str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """``{kind: {"file", "bytes", "sha256"}}`` of files written (maybe under temporary names).

    ``file`` is the final name (``targets``); the provenance record carries this listing so a set
    can be checked complete and unmixed.
    """
    return {
        kind: {"file": Path(targets[kind]).name, "bytes": os.path.getsize(path),
               "sha256": file_sha256(path)}
        for kind, path in written.items()
    }


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 of a file (the checkpoint's own bytes, for the provenance record)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    """Plain strict-JSON values: numpy scalars/arrays, paths and tuples converted, nan/inf as
    None (strict JSON readers reject NaN), anything else as its str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def mask_settings(meta: Any, spec: Any, *, kernel: int, mode: str, squash: float, squash_source: str,
                  min_size: int) -> dict[str, Any]:
    """The provenance of a mask made from a reconstruction (score, median, threshold and where it
    came from), shared by :func:`napari_tae.inference.segment` and the widget's export; see
    :attr:`napari_tae.inference.Reconstruction.settings` for the reconstruction's part."""
    return {
        "median_kernel": int(kernel),
        "median_mode": mode,
        "squash": float(squash),
        "squash_source": squash_source,
        "score": spec.name,
        "score_params": spec.to_dict(),
        # which healthy-brain percentile a calibrated squash is (docs/scores.md)
        "squash_percentile": threshold_percentile(meta, spec.name) if squash_source == "calibrated" else None,
        "calibration": dict(getattr(meta, "calibration", None) or {}),
        "min_size": int(min_size),
        "connectivity": 26,
    }


def provenance_record(
    *,
    input_file: str | os.PathLike | None,
    checkpoint: str | os.PathLike | None,
    meta: Any,
    settings: dict[str, Any],
    outputs: dict[str, str | os.PathLike],
    n_lesions: int,
    command: str,
    lesion_volume_ml: float | None = None,
    files: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The one provenance schema, for the CLI's and the plugin's outputs alike.

    Input file and its sha256, the model (checkpoint path, file and weights hashes, config,
    calibration, preprocessing, training summary), every setting, the outputs (and, with
    ``files`` from :func:`describe_files`, their sizes and hashes), version and date.
    """
    from napari_tae import __version__
    from napari_tae.checkpoint import CheckpointError, resolve_checkpoint

    model: dict[str, Any] = {"name": "intensity", "checkpoint": None}
    if meta is not None:
        try:
            path = resolve_checkpoint(checkpoint) if checkpoint else None
        except CheckpointError:  # the file went away since it was loaded: record its name only
            path = None
        model = {
            "name": meta.model_name,
            "checkpoint": str(path.resolve()) if path else checkpoint,
            "checkpoint_file_sha256": file_sha256(path) if path else None,
            "weights_sha256": meta.sha256,
            "img_size": meta.img_size,
            "config": meta.config,
            "calibration": meta.calibration,
            "preprocessing": meta.preprocessing,
            "training": meta.training,
        }
    source = Path(input_file) if input_file and os.path.isfile(input_file) else None
    return jsonable({
        "input": str(source.resolve()) if source else input_file,
        "input_sha256": file_sha256(source) if source else None,
        "model": model,
        "settings": settings,
        "lesions": n_lesions,
        "lesion_volume_ml": lesion_volume_ml,
        "outputs": {k: str(Path(p).resolve()) for k, p in outputs.items()},
        "files": files,
        "software": {"napari_tae": __version__, "command": command},
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    })


def write_lesion_csv(lesions: list[dict], path: str | os.PathLike) -> Path:
    """Lesion table as CSV; (z, y, x) tuples become ``<name>_z``, ``_y``, ``_x`` columns."""
    rows = []
    for lesion in lesions:
        row = {}
        for key, value in lesion.items():
            if isinstance(value, (tuple, list)):
                axes = "zyx" if len(value) == 3 else "yx"[-len(value):]
                row.update({f"{key}_{a}": v for a, v in zip(axes, value)})
            else:
                row[key] = value
        rows.append(row)
    columns = list(rows[0]) if rows else ["label", "voxels", "volume_ml", "max_residual",
                                         "mean_residual"]

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
