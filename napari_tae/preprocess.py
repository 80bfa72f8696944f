"""Preprocessing shared by the plugin, the CLI and training (evaluation protocol, steps 2-4).

Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in Brain MR
Images", BrainLes 2022, train on skull-stripped axial FLAIR slices scaled to [0, 1] and resized
to the model size. :func:`prepare_volume` is the one code path that does this, so the plugin,
the CLI and training see identical model inputs: optional N4 bias-field correction inside the
brain, normalisation, then each axial slice onto the model grid at the checkpoint's millimetres
per pixel (:class:`PhysicalSliceGrid`; older checkpoints: :class:`SliceGrid`). The choices and
their measurements are in ``docs/preprocessing.md``. numpy/scipy (SimpleITK for N4, imported
when used): no napari, no torch.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "DEFAULT_FIELD_MM",
    "NormParams",
    "NotSkullStrippedWarning",
    "PhysicalSliceGrid",
    "PreparedVolume",
    "PreprocessOptions",
    "SliceGrid",
    "bias_correct",
    "brain_mask",
    "fit_normalisation",
    "normalise",
    "prepare_volume",
    "slice_grid",
]

_logger = logging.getLogger(__name__)

#: Field of view of the model input in mm when training picks the pixel size: an adult brain
#: (at most ~170 mm front to back) and a margin fit in it.
DEFAULT_FIELD_MM = 192.0

#: A skull-stripped brain is roughly an ellipsoid inside its box (pi/6 ~ 52% of it); a larger
#: fraction means the head, neck or a full field of view is still there.
MAX_BRAIN_FRACTION = 0.6


class NotSkullStrippedWarning(UserWarning):
    """The volume looks like it still contains skull/scalp: the brain mask will be too large."""


def _corners(data: np.ndarray) -> np.ndarray:
    """Values of the volume's 2**ndim corner voxels."""
    index = np.array(np.meshgrid(*[[0, n - 1] for n in data.shape], indexing="ij"))
    return data[tuple(index.reshape(data.ndim, -1))]


def brain_mask(data: np.ndarray, supplied: np.ndarray | None = None) -> np.ndarray:
    """Boolean brain mask: ``supplied != 0``, else voxels differing from the corners' background.

    The background is the constant that fills the volume's corners: 0 for most skull-stripped
    data, a non-zero value for z-scored data (e.g. BraTS 2015). Warns with
    :class:`NotSkullStrippedWarning` when the corners are not one constant (noise around a head)
    or the "brain" fills most of the box; the mask then keeps voxels brighter than every corner.

    Raises
    ------
    ValueError
        On a shape mismatch with ``supplied`` or an empty mask.
    """
    data = np.asarray(data)
    if supplied is not None:
        supplied = np.asarray(supplied)
        if supplied.shape != data.shape:
            raise ValueError(
                f"Brain mask shape {supplied.shape} doesn't match the volume {data.shape}."
            )
        mask = supplied != 0
    else:
        corners = _corners(data).astype(np.float64)
        span = float(data.max()) - float(data.min())
        tol = 1e-6 * span if span > 0 else 0.0
        if np.ptp(corners) <= tol:
            mask = np.abs(data - corners[0]) > tol
            fraction = np.count_nonzero(mask) / mask.size
            if fraction > MAX_BRAIN_FRACTION:
                warnings.warn(
                    f"The non-background region fills {fraction:.0%} of the volume; the input "
                    "looks not skull-stripped. Supply a brain mask for reliable results.",
                    NotSkullStrippedWarning,
                    stacklevel=2,
                )
        else:
            warnings.warn(
                "The volume's corners are not one constant background value; the input looks "
                "not skull-stripped. Supply a brain mask for reliable results.",
                NotSkullStrippedWarning,
                stacklevel=2,
            )
            mask = data > corners.max()
    if not mask.any():
        raise ValueError("The brain mask is empty.")
    return mask


@dataclass(frozen=True)
class NormParams:
    """Intensity window mapped to [0, 1]: ``(x - low) / (high - low)``, clipped.

    ``upper_percentile``/``lower_percentile`` record how ``high``/``low`` were fitted.
    """

    low: float
    high: float
    upper_percentile: float = 99.5
    lower_percentile: float = 0.5

    def to_dict(self) -> dict[str, float]:
        """Plain dict for JSON / checkpoint metadata."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormParams:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones raise ValueError."""
        missing = [k for k in ("low", "high") if k not in d]
        if missing:
            raise ValueError(f"Normalisation parameters miss {missing} (got {sorted(d)}).")
        return cls(
            low=float(d["low"]),
            high=float(d["high"]),
            upper_percentile=float(d.get("upper_percentile", 99.5)),
            lower_percentile=float(d.get("lower_percentile", 0.5)),
        )


