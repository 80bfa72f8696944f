"""Post-processing of reconstruction residuals into anomaly masks and lesion tables.

Implements steps 6-9 of the protocol in Ghorbel et al. 2022, "Transformer based Models for
Unsupervised Anomaly Segmentation in Brain MR Images" (https://arxiv.org/abs/2207.02059), which
follows Baur et al. 2021 (https://arxiv.org/abs/2004.03271):

1. residual ``r = brain * max(x - x_hat, 0)``;
2. median filter with an odd kernel ``k`` (2D per axial slice, or 3D), ``k = 1`` is off;
3. squash: filtered values not above ``q / 100`` of the [0, 1] intensity range are dropped, what
   remains is the mask (``q = 1`` is the paper's S_1%);
4. optionally drop connected components smaller than ``n`` voxels (26-connectivity).

The mask is recomputed on every slider move, so it has a fast path. For an odd window of ``n``
values the median is the element of rank ``(n - 1) / 2``, hence ``median(window) > t`` exactly when
more than half of the window's values are ``> t``. Median-then-threshold is therefore a majority vote
of the binary image ``r > t``: a box sum of a ``uint8`` image (a few vectorised integer additions per
axis) instead of a sort per voxel. The box sum extends the borders exactly as
``scipy.ndimage.median_filter``'s default ``mode='reflect'`` does (``d c b a | a b c d | d c b a``),
so the fast mask is identical to thresholding :func:`median_filtered`, ties included: a value
equal to the threshold does not survive, in both.

numpy/scipy only: no torch, no napari.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from napari_tae.options import MEDIAN_MODES, check_median_kernel

__all__ = [
    "residual",
    "median_filtered",
    "anomaly_mask",
    "slice_mask",
    "remove_small",
    "ml_to_voxels",
    "label_lesions",
    "lesion_table",
    "calibrate",
    "filtered_quantiles",
    "CALIBRATION_PERCENTILES",
]

#: Percentiles of healthy brain voxels stored by :func:`calibrate` (voxel false-positive rates of
#: 1 %, 0.5 % and 0.1 %); the first one is the default threshold.
CALIBRATION_PERCENTILES: tuple[float, ...] = (99.0, 99.5, 99.9)

# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_mode(mode: str, ndim: int) -> str:
    if mode not in MEDIAN_MODES:
        raise ValueError(f"median mode must be one of {MEDIAN_MODES}, got {mode!r}")
    if mode == "3d" and ndim != 3:
        raise ValueError(f"3d median mode needs a 3D (Z, Y, X) array, got {ndim}D")
    if ndim not in (2, 3):
        raise ValueError(f"residual must be a 2D slice or a 3D (Z, Y, X) volume, got {ndim}D")
    return mode


def _threshold(squash: float) -> float:
    squash = float(squash)
    if not math.isfinite(squash):
        raise ValueError(f"squash must be a finite percentage, got {squash}")
    return squash / 100.0


def _filter_axes(ndim: int, mode: str) -> tuple[int, ...]:
    """Axes the median window spans: the in-plane axes in 2d mode, all axes in 3d mode."""
    return tuple(range(ndim)) if mode == "3d" else (ndim - 2, ndim - 1)


def _check_brain(brain: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if brain is None:
        return None
    brain = np.asarray(brain, dtype=bool)
    if brain.shape != tuple(shape):
        raise ValueError(f"brain mask shape {brain.shape} doesn't match residual {tuple(shape)}")
    return brain


# --------------------------------------------------------------------------------------------
# residual and exact median reference
# --------------------------------------------------------------------------------------------
def residual(x: np.ndarray, x_hat: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
    """Positive reconstruction residual inside the brain, ``brain * max(x - x_hat, 0)``.

    Only hyper-intense anomalies are of interest on FLAIR, hence the positive part.

    Args:
        x: Normalised input, any shape.
        x_hat: Reconstruction, same shape as ``x``.
        brain: Boolean brain mask of the same shape, or None for no masking.

    Returns:
        float32 array of the input's shape, 0 outside the brain.
    """
    x = np.asarray(x)
    x_hat = np.asarray(x_hat)
    if x.shape != x_hat.shape:
        raise ValueError(f"reconstruction shape {x_hat.shape} doesn't match input {x.shape}")
    r = np.subtract(x, x_hat, dtype=np.float32)
    np.maximum(r, 0.0, out=r)
    brain = _check_brain(brain, x.shape)
    if brain is not None:
        r[~brain] = 0.0
    return r


def median_filtered(residual: np.ndarray, kernel: int = 5, mode: str = "2d") -> np.ndarray:
    """Median-filtered residual, the exact reference (``scipy.ndimage.median_filter``).

    Used where the filtered values themselves are needed (calibration, evaluation); the mask
    itself is computed by the much faster :func:`anomaly_mask`.

    Args:
        residual: 2D slice or 3D (Z, Y, X) volume.
        kernel: Odd window width; 1 returns an unfiltered copy.
        mode: ``"2d"`` filters each axial slice with a (1, k, k) window, ``"3d"`` uses (k, k, k).

    Returns:
        Filtered array of the input's shape and dtype (borders: scipy's default ``'reflect'``).
    """
    residual = np.asarray(residual)
    kernel = check_median_kernel(kernel)
    mode = _check_mode(mode, residual.ndim)
    if kernel == 1:
        return residual.copy()
    axes = _filter_axes(residual.ndim, mode)
    size = tuple(kernel if ax in axes else 1 for ax in range(residual.ndim))
    return ndi.median_filter(residual, size=size, mode="reflect")


# --------------------------------------------------------------------------------------------
# fast mask: majority vote by box sums
# --------------------------------------------------------------------------------------------
def _window_sum(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Sum over a window of ``2 * radius + 1`` along ``axis`` with scipy's 'reflect' borders.

    numpy's ``'symmetric'`` pad repeats the edge value exactly like scipy's ``'reflect'``
    (half-sample symmetric), also when the radius exceeds the axis length.
    """
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(a, pad, mode="symmetric")
    index = [slice(None)] * a.ndim

    def shifted(j: int) -> np.ndarray:
        index[axis] = slice(j, j + n)
        return padded[tuple(index)]

    out = shifted(0).copy()
    for j in range(1, 2 * radius + 1):
        np.add(out, shifted(j), out=out)
    return out


