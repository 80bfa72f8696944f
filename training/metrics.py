"""Evaluation metrics for unsupervised anomaly segmentation (protocol: docs/evaluation.md).

Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in Brain MR
Images", BrainLes 2022 (arXiv:2207.02059), report AUROC, AUPRC, [DSC] (Dice at the best global
threshold), per-slice Dice and SSIM. This module computes them so that memory does not depend on the
number of test voxels: `BinnedScores` accumulates positive/negative histograms of the anomaly score
over fixed bins and derives AUROC, average precision (AUPRC), the best-threshold Dice and
false-positive rates from them.

Conventions (shared by every function here):

* A voxel is predicted anomalous when ``score > threshold`` (strictly), as in
  `napari_tae.postprocess.anomaly_mask` (``residual > squash / 100``).
* Bins: one bin for ``score <= 0`` and ``n_bins`` bins ``((k-1) w, k w]``, ``w = max_score / n_bins``;
  scores outside ``[0, max_score]`` are clamped into the end bins. Scores in one bin count as tied,
  so results equal scikit-learn's exact ones when no two distinct scores share a bin and differ by a
  tiny amount otherwise (< 1e-3 with the default 100,000 bins on [0, 1] in the tests).
* Undefined metrics are ``nan``, never an exception: AUROC needs both classes; AUPRC and Dice-based
  optima need at least one positive.
* Dice of an empty prediction against an empty label is ``nan`` by default and excluded from the
  mean +- std (the nnU-Net convention: no lesion to find says nothing about segmentation quality);
  pass ``empty=1.0`` for the BraTS convention. An empty label with a non-empty prediction, or the
  reverse, scores 0.
* Standard deviations are population ones (``ddof=0``).

numpy/scipy/scikit-image only (no torch).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BinnedScores",
    "auroc",
    "average_precision",
    "dice",
    "dice_at_threshold",
    "mean_std",
    "false_positive_rate",
    "slice_dice_smoothed",
    "ssim",
    "ssim_slices",
]

_CHUNK = 1 << 22  # voxels per pass in `BinnedScores.update`: bounds the temporary arrays


class BinnedScores:
    """Streaming histogram of anomaly scores for positives and negatives.

    Memory is ``2 * (n_bins + 1)`` int64 counts whatever the number of voxels; `update` may be
    called per volume or per chunk, and accumulators can be summed (``a + b``, ``a += b``).

    Parameters
    ----------
    n_bins
        Number of bins over ``(0, max_score]`` (plus one for ``score <= 0``).
    max_score
        Upper end of the binned range; residual scores live in [0, 1].
    """

    def __init__(self, n_bins: int = 100_000, max_score: float = 1.0) -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if not max_score > 0:
            raise ValueError(f"max_score must be > 0, got {max_score}")
        self.n_bins = int(n_bins)
        self.max_score = float(max_score)
        self.pos = np.zeros(self.n_bins + 1, np.int64)
        self.neg = np.zeros(self.n_bins + 1, np.int64)

    def __repr__(self) -> str:
        return (f"BinnedScores(n_bins={self.n_bins}, max_score={self.max_score}, "
                f"positives={self.n_pos}, negatives={self.n_neg})")

    # ------------------------------------------------------------------ accumulation

    def _index(self, scores: np.ndarray) -> np.ndarray:
        # bin k >= 1 holds ((k-1) w, k w]: "score > thresholds[k]" is exactly "bin >= k"
        idx = np.ceil(scores.astype(np.float64) * (self.n_bins / self.max_score))
        np.clip(idx, 0, self.n_bins, out=idx)
        return idx.astype(np.intp)

    def update(self, scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> BinnedScores:
        """Add voxels: ``labels > 0`` are positives; only voxels where ``mask`` is true, if given."""
        scores = np.asarray(scores)
        labels = np.asarray(labels)
        if scores.shape != labels.shape:
            raise ValueError(f"scores shape {scores.shape} doesn't match labels shape {labels.shape}")
        if mask is not None:
            mask = np.asarray(mask, bool)
            if mask.shape != scores.shape:
                raise ValueError(f"mask shape {mask.shape} doesn't match scores shape {scores.shape}")
            scores, labels = scores[mask], labels[mask]
        scores, labels = scores.ravel(), labels.ravel()
        for start in range(0, scores.size, _CHUNK):
            s = scores[start:start + _CHUNK]
            if np.isnan(s).any():
                raise ValueError("scores contain NaN")
            idx = self._index(s)
            lab = labels[start:start + _CHUNK] > 0
            self.pos += np.bincount(idx[lab], minlength=self.n_bins + 1)
            self.neg += np.bincount(idx[~lab], minlength=self.n_bins + 1)
        return self

    def _check_compatible(self, other: BinnedScores) -> None:
        if (self.n_bins, self.max_score) != (other.n_bins, other.max_score):
            raise ValueError(f"cannot combine bins ({self.n_bins}, {self.max_score}) with "
                             f"({other.n_bins}, {other.max_score})")

    def __iadd__(self, other: BinnedScores) -> BinnedScores:
        self._check_compatible(other)
        self.pos += other.pos
        self.neg += other.neg
        return self

    def __add__(self, other: BinnedScores) -> BinnedScores:
        out = BinnedScores(self.n_bins, self.max_score)
        out += self
        out += other
        return out

    # ------------------------------------------------------------------ curves

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())

    @property
    def thresholds(self) -> np.ndarray:
        """``thresholds[k]``: predicting ``score > thresholds[k]`` keeps exactly bins ``>= k``.

        ``[-inf, 0, w, 2w, ..., (n_bins - 1) w]``.
        """
        t = np.arange(-1, self.n_bins, dtype=np.float64) * (self.max_score / self.n_bins)
        t[0] = -np.inf
        return t

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives at every threshold of `thresholds` (int64 arrays)."""
        tp = np.cumsum(self.pos[::-1])[::-1]
        fp = np.cumsum(self.neg[::-1])[::-1]
        return tp, fp

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoidal, ties within a bin); nan without both classes."""
        p, n = self.n_pos, self.n_neg
        if p == 0 or n == 0:
            return float("nan")
        tp, fp = self.counts()
        # ROC points from the highest threshold down, starting at (0, 0)
        tpr = np.concatenate([[0.0], tp[::-1] / p])
        fpr = np.concatenate([[0.0], fp[::-1] / n])
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))

    def average_precision(self) -> float:
        """Average precision, sum over thresholds of (recall step) x precision (scikit-learn's
        definition, no interpolation); nan without positives."""
        p = self.n_pos
        if p == 0:
            return float("nan")
        tp, fp = self.counts()
        hit = self.pos > 0  # recall only moves at bins holding positives (so tp + fp > 0 there)
        precision = tp[hit] / (tp[hit] + fp[hit])
        return float(np.sum(self.pos[hit] / p * precision))

    def precision_recall_curve(self, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(precision, recall)`` at every threshold of `thresholds` whose bin holds a voxel.

        scikit-learn's ``precision_recall_curve`` order and end point: thresholds increasing (recall
        falling), then ``(1, 0)``; the same arrays as scikit-learn's on the same scores when no two
        distinct scores share a bin. ``max_points`` (>= 2) thins a longer curve, for plots, to at
        most that many of its points, evenly spaced along its length with both ends kept. Empty
        arrays without positives.
        """
        p = self.n_pos
        if p == 0:
            return np.zeros(0), np.zeros(0)
        tp, fp = self.counts()
        held = (self.pos + self.neg) > 0  # bins >= k include bin k: tp + fp > 0 at these
        precision = np.append(tp[held] / (tp[held] + fp[held]), 1.0)
        recall = np.append(tp[held] / p, 0.0)
        if max_points is not None and precision.size > max_points:
            if max_points < 2:
                raise ValueError(f"max_points must be >= 2, got {max_points}")
            length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(recall), np.diff(precision)))])
            inner = np.searchsorted(length, np.linspace(0.0, length[-1], max_points)[1:-1])
            keep = np.unique(np.concatenate([[0], inner, [precision.size - 1]]))
            precision, recall = precision[keep], recall[keep]
        return precision, recall

    def dice_curve(self) -> np.ndarray:
        """Dice ``2 TP / (TP + FP + P)`` at every threshold of `thresholds`; nan without positives."""
        tp, fp = self.counts()
        p = self.n_pos
        if p == 0:
            return np.full(self.n_bins + 1, np.nan)
        return 2.0 * tp / (tp + fp + p)

    def best_dice(self) -> tuple[float, float]:
        """[DSC]: best Dice over one global threshold (an upper bound: it uses the labels).

        Returns ``(dice, threshold)``, predicting ``score > threshold``; the lowest threshold wins
        ties. ``(nan, nan)`` without positives.
        """
        curve = self.dice_curve()
        if np.isnan(curve).all():
            return float("nan"), float("nan")
        k = int(np.nanargmax(curve))
        return float(curve[k]), float(self.thresholds[k])

    def _bin_above(self, threshold: float) -> int:
        # first bin whose scores all exceed the threshold: bin k >= 1 starts above (k-1) w
        if threshold < 0:
            return 0
        return int(min(np.floor(threshold * self.n_bins / self.max_score) + 1, self.n_bins + 1))

    def false_positive_rate(self, threshold: float) -> float:
        """Fraction of negatives with ``score > threshold``; exact when the threshold is a bin edge
        (a multiple of ``max_score / n_bins``), else the bin holding the threshold counts as above
        it (an upper bound, off by at most one bin)."""
        n = self.n_neg
        if n == 0:
            return float("nan")
        return float(self.neg[self._bin_above(threshold):].sum() / n)

    def true_positive_rate(self, threshold: float) -> float:
        """Fraction of positives with ``score > threshold`` (same binning rule as FPR)."""
        p = self.n_pos
        if p == 0:
            return float("nan")
        return float(self.pos[self._bin_above(threshold):].sum() / p)