def fit_normalisation(
    data: np.ndarray,
    mask: np.ndarray,
    upper_percentile: float = 99.5,
    lower_percentile: float = 0.5,
) -> NormParams:
    """Robust window inside the brain, from the lower to the upper percentile of its voxels.

    Clipping the top 0.5% keeps a few very bright voxels (vessels, artefacts, large lesions)
    from squashing the rest of the brain towards 0; clipping the bottom 0.5% drops the negative
    undershoot that registration/resampling leaves at tissue edges. ``lower_percentile=0`` gives
    the plain brain minimum.
    """
    if not 0 <= lower_percentile < upper_percentile <= 100:
        raise ValueError(
            "Percentiles must satisfy 0 <= lower < upper <= 100 "
            f"(got {lower_percentile}, {upper_percentile})."
        )
    values = np.asarray(data)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        raise ValueError("Cannot fit normalisation on an empty brain mask.")
    low, high = (float(q) for q in np.percentile(values, [lower_percentile, upper_percentile]))
    if not high > low:  # a spike-dominated histogram: fall back to the full range
        low, high = float(values.min()), float(values.max())
    if not high > low:
        raise ValueError(f"Brain intensities are constant ({low:g}); cannot normalise.")
    return NormParams(low, high, float(upper_percentile), float(lower_percentile))


def normalise(data: np.ndarray, mask: np.ndarray, params: NormParams) -> np.ndarray:
    """float32 volume in [0, 1] inside ``mask``, 0 outside."""
    scale = 1.0 / (params.high - params.low)
    out = (np.asarray(data, dtype=np.float32) - np.float32(params.low)) * np.float32(scale)
    np.clip(out, 0.0, 1.0, out=out)
    out[~np.asarray(mask, dtype=bool)] = 0.0
    return out


def _check_stack(stack: np.ndarray, expected: tuple[int, int]) -> np.ndarray:
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim != 3 or stack.shape[1:] != tuple(expected):
        raise ValueError(
            f"Slice stack shape {stack.shape} doesn't match (Z, {expected[0]}, {expected[1]})."
        )
    return stack


@dataclass(frozen=True)
class SliceGrid:
    """Map axial slices ``(Y, X)`` to the model's ``size x size`` grid and back, whatever the
    voxel size (checkpoints without ``mm_per_px``; see :class:`PhysicalSliceGrid`).

    Slices are zero-padded to a centred square (aspect kept) and resized with linear
    interpolation on pixel-area-aligned grids (``scipy.ndimage.zoom``, ``grid_mode=True``), so
    :meth:`to_native` is the geometric inverse of :meth:`to_model` up to interpolation error.
    """

    native_shape: tuple[int, int]
    size: int = 256

    def __post_init__(self) -> None:
        if len(self.native_shape) != 2 or min(self.native_shape) < 1 or self.size < 1:
            raise ValueError(
                f"Invalid slice grid: native_shape {self.native_shape}, size {self.size}."
            )

    @property
    def square(self) -> int:
        """Side of the padded square."""
        return max(self.native_shape)

    @property
    def pad(self) -> tuple[int, int]:
        """Leading (top, left) padding; the rest goes at the bottom/right."""
        ny, nx = self.native_shape
        return (self.square - ny) // 2, (self.square - nx) // 2

    def _resize(self, stack: np.ndarray, side: int) -> np.ndarray:
        if stack.shape[1] == side:
            return stack.copy()
        factor = side / stack.shape[1]
        # zoom 1 on the slice axis: slices stay independent (2D model), one call for speed
        return ndi.zoom(stack, (1, factor, factor), order=1, mode="nearest", grid_mode=True)

    def to_model(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, Y, X)`` -> ``(Z, size, size)`` float32: pad to a centred square, then resize."""
        stack = _check_stack(stack, self.native_shape)
        ny, nx = self.native_shape
        py, px = self.pad
        square = np.zeros((stack.shape[0], self.square, self.square), dtype=np.float32)
        square[:, py : py + ny, px : px + nx] = stack
        return self._resize(square, self.size)

    def to_native(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, size, size)`` -> ``(Z, Y, X)`` float32: resize back, then crop the padding."""
        stack = _check_stack(stack, (self.size, self.size))
        ny, nx = self.native_shape
        py, px = self.pad
        square = self._resize(stack, self.square)
        return np.ascontiguousarray(square[:, py : py + ny, px : px + nx])