def _box_count(binary: np.ndarray, kernel: int, axes: Sequence[int]) -> np.ndarray:
    """Number of True values in the k**len(axes) window around each element."""
    radius = kernel // 2
    count = binary.view(np.uint8)
    # box sum axis by axis, last axis first (contiguous); counts <= 225 fit uint8 for a 2D window
    # up to k = 15, larger windows (3D) switch to a wider integer before the pass that needs it
    window = 1
    for axis in sorted(axes, reverse=True):
        window *= kernel
        if window > np.iinfo(count.dtype).max:
            count = count.astype(np.uint32 if window > 65535 else np.uint16)
        count = _window_sum(count, radius, axis)
    return count


def _majority(binary: np.ndarray, kernel: int, axes: Sequence[int]) -> np.ndarray:
    """True where more than half of the k**len(axes) window around an element is True.

    Computed in the bounding box of the True values grown by the window radius (the rest is
    False): the box's border keeps at least a radius of False values, so its reflected borders
    see what the whole array would, and the result is exact.
    """
    if kernel == 1:
        return binary.copy()
    box = _bounding_box(binary)
    out = np.zeros(binary.shape, dtype=bool)
    if box is None:
        return out
    radius = kernel // 2
    grown = tuple(
        slice(max(b.start - radius, 0), min(b.stop + radius, n)) if ax in axes else slice(None)
        for ax, (b, n) in enumerate(zip(box, binary.shape))
    )
    out[grown] = _box_count(np.ascontiguousarray(binary[grown]), kernel, axes) > kernel ** len(axes) // 2
    return out