def auroc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None, *,
          n_bins: int = 100_000, max_score: float = 1.0) -> float:
    """AUROC of one volume (binned, see `BinnedScores`); nan when one class is missing."""
    return BinnedScores(n_bins, max_score).update(scores, labels, mask).auroc()


def average_precision(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None, *,
                      n_bins: int = 100_000, max_score: float = 1.0) -> float:
    """AUPRC (average precision) of one volume (binned); nan without positives."""
    return BinnedScores(n_bins, max_score).update(scores, labels, mask).average_precision()


# ---------------------------------------------------------------------- Dice and rates


def dice(pred: np.ndarray, label: np.ndarray, *, empty: float = float("nan")) -> float:
    """Dice ``2 |A & B| / (|A| + |B|)`` of two binary masks (non-zero = foreground).

    Both empty gives ``empty`` (nan by default: excluded from `mean_std`); one empty gives 0.
    """
    a = np.asarray(pred) > 0
    b = np.asarray(label) > 0
    if a.shape != b.shape:
        raise ValueError(f"prediction shape {a.shape} doesn't match label shape {b.shape}")
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return float(empty)
    return 2.0 * int(np.count_nonzero(a & b)) / total


def dice_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float,
                      mask: np.ndarray | None = None, *, empty: float = float("nan")) -> float:
    """Dice of ``scores > threshold`` against ``labels > 0``, both restricted to ``mask`` if given."""
    scores = np.asarray(scores)
    labels = np.asarray(labels) > 0
    pred = scores > threshold
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != scores.shape:
            raise ValueError(f"mask shape {mask.shape} doesn't match scores shape {scores.shape}")
        pred &= mask
        labels = labels & mask
    return dice(pred, labels, empty=empty)