def _default_spacing(spacing: Any, ndim: int = 3) -> tuple[float, ...]:
    """Voxel size in mm as floats; None means 1 mm (a napari layer without a scale)."""
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(v) for v in np.broadcast_to(np.asarray(spacing, float), (ndim,)))
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"Voxel size must be positive and finite (got {values}).")
    return values


def _anti_alias(stack: np.ndarray, step: tuple[float, float]) -> np.ndarray:
    """Gaussian smoothing in-plane before sampling every ``step`` pixels (skimage's rule,
    sigma = (step - 1) / 2), so downsampling does not alias; slices stay independent."""
    sigma = tuple(max(0.0, (f - 1.0) / 2.0) for f in step)
    if max(sigma) <= 0.0:
        return stack
    return ndi.gaussian_filter(stack, (0.0, *sigma), mode="constant", cval=0.0)


@dataclass(frozen=True)
class PhysicalSliceGrid:
    """Map axial slices ``(Y, X)`` to a ``size x size`` grid of ``mm_per_px`` pixels and back.

    Model pixel ``u`` (row) sits at native row ``centre[0] + (u - (size - 1) / 2) * step[0]``
    with ``step = mm_per_px / spacing`` (likewise for columns): the brain's in-plane centre is the
    model grid's centre and one model pixel is ``mm_per_px`` mm whatever the scanner's voxel size
    or field of view. Only the ``crop`` box (the brain's bounding box plus a margin) is read;
    the model grid is zero beyond it. :meth:`to_native` is the exact inverse mapping (linear
    interpolation on both ways, Gaussian anti-aliasing before any downsampling).
    """

    native_shape: tuple[int, int]
    size: int
    spacing: tuple[float, float]
    mm_per_px: float
    centre: tuple[float, float]
    crop: tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)

    def __post_init__(self) -> None:
        if len(self.native_shape) != 2 or min(self.native_shape) < 1 or self.size < 1:
            raise ValueError(
                f"Invalid slice grid: native_shape {self.native_shape}, size {self.size}."
            )
        if not (self.mm_per_px > 0 and min(self.spacing) > 0):
            raise ValueError(
                f"Invalid slice grid: {self.mm_per_px} mm per pixel, spacing {self.spacing}."
            )

    @property
    def step(self) -> tuple[float, float]:
        """Native pixels per model pixel along rows and columns."""
        return (self.mm_per_px / self.spacing[0], self.mm_per_px / self.spacing[1])

    def _offset(self) -> tuple[float, float]:
        """Native row/column (in the crop) of model pixel (0, 0)."""
        half = (self.size - 1) / 2.0
        y0, _, x0, _ = self.crop
        return (self.centre[0] - y0 - half * self.step[0], self.centre[1] - x0 - half * self.step[1])

    def to_model(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, Y, X)`` -> ``(Z, size, size)`` float32: crop, anti-alias, resample."""
        stack = _check_stack(stack, self.native_shape)
        y0, y1, x0, x1 = self.crop
        crop = _anti_alias(stack[:, y0:y1, x0:x1], self.step)
        oy, ox = self._offset()
        return ndi.affine_transform(
            crop, (1.0, *self.step), offset=(0.0, oy, ox),
            output_shape=(stack.shape[0], self.size, self.size), order=1, mode="constant",
            cval=0.0, prefilter=False,
        )

    def to_native(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, size, size)`` -> ``(Z, Y, X)`` float32 on the native grid, 0 outside the field."""
        stack = _check_stack(stack, (self.size, self.size))
        inverse = (1.0 / self.step[0], 1.0 / self.step[1])
        stack = _anti_alias(stack, inverse)
        oy, ox = self._offset()
        ny, nx = self.native_shape
        # native pixel (y, x) -> model pixel ((y - y0 - oy) / step, ...)
        return ndi.affine_transform(
            stack, (1.0, *inverse),
            offset=(0.0, -(self.crop[0] + oy) * inverse[0], -(self.crop[2] + ox) * inverse[1]),
            output_shape=(stack.shape[0], ny, nx), order=1, mode="constant", cval=0.0,
            prefilter=False,
        )