def anomaly_mask(
    residual: np.ndarray,
    *,
    kernel: int = 5,
    squash: float = 1.0,
    mode: str = "2d",
    min_size: int = 0,
    brain: np.ndarray | None = None,
    connectivity: int = 3,
) -> np.ndarray:
    """Anomaly mask: median filter, squash at ``squash`` percent, brain, small components.

    Identical to ``median_filtered(residual, kernel, mode) > squash / 100`` (then ``& brain`` and
    :func:`remove_small`), computed as a majority vote of ``residual > squash / 100`` in the
    window, which is an order of magnitude faster than the median filter.

    Args:
        residual: 2D slice or 3D (Z, Y, X) volume of residuals in intensity-range units.
        kernel: Odd median window width; 1 = no filtering.
        squash: Threshold in percent of the [0, 1] intensity range; a filtered value survives
            when strictly greater than ``squash / 100``.
        mode: ``"2d"`` (per axial slice) or ``"3d"`` median window.
        min_size: Drop connected components with fewer voxels (0 or 1 keeps all).
        brain: Optional boolean mask; voxels outside it are never anomalous (near the brain
            border the median window may reach into the brain).
        connectivity: Connectivity for ``min_size`` (3 = 26-neighbourhood in 3D).

    Returns:
        Boolean mask of the residual's shape.
    """
    residual = np.asarray(residual)
    kernel = check_median_kernel(kernel)
    mode = _check_mode(mode, residual.ndim)
    brain = _check_brain(brain, residual.shape)
    mask = _majority(residual > _threshold(squash), kernel, _filter_axes(residual.ndim, mode))
    if brain is not None:
        mask &= brain
    if min_size > 1:
        mask = remove_small(mask, min_size, connectivity=connectivity)
    return mask


def _reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start .. stop-1`` of an axis of length ``n`` extended with scipy's 'reflect'."""
    period = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    return period[np.arange(start, stop) % (2 * n)]


def slice_mask(
    residual: np.ndarray,
    *,
    kernel: int = 5,
    squash: float = 1.0,
    mode: str = "2d",
    index: int | None = None,
    brain: np.ndarray | None = None,
) -> np.ndarray:
    """Mask of one axial slice, for an instant update of the visible slice.

    Equals ``anomaly_mask(volume, ...)[index]`` (without ``min_size``: component sizes are a
    property of the whole volume, so small-component removal is left to the whole-volume pass).

    Args:
        residual: A 2D slice (2d mode only), or the 3D (Z, Y, X) volume together with ``index``;
            in 3d mode the ``kernel`` neighbouring slices are read, reflected at the volume ends.
        kernel: Odd median window width; 1 = no filtering.
        squash: Threshold in percent of the intensity range (strictly greater survives).
        mode: ``"2d"`` or ``"3d"``.
        index: Axial slice index when ``residual`` is a volume.
        brain: Optional boolean mask, of the slice's shape or of the volume's shape.

    Returns:
        Boolean 2D mask of the slice.
    """
    residual = np.asarray(residual)
    kernel = check_median_kernel(kernel)
    t = _threshold(squash)
    if residual.ndim == 2:
        if index is not None:
            raise ValueError("index is only used with a 3D residual volume")
        if mode != "2d":
            raise ValueError("3d median mode needs the 3D residual volume and a slice index")
        mask = _majority(residual > t, kernel, (0, 1))
    elif residual.ndim == 3:
        _check_mode(mode, 3)
        n = residual.shape[0]
        if index is None or not -n <= int(index) < n:
            raise ValueError(f"slice index must be in [0, {n}) for a 3D residual, got {index}")
        index = int(index) % n
        if mode == "2d":
            mask = _majority(residual[index] > t, kernel, (0, 1))
        else:
            r = kernel // 2
            slab = residual[_reflect_indices(index - r, index + r + 1, n)] > t
            # in-plane box sums of the k slices, then the vote over the whole k*k*k window
            plane = _box_count(slab, kernel, (1, 2))
            mask = plane.sum(axis=0, dtype=np.int32) > kernel**3 // 2
    else:
        raise ValueError(f"residual must be a 2D slice or a 3D volume, got {residual.ndim}D")
    if brain is not None:
        brain = np.asarray(brain, dtype=bool)
        if brain.ndim == 3 and residual.ndim == 3:
            brain = brain[index]
        if brain.shape != mask.shape:
            raise ValueError(f"brain mask shape {brain.shape} doesn't match slice {mask.shape}")
        mask &= brain
    return mask


