"""Review logic behind the napari widget: cached results, live post-processing, edits, export.

Everything here is plain numpy (no napari, no Qt) so that it can be tested without a viewer; the
widget in :mod:`napari_tae.plugin._widget` only wires it to layers, sliders and workers.

Post-processing follows Ghorbel et al., "Transformer based Models for Unsupervised Anomaly
Segmentation in Brain MR Images", BrainLes 2022: median filter of the residual, then a squash
threshold, then connected components (see :mod:`napari_tae.postprocess`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_tae._atomic import FileSet
from napari_tae.batch import Case, CaseLock, CaseLocked
from napari_tae.dicom import write_seg
from napari_tae.export import (
    PLUGIN_EXPORT_KINDS,
    ExportError,
    describe_files,
    export_paths,
    mask_settings,
    provenance_record,
    write_lesion_csv,
)
from napari_tae.io import same_file
from napari_tae.postprocess import (
    anomaly_mask,
    label_lesions,
    lesion_table,
    ml_to_voxels,
    slice_mask,
)
from napari_tae.scores import label_free_squash, score_spec

__all__ = [
    "EditRecord",
    "Generation",
    "MaskResult",
    "PostSettings",
    "ReviewState",
    "compute_mask",
    "export_results",
    "lesion_features",
    "lesion_rows",
    "plugin_settings",
]


class Generation:
    """Monotonic counter tagging asynchronous work so that stale results can be dropped.

    ``tag = gen.next()`` when work starts; when it finishes, ``gen.is_current(tag)`` says whether
    nothing newer was started (or the work was invalidated) in the meantime.
    """

    def __init__(self) -> None:
        self._value = 0

    def next(self) -> int:
        self._value += 1
        return self._value

    def invalidate(self) -> None:
        """Make every outstanding tag stale (e.g. the result's layer was removed)."""
        self._value += 1

    def is_current(self, tag: int) -> bool:
        return tag == self._value


@dataclass(frozen=True)
class PostSettings:
    """The live post-processing settings (the widget's sliders)."""

    kernel: int = 5            # odd median width, 1 = off
    squash: float = 1.0        # percent of the [0, 1] intensity range
    mode: str = "2d"           # median window: per slice or 3D
    min_size: float = 0.0      # smallest lesion kept, in ``min_size_unit``
    min_size_unit: str = "voxels"  # "voxels" or "mL"
    score: str = "residual"    # what the mask thresholds (napari_tae.scores)

    def min_voxels(self, spacing: tuple[float, ...]) -> int:
        if self.min_size <= 0:
            return 0
        if self.min_size_unit == "mL":
            return ml_to_voxels(self.min_size, spacing)
        return int(round(self.min_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EditRecord:
    """Voxels the user painted or erased on the mask layer, relative to what the plugin wrote.

    Edits are found by comparing the layer's data (as a mask: label values do not matter) with
    the last mask written into it, which catches every way of editing (brush, fill, eraser,
    napari's undo, the console). A recomputed automatic mask is merged as
    ``(auto | added) & ~erased``, so a slider change never undoes a manual edit.

    An edit that takes back an earlier one (erasing painted voxels, painting erased ones back,
    napari's undo of either) returns those voxels to the automatic mask instead of recording a
    new edit, so undo really undoes (see ``docs/review.md``).
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.added: np.ndarray | None = None    # allocated on the first edit
        self.erased: np.ndarray | None = None
        self.version = 0                        # bumped on every recorded change

    @property
    def n_added(self) -> int:
        return 0 if self.added is None else int(self.added.sum())

    @property
    def n_erased(self) -> int:
        return 0 if self.erased is None else int(self.erased.sum())

    @property
    def any(self) -> bool:
        return self.n_added + self.n_erased > 0

    def record(self, current: np.ndarray, written: np.ndarray, index: int | None = None) -> int:
        """Remember voxels where ``current`` (layer data) differs from ``written`` as a mask.

        Args:
            current: The mask layer's data (labels, 0 = background).
            written: What the plugin last wrote into the layer (labels or bool).
            index: Compare only this axial slice (cheap check before a slice preview).

        Returns:
            Number of differing voxels found.
        """
        cur = np.asarray(current if index is None else current[index]) != 0
        old = np.asarray(written if index is None else written[index])
        old = old if old.dtype == bool else old != 0  # the widget keeps ``written`` as bool
        diff = cur != old
        n = int(np.count_nonzero(diff))
        if n == 0:
            return 0
        if self.added is None:
            self.added = np.zeros(self.shape, dtype=bool)
            self.erased = np.zeros(self.shape, dtype=bool)
        added = self.added if index is None else self.added[index]
        erased = self.erased if index is None else self.erased[index]
        painted = diff & cur
        removed = diff & old
        # taking back an earlier edit returns the voxel to the automatic mask
        new_erased = removed & ~added
        new_added = painted & ~erased
        added[removed] = False
        erased[painted] = False
        erased |= new_erased
        added |= new_added
        self.version += 1
        return n

    def apply(self, auto: np.ndarray, index: int | None = None) -> np.ndarray:
        """Automatic mask (volume, or slice ``index``) with the manual edits laid over it."""
        merged = np.array(auto, dtype=bool, copy=True)
        if self.added is None:
            return merged
        added = self.added if index is None else self.added[index]
        erased = self.erased if index is None else self.erased[index]
        merged |= added
        merged &= ~erased
        return merged

    def snapshot(self) -> tuple[np.ndarray | None, np.ndarray | None, int]:
        """Copies for a background worker (the GUI thread may record more edits meanwhile)."""
        if self.added is None:
            return None, None, self.version
        return self.added.copy(), self.erased.copy(), self.version


@dataclass
class MaskResult:
    """A whole-volume post-processing result, ready to be written into the mask layer."""

    post: PostSettings
    auto: np.ndarray           # bool, the automatic mask without manual edits
    merged: np.ndarray         # bool, ``auto`` with the manual edits (never modified later)
    labels: np.ndarray         # int32 components of the merged mask, 1 = largest
    lesions: list[dict]        # napari_tae.postprocess.lesion_table of the merged mask
    edit_version: int          # EditRecord.version the merge used


def compute_mask(
    residual: np.ndarray,
    post: PostSettings,
    *,
    spacing: tuple[float, ...],
    origin: tuple[float, ...],
    brain: np.ndarray | None = None,
    edits: tuple[np.ndarray | None, np.ndarray | None, int] = (None, None, 0),
    auto: np.ndarray | None = None,
    score: np.ndarray | None = None,
) -> MaskResult:
    """Whole-volume mask, components and lesion table (runs in a background worker).

    Args:
        residual: Cached residual (Z, Y, X); the lesion table's statistics.
        score: What the mask thresholds (:meth:`ReviewState.score`); None = the residual.
        post: Post-processing settings.
        spacing, origin: Voxel size and origin in mm (napari order), for mL and centroids.
        brain: Brain mask; nothing outside it is anomalous.
        edits: :meth:`EditRecord.snapshot` to lay over the automatic mask.
        auto: Reuse an already computed automatic mask (only the merge is redone).
    """
    if auto is None:
        auto = anomaly_mask(
            residual if score is None else score, kernel=post.kernel, squash=post.squash, mode=post.mode,
            min_size=post.min_voxels(spacing), brain=brain,
        )
    added, erased, version = edits
    merged = auto
    if added is not None:
        merged = (auto | added) & ~erased
    labels, _ = label_lesions(merged)
    lesions = lesion_table(merged, residual, spacing, origin, labels=labels)  # labelled once
    return MaskResult(post=post, auto=auto, merged=merged, labels=labels, lesions=lesions,
                      edit_version=version)


@dataclass
class ReviewState:
    """Everything kept for one input layer's result: the residual cache and the mask's history.

    ``written`` is a private copy of the array last written into the mask layer; the layer's own
    data may be painted on by the user, and the difference between the two is the edit record.
    """

    source_name: str
    residual: np.ndarray
    brain: np.ndarray | None
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    geometry: Any = None                 # napari_tae.io.Geometry, or None for plain arrays
    checkpoint: str = "intensity"        # path, bundled name or "intensity"
    meta: Any = None                     # napari_tae.checkpoint.CheckpointMeta or None
    post: PostSettings = field(default_factory=PostSettings)
    written: np.ndarray | None = None
    lesions: list[dict] = field(default_factory=list)
    layers: dict[str, Any] = field(default_factory=dict)  # viewer layers showing it, by kind
    edits: EditRecord = field(init=False)
    generation: Generation = field(default_factory=Generation)  # post-processing results
    normalised: np.ndarray | None = None  # the normalised input, for the fused and prior scores
    run_settings: dict = field(default_factory=dict)  # inference.Reconstruction.settings
    _scores: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.edits = EditRecord(self.residual.shape)

    def score(self, name: str) -> np.ndarray:
        """The score ``name`` with this result's checkpoint parameters (cached; raises ValueError
        for a score the checkpoint does not offer)."""
        if name not in self._scores:
            spec = score_spec(self.meta, name)
            if spec.name == "residual":
                self._scores[name] = self.residual
            elif self.normalised is None:
                raise ValueError(f"the {name!r} score needs the normalised input, not kept for this result")
            else:
                self._scores[name] = spec.compute(self.normalised, self.residual, self.brain)
        return self._scores[name]

    def label_free_squash(self, post: PostSettings) -> tuple[float, str]:
        """The calibrated squash for the score and median of ``post``, else a per-scan one."""
        values = self.score(post.score)
        brain = self.brain if self.brain is not None else np.ones(values.shape, bool)
        return label_free_squash(self.meta, post.score, post.kernel, post.mode, values, brain)

    def record_edits(self, layer_data: np.ndarray, index: int | None = None) -> int:
        if self.written is None or np.shape(layer_data) != self.written.shape:
            return 0
        n = self.edits.record(layer_data, self.written, index)
        if n:  # recorded once: reverting edits (undo) must not be counted again next time
            if index is None:
                self.written = np.asarray(layer_data) != 0
            else:
                self.written[index] = np.asarray(layer_data[index]) != 0
        return n

    def compute(self, post: PostSettings) -> MaskResult:
        """Synchronous whole-volume update (background workers call :func:`compute_mask`)."""
        return compute_mask(
            self.residual, post, spacing=self.spacing, origin=self.origin, brain=self.brain,
            edits=self.edits.snapshot(), score=self.score(post.score),
        )

    def finish(self, result: MaskResult) -> MaskResult:
        """Redo the cheap merge if the user edited the mask while ``result`` was computed."""
        if result.edit_version == self.edits.version:
            return result
        return compute_mask(
            self.residual, result.post, spacing=self.spacing, origin=self.origin,
            brain=self.brain, edits=self.edits.snapshot(), auto=result.auto,
        )

    def accept(self, result: MaskResult) -> np.ndarray:
        """Adopt a finished result; returns the array to write into the mask layer."""
        self.post = result.post
        self.lesions = result.lesions
        # the layer gets ``labels`` (painted on in place); the slice previews update ``written``
        self.written = result.merged.copy()
        return result.labels

    def preview_slice(self, index: int, post: PostSettings,
                      current: np.ndarray | None = None) -> np.ndarray:
        """Instant mask of one axial slice (no ``min_size``: that needs the whole volume).

        Voxels that stay in the mask keep their label in ``current`` (the layer's slice) so that
        lesion ids do not flicker; new ones get label 1 until the whole-volume pass relabels them.
        """
        auto = slice_mask(
            self.score(post.score), kernel=post.kernel, squash=post.squash, mode=post.mode, index=index,
            brain=self.brain,
        )
        merged = self.edits.apply(auto, index)
        old = np.zeros(merged.shape, np.int32) if current is None else np.asarray(current)
        out = np.where(merged, np.where(old > 0, old, 1), 0).astype(np.int32)
        if self.written is not None:
            self.written[index] = merged
        return out

    def current_lesions(self, layer_data: np.ndarray) -> list[dict]:
        """Lesion table of the mask as it is now in the layer (manual edits included)."""
        return lesion_table(np.asarray(layer_data) > 0, self.residual, self.spacing, self.origin)


def lesion_rows(lesions: list[dict]) -> list[tuple[str, ...]]:
    """Table cells: id, volume (mL), voxels, max and mean residual, centroid voxel (z, y, x)."""
    return [
        (str(les["label"]), f"{les['volume_ml']:.3f}", str(les["voxels"]),
         f"{les['max_residual']:.3f}", f"{les['mean_residual']:.3f}",
         ", ".join(f"{c:.0f}" for c in les["centroid_voxel"]))
        for les in lesions
    ]


def lesion_features(lesions: list[dict]) -> dict[str, np.ndarray]:
    """``Labels.features`` table: an ``index`` column of label ids, row 0 the background."""
    features = {"index": np.array([0] + [les["label"] for les in lesions], dtype=np.int64)}
    for col in ("volume_ml", "voxels", "max_residual", "mean_residual"):
        features[col] = np.array([0.0] + [float(les[col]) for les in lesions])
    return features


def plugin_settings(state: ReviewState) -> dict[str, Any]:
    """The provenance settings of :func:`napari_tae.inference.segment` (the same two records:
    the reconstruction's and :func:`napari_tae.export.mask_settings`), plus what only the widget
    has (manual edits, the requested minimum size, the input layer)."""
    post = state.post
    calibrated, source = state.label_free_squash(post)
    # a slider left at the label-free value keeps its source; anything else the user chose
    squash_source = source if math.isclose(post.squash, calibrated, rel_tol=1e-6, abs_tol=1e-9) else "user"
    return {
        **state.run_settings,
        **mask_settings(state.meta, score_spec(state.meta, post.score), kernel=post.kernel, mode=post.mode,
                        squash=post.squash, squash_source=squash_source,
                        min_size=post.min_voxels(state.spacing)),
        "min_size_requested": {"value": post.min_size, "unit": post.min_size_unit},
        "input_layer": state.source_name,
        "manual_edits": {"voxels_added": state.edits.n_added, "voxels_erased": state.edits.n_erased},
        "spacing_mm": list(state.spacing),
        "origin_mm": list(state.origin),
    }


def export_results(
    folder: str | os.PathLike,
    base: str,
    *,
    mask: np.ndarray,
    state: ReviewState,
    input_file: str | None = None,
    overwrite: bool = False,
    extra: dict | None = None,
    dicom_series: Any = None,
) -> dict[str, Path]:
    """Write mask + residual NIfTI (source grid and header), lesion CSV and provenance JSON.

    Args:
        folder: Existing output folder.
        base: File name prefix.
        mask: The mask layer's data (manual edits included); saved as 0/1.
        state: The result being reviewed (residual, geometry, settings).
        input_file: The source volume, never written over.
        overwrite: Replace existing files (the widget asks the user first).
        dicom_series: The :class:`~napari_tae.dicom.DicomSeries` the input was read from; the
            mask is then also written as a DICOM SEG referencing it (``seg``).

    Returns:
        The written paths by kind (``mask``, ``residual``, ``lesions``, ``provenance``, ``seg``).

    Raises:
        ExportError: The folder is missing, a target is the input file, or a target exists and
            ``overwrite`` is False. Checked for all files before anything is written.
    """
    from napari_tae.io import save_volume

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: export folder does not exist")
    kinds = PLUGIN_EXPORT_KINDS if dicom_series is None else (*PLUGIN_EXPORT_KINDS, "seg")
    paths = export_paths(folder, base, kinds)
    sources = [p for p in (input_file, getattr(state.geometry, "source_path", None)) if p]
    for p in paths.values():
        for src in sources:
            if same_file(p, src):
                raise ExportError(f"{p}: refusing to write over the input volume")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]}: file exists (export refuses to overwrite)")

    binary = (np.asarray(mask) > 0).astype(np.uint8)
    lesions = state.current_lesions(binary)
    kw = {"geometry": state.geometry, "scale": state.spacing, "translate": state.origin, "overwrite": True}
    settings = {**plugin_settings(state), **(extra or {})}
    # the same commit as the CLI's: temporaries put in place together, provenance last, under the
    # lock a batch into the same folder would take (docs/batch.md)
    try:
        with CaseLock(Case(source=Path(input_file or base), name=base.strip(), folder=folder)), \
                FileSet(paths) as files:
            save_volume(binary, path=files.temporary("mask"), labels=True, **kw)
            save_volume(state.residual, path=files.temporary("residual"), **kw)
            write_lesion_csv(lesions, files.temporary("lesions"))
            if dicom_series is not None:
                write_seg(binary, state.geometry, dicom_series, files.temporary("seg"), overwrite=True)
                settings["dicom_series_uid"] = dicom_series.uid
            record = provenance_record(
                input_file=input_file, checkpoint=state.checkpoint, meta=state.meta, settings=settings,
                outputs=paths, n_lesions=len(lesions),
                lesion_volume_ml=float(sum(les["volume_ml"] for les in lesions)),
                files=describe_files(files.written, paths), command="napari plugin export")
            files.temporary("provenance").write_text(json.dumps(record, indent=2), encoding="utf-8")
            files.commit(last="provenance")
    except CaseLocked as exc:
        raise ExportError(f"{paths['provenance']}: {exc}") from None
    return paths