def slice_grid(
    brain: np.ndarray,
    size: int,
    *,
    spacing: Any = None,
    mm_per_px: float | None = None,
    margin_mm: float = 10.0,
) -> SliceGrid | PhysicalSliceGrid:
    """The model grid for a ``(Z, Y, X)`` brain mask: physical when ``mm_per_px`` is given.

    The crop is the brain's in-plane bounding box over all slices plus ``margin_mm``, clipped to
    the image; the grid is centred on the box of the brain itself, so the same brain gives the
    same model input at any voxel size or field of view. Without ``mm_per_px`` (checkpoints made
    before the field existed) slices are padded to a square and resized, as those were trained.
    """
    brain = np.asarray(brain, dtype=bool)
    native = (int(brain.shape[1]), int(brain.shape[2]))
    if mm_per_px is None:
        return SliceGrid(native, size)
    _, dy, dx = _default_spacing(spacing)
    rows = np.flatnonzero(brain.any(axis=(0, 2)))
    cols = np.flatnonzero(brain.any(axis=(0, 1)))
    if rows.size == 0:
        raise ValueError("The brain mask is empty.")
    extent = ((rows[-1] - rows[0] + 1) * dy, (cols[-1] - cols[0] + 1) * dx)
    field_mm = size * float(mm_per_px)
    if max(extent) > field_mm:
        _logger.warning(
            "the brain spans %.0f x %.0f mm in-plane, more than the model's %.0f mm field "
            "(%d px at %g mm): its edges are not seen by the model",
            extent[0], extent[1], field_mm, size, mm_per_px,
        )
    my, mx = math.ceil(margin_mm / dy), math.ceil(margin_mm / dx)
    crop = (
        max(0, int(rows[0]) - my), min(native[0], int(rows[-1]) + 1 + my),
        max(0, int(cols[0]) - mx), min(native[1], int(cols[-1]) + 1 + mx),
    )
    centre = ((rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0)
    return PhysicalSliceGrid(native, int(size), (dy, dx), float(mm_per_px),
                             (float(centre[0]), float(centre[1])), crop)


@dataclass(frozen=True)
class PreprocessOptions:
    """How a checkpoint's inputs are made; stored in its ``preprocessing`` metadata.

    ``mm_per_px`` None is the pad-to-square resize of checkpoints made before the field existed
    (their metadata has no ``mm_per_px``, so :meth:`from_dict` keeps their behaviour).
    ``fixed_norm`` is a normalisation window used as is (not fitted per volume).
    """

    upper_percentile: float = 99.5
    lower_percentile: float = 0.5
    mm_per_px: float | None = None
    crop_margin_mm: float = 10.0
    bias_correction: bool = False
    fixed_norm: NormParams | None = None

    def __post_init__(self) -> None:
        if self.mm_per_px is not None and not (math.isfinite(self.mm_per_px) and self.mm_per_px > 0):
            raise ValueError(f"mm_per_px must be a positive number (got {self.mm_per_px}).")
        if not (math.isfinite(self.crop_margin_mm) and self.crop_margin_mm >= 0):
            raise ValueError(f"crop_margin_mm must be >= 0 (got {self.crop_margin_mm}).")

    def to_dict(self) -> dict[str, Any]:
        """The metadata keys (``fixed_norm`` as ``low``/``high`` when set)."""
        d: dict[str, Any] = {
            "upper_percentile": float(self.upper_percentile),
            "lower_percentile": float(self.lower_percentile),
            "crop_margin_mm": float(self.crop_margin_mm),
            "bias_correction": "n4" if self.bias_correction else "none",
        }
        if self.mm_per_px is not None:
            d["mm_per_px"] = float(self.mm_per_px)
        if self.fixed_norm is not None:
            d.update(normalisation="fixed", low=self.fixed_norm.low, high=self.fixed_norm.high)
        return d

    @classmethod
    def from_dict(cls, pre: dict[str, Any] | None) -> PreprocessOptions:
        """Options from a checkpoint's ``preprocessing`` dict; missing keys keep the defaults of
        checkpoints made before them (no physical scale, no bias correction)."""
        pre = dict(pre or {})
        fixed = None
        if pre.get("normalisation", "per_volume") != "per_volume" and {"low", "high"} <= set(pre):
            fixed = NormParams.from_dict(pre)
        bias = pre.get("bias_correction", "none")
        if bias not in ("none", "n4"):
            raise ValueError(f"Unknown bias_correction {bias!r} (expected 'none' or 'n4').")
        defaults = cls()
        mm = pre.get("mm_per_px")
        return cls(
            upper_percentile=float(pre.get("upper_percentile", defaults.upper_percentile)),
            lower_percentile=float(pre.get("lower_percentile", defaults.lower_percentile)),
            mm_per_px=None if mm is None else float(mm),
            crop_margin_mm=float(pre.get("crop_margin_mm", defaults.crop_margin_mm)),
            bias_correction=bias == "n4",
            fixed_norm=fixed,
        )

    @classmethod
    def from_meta(cls, meta: Any) -> PreprocessOptions:
        """:meth:`from_dict` of a :class:`~napari_tae.checkpoint.CheckpointMeta` (None: defaults)."""
        return cls.from_dict(getattr(meta, "preprocessing", None))


#: Target size in mm of the voxels N4 fits its field on: the bias field is smooth over
#: centimetres, and fitting on a shrunk image is what keeps N4 to seconds (on the raw heads
#: 8 mm corrected as much as 4 mm, in a quarter of the time; docs/preprocessing.md).
N4_FIT_MM = 8.0


def bias_correct(data: np.ndarray, mask: np.ndarray, spacing: Any = None) -> np.ndarray:
    """N4 bias-field correction (SimpleITK) fitted inside ``mask``, applied to the whole volume.

    The field is fitted on the volume shrunk to about :data:`N4_FIT_MM` voxels (each axis by the
    integer factor nearest ``N4_FIT_MM / voxel size``, so thick slices are shrunk less), then
    evaluated on the full grid and divided out, so the
    corrected volume keeps the input's grid and intensity scale.
    """
    import SimpleITK as sitk

    data = np.asarray(data, dtype=np.float32)
    spacing = _default_spacing(spacing)
    fit_mask = np.asarray(mask, dtype=bool) & (data > 0)  # N4 works on log intensities
    if not fit_mask.any():
        raise ValueError("N4 bias correction: no positive intensity inside the brain mask.")
    image = sitk.GetImageFromArray(data)  # SimpleITK's array order is (z, y, x), as napari's
    image.SetSpacing(spacing[::-1])
    mask_image = sitk.GetImageFromArray(fit_mask.astype(np.uint8))
    mask_image.CopyInformation(image)
    # never below 4 voxels along an axis (a volume of a few thick slices stays 3D for N4)
    shrink = [max(1, min(round(N4_FIT_MM / s), n // 4)) for s, n in zip(spacing[::-1], image.GetSize())]
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(mask_image, shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50, 50, 50])  # three B-spline mesh levels
    try:
        n4.Execute(small, small_mask)
    except RuntimeError as exc:  # ITK's multi-line message: its last line says what went wrong
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"N4 bias correction failed ({lines[-1] if lines else exc}).") from None
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).astype(np.float32)
    return data / np.exp(log_field)


@dataclass
class PreparedVolume:
    """Model inputs and the native-grid arrays they came from."""

    slices: np.ndarray  # (Z, size, size) float32 in [0, 1]
    mask_slices: np.ndarray  # (Z, size, size) bool
    normalised: np.ndarray  # (Z, Y, X) float32 in [0, 1], 0 outside the brain
    brain: np.ndarray  # (Z, Y, X) bool
    norm: NormParams
    grid: SliceGrid | PhysicalSliceGrid


def prepare_volume(
    data: np.ndarray,
    size: int = 256,
    *,
    mask: np.ndarray | None = None,
    norm: NormParams | None = None,
    spacing: Any = None,
    options: PreprocessOptions | None = None,
) -> PreparedVolume:
    """Brain mask, bias correction, normalisation and slice resampling: the one path to model
    inputs.

    Args:
        data: ``(Z, Y, X)`` volume in napari order (axial slices first).
        size: model input side.
        mask: optional brain mask (non-zero = brain); else :func:`brain_mask` guesses it.
        norm: normalisation to reuse; else ``options.fixed_norm``, else fitted on this volume
            with ``options``' percentiles (after the bias correction).
        spacing: ``(Z, Y, X)`` voxel size in mm (None: 1 mm), for N4 and the physical grid.
        options: the checkpoint's :class:`PreprocessOptions` (None: the defaults).
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"Expected a 3D (Z, Y, X) volume (got shape {data.shape}).")
    options = options or PreprocessOptions()
    spacing = _default_spacing(spacing)
    brain = brain_mask(data, mask)
    if options.bias_correction:
        data = bias_correct(data, brain, spacing)
    if norm is None:
        norm = options.fixed_norm or fit_normalisation(
            data, brain, options.upper_percentile, options.lower_percentile
        )
    normalised = normalise(data, brain, norm)
    grid = slice_grid(brain, size, spacing=spacing, mm_per_px=options.mm_per_px,
                      margin_mm=options.crop_margin_mm)
    slices = grid.to_model(normalised)
    np.clip(slices, 0.0, 1.0, out=slices)
    mask_slices = grid.to_model(brain.astype(np.float32)) > 0.5
    return PreparedVolume(slices, mask_slices, normalised, brain, norm, grid)
