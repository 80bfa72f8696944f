"""Preprocessing shared by the plugin, the CLI and training (evaluation protocol, steps 2-4).

Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in Brain MR
Images", BrainLes 2022, train on skull-stripped axial FLAIR slices scaled to [0, 1] and resized
to the model size. :func:`prepare_volume` is the one code path that does this, so the plugin,
the CLI and training see identical model inputs. numpy/scipy only: no napari, no torch.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "NormParams",
    "NotSkullStrippedWarning",
    "PreparedVolume",
    "SliceGrid",
    "brain_mask",
    "fit_normalisation",
    "norm_from_settings",
    "normalise",
    "prepare_volume",
]

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


def norm_from_settings(data: np.ndarray, brain: np.ndarray, settings: dict[str, Any]) -> NormParams | None:
    """The normalisation that stored preprocessing settings ask for (checkpoint or training run).

    ``{"normalisation": "per_volume", "upper_percentile": p, "lower_percentile": q}`` fits the
    window on this volume's own brain; fixed ``low``/``high`` numbers are used as they are only
    when the normalisation is not per volume. None when the settings say neither.
    """
    if settings.get("normalisation", "per_volume") != "per_volume" and {"low", "high"} <= set(settings):
        return NormParams.from_dict(settings)
    if "upper_percentile" in settings:
        lower = settings.get("lower_percentile")
        kwargs = {} if lower is None else {"lower_percentile": float(lower)}
        return fit_normalisation(data, brain, float(settings["upper_percentile"]), **kwargs)
    return None


def normalise(data: np.ndarray, mask: np.ndarray, params: NormParams) -> np.ndarray:
    """float32 volume in [0, 1] inside ``mask``, 0 outside."""
    scale = 1.0 / (params.high - params.low)
    out = (np.asarray(data, dtype=np.float32) - np.float32(params.low)) * np.float32(scale)
    np.clip(out, 0.0, 1.0, out=out)
    out[~np.asarray(mask, dtype=bool)] = 0.0
    return out


@dataclass(frozen=True)
class SliceGrid:
    """Map axial slices ``(Y, X)`` to the model's ``size x size`` grid and back.

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

    def _check(self, stack: np.ndarray, expected: tuple[int, int]) -> np.ndarray:
        stack = np.asarray(stack, dtype=np.float32)
        if stack.ndim != 3 or stack.shape[1:] != tuple(expected):
            raise ValueError(
                f"Slice stack shape {stack.shape} doesn't match (Z, {expected[0]}, {expected[1]})."
            )
        return stack

    def _resize(self, stack: np.ndarray, side: int) -> np.ndarray:
        if stack.shape[1] == side:
            return stack.copy()
        factor = side / stack.shape[1]
        # zoom 1 on the slice axis: slices stay independent (2D model), one call for speed
        return ndi.zoom(stack, (1, factor, factor), order=1, mode="nearest", grid_mode=True)

    def to_model(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, Y, X)`` -> ``(Z, size, size)`` float32: pad to a centred square, then resize."""
        stack = self._check(stack, self.native_shape)
        ny, nx = self.native_shape
        py, px = self.pad
        square = np.zeros((stack.shape[0], self.square, self.square), dtype=np.float32)
        square[:, py : py + ny, px : px + nx] = stack
        return self._resize(square, self.size)

    def to_native(self, stack: np.ndarray) -> np.ndarray:
        """``(Z, size, size)`` -> ``(Z, Y, X)`` float32: resize back, then crop the padding."""
        stack = self._check(stack, (self.size, self.size))
        ny, nx = self.native_shape
        py, px = self.pad
        square = self._resize(stack, self.square)
        return np.ascontiguousarray(square[:, py : py + ny, px : px + nx])


@dataclass
class PreparedVolume:
    """Model inputs and the native-grid arrays they came from."""

    slices: np.ndarray  # (Z, size, size) float32 in [0, 1]
    mask_slices: np.ndarray  # (Z, size, size) bool
    normalised: np.ndarray  # (Z, Y, X) float32 in [0, 1], 0 outside the brain
    brain: np.ndarray  # (Z, Y, X) bool
    norm: NormParams
    grid: SliceGrid


def prepare_volume(
    data: np.ndarray,
    size: int = 256,
    *,
    mask: np.ndarray | None = None,
    norm: NormParams | None = None,
) -> PreparedVolume:
    """Brain mask, normalisation and slice resizing: the one path to model inputs.

    Args:
        data: ``(Z, Y, X)`` volume in napari order (axial slices first).
        size: model input side.
        mask: optional brain mask (non-zero = brain); else :func:`brain_mask` guesses it.
        norm: normalisation to reuse (e.g. from a checkpoint); else fitted on this volume.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"Expected a 3D (Z, Y, X) volume (got shape {data.shape}).")
    brain = brain_mask(data, mask)
    if norm is None:
        norm = fit_normalisation(data, brain)
    normalised = normalise(data, brain, norm)
    grid = SliceGrid((data.shape[1], data.shape[2]), size)
    slices = grid.to_model(normalised)
    np.clip(slices, 0.0, 1.0, out=slices)
    mask_slices = grid.to_model(brain.astype(np.float32)) > 0.5
    return PreparedVolume(slices, mask_slices, normalised, brain, norm, grid)
