"""Anomaly scores and their label-free thresholds (see docs/scores.md).

The mask thresholds a *score* computed from the normalised FLAIR ``x`` (in [0, 1]), the model's
positive residual ``r = brain * max(x - x_hat, 0)`` and the brain mask:

* ``"residual"``: ``r`` (Ghorbel et al. 2022, https://arxiv.org/abs/2207.02059);
* ``"fused"``: ``brain * (x + w * r)``, the FLAIR intensity plus the weighted residual, both in
  normalised intensity units; ``w`` is picked on synthetic anomalous validation volumes;
* ``"prior"``: ``r * (x > t)``, the hard hyper-intensity prior of Baur et al. 2021
  (https://arxiv.org/abs/2004.03271): residual kept only where the FLAIR is brighter than ``t``, a
  percentile of healthy brain intensity.

A checkpoint stores, in its ``scores`` metadata, the parameters of the scores it offers, its
default score and a calibration table: for every score, median kernel and mode, the 99th, 99.5th
and 99.9th percentiles of the median-filtered score on healthy brain voxels; and, per score, which
of the three is its label-free threshold (``percentiles``; the 99th where absent). Without a
calibrated value the threshold falls back to a robust per-scan one (:func:`robust_squash`).

Percentiles of median-filtered scores are exact and fast without the median filter
(:func:`napari_tae.postprocess.filtered_quantiles`).

numpy only: no torch, no napari.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .options import MEDIAN_MODES, check_median_kernel
from .postprocess import (
    CALIBRATION_PERCENTILES,
    _check_brain,
    _filtered_counter,
    _pooled,
    _smallest,
    filtered_quantiles,
)

__all__ = [
    "FUSED_WEIGHTS",
    "PRIOR_PERCENTILES",
    "ROBUST_MADS",
    "ROBUST_MAX_FRACTION",
    "SCORES",
    "SQUASH_FLOOR",
    "TABLE_KERNELS",
    "TABLE_MODES",
    "ScoreSpec",
    "anomaly_score",
    "available_scores",
    "calibrated_squash",
    "calibration_table",
    "check_score_meta",
    "default_score",
    "label_free_squash",
    "robust_squash",
    "threshold_percentile",
    "score_spec",
    "squash_limit",
]

SCORES: tuple[str, ...] = ("residual", "fused", "prior")
#: Candidate weights of the fused score, picked by AUPRC on synthetic anomalous validation volumes.
#: They stop at 1 (the residual never outweighs the FLAIR): on synthetic lesions AUPRC grows with
#: ``w`` without bound, on real scans it peaks between 0.5 and 1 (docs/scores.md, "The weight's range").
FUSED_WEIGHTS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
#: Candidate percentiles of healthy brain intensity for the prior's threshold, picked the same way.
PRIOR_PERCENTILES: tuple[float, ...] = (50.0, 75.0, 90.0, 95.0)
#: Median kernels and modes of the calibration table: every value the widget offers.
TABLE_KERNELS: tuple[int, ...] = tuple(range(1, 16, 2))
TABLE_MODES: tuple[str, ...] = MEDIAN_MODES
#: Per-scan fallback: median + ROBUST_MADS * 1.4826 * MAD of the brain's filtered score ...
ROBUST_MADS = 3.0
#: ... and never below the scan's own (1 - ROBUST_MAX_FRACTION) quantile: at most 2 % of the brain.
ROBUST_MAX_FRACTION = 0.02


# --------------------------------------------------------------------------------------------
# the scores
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreSpec:
    """One score with its parameters (``weight`` for fused, ``threshold`` for prior)."""

    name: str = "residual"
    weight: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.name not in SCORES:
            raise ValueError(f"unknown score {self.name!r}; choose one of {', '.join(SCORES)}")
        if self.name == "fused" and not (self.weight is not None and math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"the fused score needs a finite weight >= 0, got {self.weight!r}")
        if self.name == "prior" and not (self.threshold is not None and math.isfinite(self.threshold)):
            raise ValueError(f"the prior score needs a finite intensity threshold, got {self.threshold!r}")

    @property
    def upper(self) -> float:
        """Largest value the score can take (normalised intensities are clipped to [0, 1])."""
        return 1.0 + float(self.weight) if self.name == "fused" else 1.0

    def compute(self, normalised: np.ndarray, residual: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
        return anomaly_score(self.name, normalised, residual, brain, weight=self.weight, threshold=self.threshold)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.name == "fused":
            out["weight"] = float(self.weight)
        if self.name == "prior":
            out["threshold"] = float(self.threshold)
        return out


def anomaly_score(
    name: str,
    normalised: np.ndarray,
    residual: np.ndarray,
    brain: np.ndarray | None,
    *,
    weight: float | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """The score the mask thresholds, float32, 0 outside the brain.

    Args:
        name: ``"residual"``, ``"fused"`` or ``"prior"``.
        normalised: Normalised FLAIR ``x``.
        residual: Positive residual ``r`` (:func:`napari_tae.postprocess.residual`).
        brain: Brain mask, or None for no masking.
        weight: ``w`` of the fused score ``x + w * r``.
        threshold: Intensity ``t`` of the prior score ``r * (x > t)``.
    """
    x = np.asarray(normalised, dtype=np.float32)
    r = np.asarray(residual, dtype=np.float32)
    if x.shape != r.shape:
        raise ValueError(f"residual shape {r.shape} doesn't match the normalised volume {x.shape}")
    brain = _check_brain(brain, x.shape)
    if name == "residual":
        score = r.copy()
    elif name == "fused":
        score = x + np.float32(weight) * r
    elif name == "prior":
        score = np.where(x > np.float32(threshold), r, np.float32(0.0))
    else:
        raise ValueError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
    if brain is not None:
        score[~brain] = 0.0
    return score.astype(np.float32, copy=False)


def _score_meta(meta: Any) -> dict[str, Any]:
    return dict(getattr(meta, "scores", None) or {})


def available_scores(meta: Any) -> tuple[str, ...]:
    """Scores a checkpoint offers: the residual, plus those whose parameters it stores."""
    stored = _score_meta(meta)
    return tuple(s for s in SCORES if s == "residual" or isinstance(stored.get(s), dict))


def default_score(meta: Any) -> str:
    """The checkpoint's default score (chosen by measurement, see the checkpoints README)."""
    name = _score_meta(meta).get("default", "residual")
    return name if name in available_scores(meta) else "residual"