def mean_std(values) -> tuple[float, float, int]:
    """Mean, population std and count of the non-nan values (nan, nan, 0 when there are none)."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std()), int(v.size)


def false_positive_counts(scores: np.ndarray, threshold: float,
                          mask: np.ndarray | None = None) -> tuple[int, int]:
    """``(voxels > threshold, voxels)`` among the (masked) voxels of a lesion-free region.

    Sum the pairs over volumes and divide once: pooling voxels, rather than averaging per-volume
    rates, weighs every voxel alike.
    """
    scores = np.asarray(scores)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != scores.shape:
            raise ValueError(f"mask shape {mask.shape} doesn't match scores shape {scores.shape}")
        scores = scores[mask]
    return int(np.count_nonzero(scores > threshold)), int(scores.size)


def false_positive_rate(scores: np.ndarray, threshold: float, mask: np.ndarray | None = None) -> float:
    """Voxel false-positive rate on a healthy volume: fraction of (masked) voxels ``> threshold``."""
    fp, n = false_positive_counts(scores, threshold, mask)
    return fp / n if n else float("nan")


def slice_dice_smoothed(pred: np.ndarray, label: np.ndarray, axis: int = 0, smooth: float = 1.0) -> np.ndarray:
    """Paper-compatible per-slice soft Dice ``(2 sum(p g) + s) / (sum(p) + sum(g) + s)``.

    ``pred`` may be binary or soft (values in [0, 1]); ``label`` is binarised (``> 0``). Returns
    one value per slice along ``axis`` (axial slices are axis 0 in napari order); the paper's
    number is the mean over all slices of the test set, empty slices included (they score 1
    when the prediction is empty too), so concatenate the arrays of all volumes and average.
    """
    p = np.asarray(pred, dtype=np.float64)
    g = (np.asarray(label) > 0).astype(np.float64)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} doesn't match label shape {g.shape}")
    p = np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1)
    g = np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)
    return (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


# ---------------------------------------------------------------------- SSIM


def ssim(x: np.ndarray, y: np.ndarray, *, data_range: float = 1.0) -> float:
    """SSIM with an 11-wide Gaussian window (sigma 1.5) and population covariances (Wang et al.)."""
    from skimage.metrics import structural_similarity

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"image shape {x.shape} doesn't match reconstruction shape {y.shape}")
    return float(structural_similarity(x, y, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def ssim_slices(x: np.ndarray, y: np.ndarray, axis: int = 0, *, data_range: float = 1.0,
                skip_empty: bool = True) -> np.ndarray:
    """2-D SSIM of each slice along ``axis`` (inputs and reconstructions in [0, data_range]).

    ``skip_empty`` drops slices where both images are all zero (outside the brain), whose SSIM of
    1 would only reward the background.
    """
    x = np.moveaxis(np.asarray(x), axis, 0)
    y = np.moveaxis(np.asarray(y), axis, 0)
    if x.shape != y.shape:
        raise ValueError(f"image shape {x.shape} doesn't match reconstruction shape {y.shape}")
    out = [ssim(a, b, data_range=data_range) for a, b in zip(x, y)
           if not (skip_empty and not a.any() and not b.any())]
    return np.asarray(out, dtype=np.float64)