# --------------------------------------------------------------------------------------------
# connected components
# --------------------------------------------------------------------------------------------
def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if not 1 <= connectivity <= ndim:
        # 3 (the 26-neighbourhood default) on a 2D mask means full 8-connectivity
        connectivity = min(max(int(connectivity), 1), ndim)
    return ndi.generate_binary_structure(ndim, connectivity)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding all True voxels; None for an empty mask."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """``scipy.ndimage.label`` of a bool mask as full-size int32, labelling only its bounding box.

    Labelling dominates the cost of small-component removal; lesions rarely fill the volume's
    box. Raster order inside the box is the full array's, so the numbering is scipy's.
    """
    labels = np.zeros(mask.shape, dtype=np.int32)
    box = _bounding_box(mask)
    if box is None:
        return labels, 0
    sub, n = ndi.label(mask[box], structure=_structure(mask.ndim, connectivity))
    labels[box] = sub
    return labels, int(n)


def remove_small(mask: np.ndarray, min_size: int, connectivity: int = 3) -> np.ndarray:
    """Drop connected components with fewer than ``min_size`` voxels.

    Same result as ``skimage.morphology.remove_small_objects(mask, max_size=min_size - 1,
    connectivity=connectivity)``.

    Args:
        mask: Boolean mask (2D or 3D).
        min_size: Smallest component kept, in voxels (see :func:`ml_to_voxels`).
        connectivity: Neighbourhood as in skimage: 1 = faces, 3 = 26-neighbourhood in 3D
            (capped at the mask's dimension).

    Returns:
        New boolean mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask.copy()
    labels, _ = _label(mask, connectivity)
    flat = np.flatnonzero(mask)  # touch the (few) mask voxels only, not the whole volume
    lab = labels.ravel()[flat]
    keep = np.bincount(lab) >= min_size
    out = mask.copy()
    out.ravel()[flat] = keep[lab]
    return out


def ml_to_voxels(ml: float, spacing: Sequence[float]) -> int:
    """Smallest number of voxels whose volume is at least ``ml`` millilitres.

    Args:
        ml: Volume in mL (1 mL = 1000 mm^3).
        spacing: Voxel size in mm per axis.

    Returns:
        Voxel count to pass as ``min_size``.
    """
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=float)))
    if voxel_mm3 <= 0:
        raise ValueError(f"voxel spacing must be positive, got {tuple(spacing)}")
    # round first so that e.g. 0.1 mL of 1 mm^3 voxels is 100 voxels, not 101
    return int(math.ceil(round(float(ml) * 1000.0 / voxel_mm3, 9)))