def score_spec(meta: Any, name: str | None = None) -> ScoreSpec:
    """The score ``name`` (None: the default) with the checkpoint's parameters.

    Raises:
        ValueError: unknown score, or one the checkpoint has no parameters for.
    """
    name = default_score(meta) if name is None else name
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
    if name not in available_scores(meta):
        model = getattr(meta, "model_name", None) or "this model"
        raise ValueError(f"{model} has no calibrated {name!r} score (available: "
                         f"{', '.join(available_scores(meta))}); recalibrate it with python -m training calibrate")
    params = _score_meta(meta).get(name, {})
    return ScoreSpec(name, weight=params.get("weight"), threshold=params.get("threshold"))


def robust_squash(score: np.ndarray, brain: np.ndarray, kernel: int = 5, mode: str = "2d") -> float:
    """Per-scan label-free threshold in percent, for a score without a calibrated value.

    ``median + ROBUST_MADS * 1.4826 * MAD`` of the brain's median-filtered score (a robust
    ``3 sigma`` above the bulk of the tissue), raised where needed to the scan's own
    ``1 - ROBUST_MAX_FRACTION`` quantile, so the mask never covers more than 2 % of the brain.
    Median and MAD are exact (lower medians), computed by vote counts like
    :func:`filtered_quantiles`.
    """
    kernel = check_median_kernel(kernel)
    scores, brains, n = _pooled([score], [brain])
    values = np.unique(scores[0])
    count = _filtered_counter(scores, brains, kernel, mode)
    median = _smallest(values, lambda t: count(t) <= n * 0.5)
    # MAD: the smallest d with at most half of the filtered values farther than d from the median
    deviations = np.unique(np.abs(values - np.float32(median)))
    mad = _smallest(deviations, lambda d: count(median + d) + count(median - d, above=False) <= n * 0.5)
    cap = _smallest(values, lambda t: count(t) <= n * ROBUST_MAX_FRACTION)
    return 100.0 * max(median + ROBUST_MADS * 1.4826 * mad, cap)


# --------------------------------------------------------------------------------------------
# the calibration table
# --------------------------------------------------------------------------------------------
def calibration_table(
    specs: Sequence[ScoreSpec],
    healthy: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    kernels: Sequence[int] = TABLE_KERNELS,
    modes: Sequence[str] = TABLE_MODES,
) -> list[dict[str, Any]]:
    """Rows ``{score, kernel, mode, p99, p99.5, p99.9}`` (percent) from healthy volumes.

    Args:
        specs: The scores to calibrate.
        healthy: ``(normalised, residual, brain)`` of each healthy volume (lesion voxels, if any,
            already removed from the brain).
        kernels, modes: Median settings to calibrate for.
    """
    rows = []
    for spec in specs:
        scores = [spec.compute(x, r, b) for x, r, b in healthy]
        brains = [np.asarray(b, bool) for _, _, b in healthy]
        for mode in modes:
            for kernel in kernels:
                q = filtered_quantiles(scores, brains, CALIBRATION_PERCENTILES, kernel, mode)
                row: dict[str, Any] = {"score": spec.name, "kernel": int(kernel), "mode": mode}
                row.update({f"p{p:g}": 100.0 * v for p, v in zip(CALIBRATION_PERCENTILES, q)})
                rows.append(row)
    return rows


