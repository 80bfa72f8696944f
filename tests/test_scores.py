"""Anomaly scores and label-free thresholds: hand-computed scores, the robust per-scan threshold
against scipy's median filter, the calibration table lookup (old checkpoints included) and the
intensity baseline's calibration on healthy and real volumes."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_tae.postprocess import anomaly_mask
from napari_tae.scores import (
    ROBUST_MAX_FRACTION,
    SQUASH_FLOOR,
    ScoreSpec,
    anomaly_score,
    available_scores,
    calibrated_squash,
    calibration_table,
    check_score_meta,
    default_score,
    label_free_squash,
    robust_squash,
    score_spec,
    squash_limit,
    threshold_percentile,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "mslub_patient07"


def test_scores_by_hand():
    x = np.array([[0.2, 0.5, 0.9, 0.7]], np.float32)
    r = np.array([[0.1, 0.0, 0.4, 0.3]], np.float32)
    brain = np.array([[True, True, True, False]])
    np.testing.assert_array_equal(anomaly_score("residual", x, r, brain), np.float32([[0.1, 0.0, 0.4, 0.0]]))
    # fused: x + w r inside the brain
    np.testing.assert_allclose(anomaly_score("fused", x, r, brain, weight=0.5),
                               [[0.25, 0.5, 1.1, 0.0]], rtol=1e-6)
    # prior: the residual only where the FLAIR is above the threshold
    np.testing.assert_array_equal(anomaly_score("prior", x, r, brain, threshold=0.3), np.float32([[0.0, 0.0, 0.4, 0.0]]))
    assert ScoreSpec("fused", weight=1.5).upper == 2.5 and ScoreSpec("prior", threshold=0.5).upper == 1.0
    with pytest.raises(ValueError, match="needs a finite weight"):
        ScoreSpec("fused")
    with pytest.raises(ValueError, match="unknown score 'edges'"):
        anomaly_score("edges", x, r, brain)


META = SimpleNamespace(
    model_name="m", calibration={"p99": 9.0, "default": 9.0},
    scores={"default": "fused", "fused": {"weight": 0.5}, "prior": {"threshold": 0.6},
            "table": [{"score": "residual", "kernel": 5, "mode": "2d", "p99": 12.0, "p99.5": 14.0, "p99.9": 20.0},
                      {"score": "residual", "kernel": 3, "mode": "3d", "p99": 11.0, "p99.5": 13.0, "p99.9": 15.0},
                      {"score": "fused", "kernel": 5, "mode": "2d", "p99": 70.0, "p99.5": 80.0, "p99.9": 90.0}]})
OLD = SimpleNamespace(model_name="old", calibration={"p99": 9.0, "default": 9.0}, scores={})


def test_score_specs_from_metadata():
    assert available_scores(META) == ("residual", "fused", "prior")
    assert default_score(META) == "fused" and score_spec(META) == ScoreSpec("fused", weight=0.5)
    assert score_spec(META, "prior") == ScoreSpec("prior", threshold=0.6)
    # old checkpoints (and None) offer the residual only, and say so in one line
    assert available_scores(OLD) == ("residual",) and default_score(None) == "residual"
    with pytest.raises(ValueError, match="old has no calibrated 'fused' score"):
        score_spec(OLD, "fused")


def test_calibration_table_lookup_and_old_checkpoints():
    assert calibrated_squash(META, "residual", 5, "2d") == 12.0
    assert calibrated_squash(META, "residual", 3, "3d") == 11.0
    assert calibrated_squash(META, "fused", 5, "2d") == 70.0
    assert calibrated_squash(META, "residual", 7, "2d") is None  # not in the table
    # a single calibration from before the table keeps applying to the residual, any kernel
    assert calibrated_squash(OLD, "residual", 7, "3d") == 9.0
    assert label_free_squash(OLD, "residual", 7, "3d") == (9.0, "calibrated")
    assert label_free_squash(None, "residual", 5, "2d") == (1.0, "paper default")
    # slider cap: twice the largest calibrated value, within the score's range (fused: 1 + w)
    assert squash_limit(META, score_spec(META, "fused")) == 150.0
    assert squash_limit(META, ScoreSpec()) == 40.0
    assert squash_limit(OLD, ScoreSpec()) == SQUASH_FLOOR
    assert squash_limit(None, ScoreSpec()) == 100.0


def test_chosen_threshold_percentile_is_looked_up():
    chosen = SimpleNamespace(**{**vars(META), "scores": {**META.scores, "percentiles": {"fused": 99.9,
                                                                                        "residual": 99.5}}})
    assert threshold_percentile(chosen, "fused") == 99.9 and threshold_percentile(chosen, "prior") == 99.0
    assert calibrated_squash(chosen, "fused", 5, "2d") == 90.0
    assert calibrated_squash(chosen, "residual", 3, "3d") == 13.0
    assert label_free_squash(chosen, "residual", 5, "2d") == (14.0, "calibrated")
    assert threshold_percentile(META, "fused") == 99.0 and threshold_percentile(None, "fused") == 99.0
    assert check_score_meta(chosen.scores) is None
    assert "not one of the calibrated 99, 99.5, 99.9" in check_score_meta({**chosen.scores,
                                                                          "percentiles": {"fused": 98.0}})
    # a row lacking the chosen percentile is malformed
    bad = {**META.scores, "percentiles": {"fused": 99.9}, "table": [{"score": "fused", "kernel": 5, "mode": "2d",
                                                                     "p99": 70.0}]}
    assert "malformed calibration table row" in check_score_meta(bad)


def _robust_reference(score, brain, size):
    # the lower median and MAD of the scipy-filtered brain values
    f = ndi.median_filter(score, size=size)[brain]
    med = np.percentile(f, 50, method="inverted_cdf")
    mad = np.percentile(np.abs(f - med), 50, method="inverted_cdf")
    cap = np.percentile(f, 100 * (1 - ROBUST_MAX_FRACTION), method="inverted_cdf")
    return 100 * max(med + 3 * 1.4826 * mad, cap)


@pytest.mark.parametrize("mode, size", [("2d", (1, 5, 5)), ("3d", (5, 5, 5))])
def test_robust_squash_against_scipy(mode, size):
    rng = np.random.default_rng(0)
    score = (rng.normal(0.4, 0.05, (8, 30, 30)) + (rng.random((8, 30, 30)) < 0.05) * 0.5).astype(np.float32)
    brain = np.zeros(score.shape, bool)
    brain[:, 3:27, 4:26] = True
    squash = robust_squash(score, brain, 5, mode)
    assert squash == pytest.approx(_robust_reference(score, brain, size), rel=1e-5)
    flagged = anomaly_mask(score, kernel=5, squash=squash, mode=mode, brain=brain).sum()
    assert flagged <= ROBUST_MAX_FRACTION * brain.sum()
    assert label_free_squash(OLD, "prior", 5, mode, score, brain) == (squash, "per-scan robust")


def test_robust_squash_caps_a_flat_score():
    # a score with zero spread: median + k MAD = median would flag every voxel above it
    score = np.zeros((4, 20, 20), np.float32)
    score[:, :10] = 0.3
    brain = np.ones(score.shape, bool)
    squash = robust_squash(score, brain, 3, "2d")
    assert anomaly_mask(score, kernel=3, squash=squash, brain=brain).mean() <= ROBUST_MAX_FRACTION


def test_calibration_table_rows_flag_one_percent():
    rng = np.random.default_rng(1)
    healthy = []
    for _ in range(2):
        x = rng.random((6, 24, 24), dtype=np.float32)
        r = rng.random((6, 24, 24), dtype=np.float32) * 0.1
        healthy.append((x, r, np.ones(x.shape, bool)))
    specs = [ScoreSpec(), ScoreSpec("fused", weight=1.0)]
    table = calibration_table(specs, healthy, kernels=(1, 3), modes=("2d", "3d"))
    assert [(t["score"], t["kernel"], t["mode"]) for t in table] == [
        (s, k, m) for s in ("residual", "fused") for m in ("2d", "3d") for k in (1, 3)]
    meta = SimpleNamespace(scores={"fused": {"weight": 1.0}, "table": table})
    for row in table:
        spec = score_spec(meta, row["score"])
        assert row["p99"] <= row["p99.5"] <= row["p99.9"] <= 100 * spec.upper
        flagged = sum(anomaly_mask(spec.compute(*h), kernel=row["kernel"], mode=row["mode"], squash=row["p99"],
                                   brain=h[2]).sum() for h in healthy)
        assert 0 < flagged <= 0.01 * sum(h[2].sum() for h in healthy)


def _flagged_fraction(volume, brain=None):
    from napari_tae.checkpoint import load_model
    from napari_tae.inference import segment

    model, meta = load_model("intensity")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = segment(volume, model, meta, brain=brain, device="cpu")
    assert seg.settings["squash_source"] == "calibrated" and seg.settings["score"] == "residual"
    return seg.mask.sum() / seg.brain.sum()


def test_intensity_calibration_flags_little_of_a_healthy_brain():
    from napari_tae.synthetic import healthy_volume

    # a subject (seed) other than the calibration volumes'
    data, _ = healthy_volume(7, shape=(96, 112, 96))
    assert _flagged_fraction(np.ascontiguousarray(data.transpose(2, 1, 0))) < 0.02


@pytest.mark.skipif(not REAL.is_dir(), reason="real data folder ../shared/data absent")
def test_intensity_calibration_flags_under_3_percent_of_a_real_brain():
    from napari_tae.io import load_volume

    volume = load_volume(REAL / "FLAIR.nii.gz")
    assert _flagged_fraction(volume) < 0.03