def label_lesions(mask: np.ndarray, connectivity: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Label connected components, numbered by decreasing size (1 = largest).

    Ties keep scipy's scan order, so numbering is deterministic.

    Returns:
        ``(labels, sizes)``: int32 label image (0 = background) and the voxel count of each label
        (``sizes[i]`` belongs to label ``i + 1``).
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = _label(mask, connectivity)
    if n == 0:
        return labels, np.zeros(0, dtype=np.int64)
    flat = np.flatnonzero(mask)  # relabel the (few) lesion voxels only, in place
    lab = labels.ravel()[flat]
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # old label order[i] + 1 becomes new label i + 1
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    labels.ravel()[flat] = remap[lab]
    return labels, sizes[order]


def lesion_table(
    mask: np.ndarray,
    residual: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float] | None = None,
    *,
    connectivity: int = 3,
    labels: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Per-lesion statistics of the mask's connected components, largest first.

    Args:
        mask: Boolean mask (Z, Y, X) (or 2D).
        residual: Residual of the same shape; max/mean are of the unfiltered residual.
        spacing: Voxel size in mm, napari axis order (``layer.scale``).
        origin: World coordinate in mm of voxel (0, 0, 0) (``layer.translate``); zeros if None.
        connectivity: As in :func:`remove_small`; 3 = 26-neighbourhood.
        labels: The mask's components from :func:`label_lesions`, when already computed (saves
            labelling twice); ``mask`` is then ignored.

    Returns:
        One dict per lesion with plain Python values: ``label`` (1 = largest, the id in
        :func:`label_lesions`' image), ``voxels``, ``volume_ml``, ``max_residual``,
        ``mean_residual``, ``centroid_voxel`` (z, y, x) and ``centroid_mm`` (world coordinates, as
        napari shows them).
    """
    residual = np.asarray(residual)
    if labels is None:
        mask = np.asarray(mask, dtype=bool)
        labels, n = _label(mask, connectivity)
        ids = None  # scipy's scan-order ids; renumbered by size below
    else:
        labels = np.asarray(labels)
        n = int(labels.max(initial=0))
        ids = np.arange(1, n + 1)
    if residual.shape != labels.shape:
        raise ValueError(f"residual shape {residual.shape} doesn't match mask {labels.shape}")
    spacing_arr = np.asarray(spacing, dtype=float)
    origin_arr = np.zeros(labels.ndim) if origin is None else np.asarray(origin, dtype=float)
    if spacing_arr.shape != (labels.ndim,) or origin_arr.shape != (labels.ndim,):
        raise ValueError(
            f"spacing {tuple(spacing_arr)} and origin {tuple(origin_arr)} need {labels.ndim} values"
        )
    if n == 0:
        return []
    # statistics over the (few) lesion voxels only, by label
    # flatnonzero of a bool array is several times faster than of the int32 labels
    flat = np.flatnonzero(np.ravel(labels) != 0)
    lab = labels.ravel()[flat]
    values = residual.ravel()[flat].astype(np.float64)
    sizes = np.bincount(lab, minlength=n + 1)[1:]
    present = sizes > 0  # label images from painting may skip ids
    total = np.bincount(lab, weights=values, minlength=n + 1)[1:]
    peak = np.full(n + 1, -np.inf)
    np.maximum.at(peak, lab, values)
    coords = np.unravel_index(flat, labels.shape)
    centroids = np.stack(
        [np.bincount(lab, weights=c, minlength=n + 1)[1:] for c in coords], axis=1
    )[present] / sizes[present, None]
    order = np.argsort(-sizes[present], kind="stable")
    label_ids = np.arange(1, n + 1) if ids is None else ids
    label_ids = label_ids[present]
    if ids is None:
        label_ids = np.empty_like(label_ids)
        label_ids[order] = np.arange(1, order.size + 1)  # same numbering as label_lesions
    voxels = sizes[present]
    mean = total[present] / voxels
    peak = peak[1:][present]
    mm = origin_arr + centroids * spacing_arr
    voxel_mm3 = float(np.prod(spacing_arr))
    return [
        {
            "label": int(label_ids[i]),
            "voxels": int(voxels[i]),
            "volume_ml": float(voxels[i] * voxel_mm3 / 1000.0),
            "max_residual": float(peak[i]),
            "mean_residual": float(mean[i]),
            "centroid_voxel": tuple(centroids[i].tolist()),
            "centroid_mm": tuple(mm[i].tolist()),
        }
        for i in order.tolist()
    ]


# --------------------------------------------------------------------------------------------
# exact percentiles of median-filtered volumes, without the median filter (calibration)
# --------------------------------------------------------------------------------------------
def _filtered_counter(scores: Sequence[np.ndarray], brains: Sequence[np.ndarray], kernel: int,
                      mode: str) -> Callable[..., int]:
    """``count(t, above)``: brain voxels whose median-filtered score is > t (above) or < t."""
    axes = [_filter_axes(s.ndim, _check_mode(mode, s.ndim)) for s in scores]

    def count(t: float, above: bool = True) -> int:
        total = 0
        for s, b, ax in zip(scores, brains, axes):
            # the median of an odd window is > t (< t) exactly when most of its values are
            vote = _majority(s > t if above else s < t, kernel, ax)
            total += int(np.count_nonzero(vote & b))
        return total

    return count


def _smallest(candidates: np.ndarray, ok: Callable[[float], bool]) -> float:
    """Smallest candidate (sorted ascending) for which the monotone predicate ``ok`` holds."""
    lo, hi = 0, candidates.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(float(candidates[mid])):
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def _pooled(scores: Sequence[np.ndarray], brains: Sequence[np.ndarray]) -> tuple[list, list, int]:
    scores = [np.asarray(s, dtype=np.float32) for s in scores]
    if len(brains) != len(scores):
        raise ValueError(f"{len(scores)} score volume(s) but {len(brains)} brain mask(s)")
    brains = [_check_brain(b, s.shape) for s, b in zip(scores, brains)]
    n = sum(int(np.count_nonzero(b)) for b in brains)
    if n == 0:
        raise ValueError("no brain voxels in the calibration volumes")
    return scores, brains, n


def filtered_quantiles(
    scores: Sequence[np.ndarray],
    brains: Sequence[np.ndarray],
    percentiles: Sequence[float],
    kernel: int = 5,
    mode: str = "2d",
) -> list[float]:
    """Percentiles of the median-filtered scores over the brain voxels of all volumes pooled.

    The percentile ``p`` is the smallest filtered value ``t`` such that at most ``1 - p / 100`` of
    the brain voxels are above it (numpy's ``method="inverted_cdf"``), so the threshold ``t``
    flags at most that fraction of the calibration brains. Exact, and equal to
    ``np.percentile(median_filtered(s)[brain], p, method="inverted_cdf")``.

    Returns:
        The percentiles in score units (not percent).
    """
    kernel = check_median_kernel(kernel)
    scores, brains, n = _pooled(scores, brains)
    candidates = np.unique(np.concatenate([s.ravel() for s in scores]))
    count = _filtered_counter(scores, brains, kernel, mode)
    return [_smallest(candidates, lambda t, p=p: count(t) <= n * (1.0 - p / 100.0)) for p in percentiles]


# --------------------------------------------------------------------------------------------
# label-free calibration
# --------------------------------------------------------------------------------------------
def calibrate(
    residuals: Iterable[np.ndarray],
    brains: Iterable[np.ndarray],
    kernel: int = 5,
    mode: str = "2d",
) -> dict[str, float]:
    """Squash thresholds from healthy volumes: percentiles of filtered brain residuals.

    The 99th, 99.5th and 99.9th percentiles (:func:`filtered_quantiles`) of the median-filtered
    residual over the brain voxels of all (healthy) volumes pooled: each flags at most 1 %, 0.5 %
    and 0.1 % of the calibration brain voxels with the same kernel and mode. Values are in percent
    of the intensity range, the unit of ``squash``. The scores other than the residual are
    calibrated into a table by :func:`napari_tae.scores.calibration_table`.

    Args:
        residuals: Residual volumes of healthy subjects.
        brains: Matching boolean brain masks.
        kernel: Median kernel the thresholds are meant for.
        mode: Median mode the thresholds are meant for.

    Returns:
        ``{"p99": q, "p99.5": q, "p99.9": q, "default": q_p99}``.
    """
    residuals, brains = list(residuals), list(brains)
    if len(brains) < len(residuals):
        raise ValueError(f"calibrate: no brain mask for residual volume {len(brains)}")
    if len(brains) > len(residuals):
        raise ValueError("calibrate: more brain masks than residual volumes")
    try:
        q = filtered_quantiles(residuals, brains, CALIBRATION_PERCENTILES, kernel, mode)
    except ValueError as exc:
        raise ValueError(f"calibrate: {exc}") from None
    out = {f"p{p:g}": 100.0 * v for p, v in zip(CALIBRATION_PERCENTILES, q)}
    out["default"] = out[f"p{CALIBRATION_PERCENTILES[0]:g}"]
    return out