def threshold_percentile(meta: Any, score: str) -> float:
    """The calibration percentile that is ``score``'s label-free threshold (99 where not chosen)."""
    chosen = _score_meta(meta).get("percentiles") or {}
    return float(chosen.get(score, CALIBRATION_PERCENTILES[0]))


def calibrated_squash(meta: Any, score: str, kernel: int, mode: str) -> float | None:
    """The calibrated default squash (percent) for this score and median, or None.

    Looks the table up at the score's :func:`threshold_percentile`; a checkpoint from before the
    table (one ``calibration`` for the residual) keeps its single value for every kernel, as it
    always had.
    """
    stored = _score_meta(meta)
    table = stored.get("table")
    if table:
        key = f"p{threshold_percentile(meta, score):g}"
        for row in table:
            if row.get("score") == score and row.get("kernel") == int(kernel) and row.get("mode") == mode:
                return float(row[key])
        return None
    calibration = getattr(meta, "calibration", None) or {}
    if score == "residual" and "default" in calibration:
        return float(calibration["default"])
    return None


def label_free_squash(
    meta: Any,
    score: str,
    kernel: int,
    mode: str,
    values: np.ndarray | None = None,
    brain: np.ndarray | None = None,
) -> tuple[float, str]:
    """``(squash, source)``: calibrated, else per scan from ``values`` (the score), else 1 %.

    Sources: ``"calibrated"``, ``"per-scan robust"`` (:func:`robust_squash`) and ``"paper
    default"`` (the S_1% of Ghorbel et al., only when no score volume is given).
    """
    calibrated = calibrated_squash(meta, score, kernel, mode)
    if calibrated is not None:
        return calibrated, "calibrated"
    if values is not None and brain is not None and np.any(brain):
        return robust_squash(values, brain, kernel, mode), "per-scan robust"
    return 1.0, "paper default"


#: The squash control never ends below 20 % (the paper's S_1% and a model's 10-20 % stay reachable).
SQUASH_FLOOR = 20.0


def squash_limit(meta: Any, spec: ScoreSpec) -> float:
    """Top of the squash control (percent): twice the score's largest calibrated value (at least
    :data:`SQUASH_FLOOR`), at most the score's whole range; the whole range without calibration."""
    upper = 100.0 * spec.upper
    rows = [r for r in _score_meta(meta).get("table") or [] if r.get("score") == spec.name]
    values = [float(v) for r in rows for k, v in r.items() if k.startswith("p")]
    if not rows and spec.name == "residual":  # a checkpoint from before the table
        values = [float(v) for v in (getattr(meta, "calibration", None) or {}).values()]
    return min(upper, max(SQUASH_FLOOR, 2.0 * max(values))) if values else upper


def check_score_meta(scores: Any) -> str | None:
    """What is wrong with a checkpoint's ``scores`` metadata, or None when it is usable."""
    if not isinstance(scores, dict):
        return f"metadata field 'scores' should be dict, got {type(scores).__name__}"
    default = scores.get("default", "residual")
    if default not in SCORES:
        return f"unknown default score {default!r} (known: {', '.join(SCORES)})"
    for name, key in (("fused", "weight"), ("prior", "threshold")):
        if name in scores:
            params = scores[name]
            value = params.get(key) if isinstance(params, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                return f"score {name!r} lacks a numeric {key!r}"
    if default != "residual" and default not in scores:
        return f"default score {default!r} has no parameters"
    percentiles = scores.get("percentiles", {}) or {}
    if not isinstance(percentiles, dict):
        return f"metadata field 'scores.percentiles' should be dict, got {type(percentiles).__name__}"
    for name, value in percentiles.items():
        if name not in SCORES or value not in CALIBRATION_PERCENTILES:
            return (f"threshold percentile {value!r} of score {name!r} is not one of the calibrated "
                    f"{', '.join(f'{p:g}' for p in CALIBRATION_PERCENTILES)}")
    for row in scores.get("table", []) or []:
        if not isinstance(row, dict) or row.get("score") not in SCORES or row.get("mode") not in TABLE_MODES \
                or not isinstance(row.get("kernel"), int) \
                or not isinstance(row.get(f"p{percentiles.get(row['score'], CALIBRATION_PERCENTILES[0]):g}"),
                                  (int, float)):
            return f"malformed calibration table row {row!r}"
    return None
