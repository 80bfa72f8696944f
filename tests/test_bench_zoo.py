"""The pure parts of benchmarks/bench_zoo.py: overrides, summaries, tables, slice choice, figures
(no training, no evaluation run)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NAN = float("nan")


@pytest.fixture(scope="module")
def bz():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_zoo

        yield bench_zoo
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_overrides_only_where_the_paper_config_cannot_run(bz):
    assert bz.parse_overrides(["h_tae:patch-size=2", "h_tae:depth=4"]) == {"h_tae": {"patch_size": "2", "depth": "4"}}
    with pytest.raises(ValueError, match="MODEL:KEY=VALUE"):
        bz.parse_overrides(["h_tae=2"])
    # h_tae needs an image size divisible by 32 (patch 4, 4 stages): 48 px runs only with patch 2
    assert bz.config_error("h_tae", 48, {}) is not None
    assert bz.resolve_overrides(["b_tae", "h_tae"], 48, {"h_tae": {"patch_size": "2"}}) == {"h_tae": {"patch_size": "2"}}
    with pytest.raises(ValueError, match="h_tae: .*divisible by 32.*--override h_tae:KEY=VALUE"):
        bz.resolve_overrides(["b_tae", "h_tae"], 48, {})
    with pytest.raises(ValueError, match="b_tae: its paper config runs at 64 px"):
        bz.resolve_overrides(["b_tae"], 64, {"b_tae": {"depth": "2"}})
    with pytest.raises(ValueError, match="h_tae with .*patch_size.*5.*divisible"):
        bz.resolve_overrides(["h_tae"], 48, {"h_tae": {"patch_size": "5"}})
    with pytest.raises(ValueError, match="vae: not among the models trained"):
        bz.resolve_overrides(["b_tae"], 64, {"vae": {"latent_dim": "8"}})


def _evaluate_json(volume_dices: dict[str, float | None]) -> dict:
    """An evaluate --out-json result as the benchmark reads it (nan written as null)."""
    return {
        "brain": {"auroc": 0.91, "auprc": 0.42, "positives": 30, "negatives": 970,
                  "pr_curve": {"precision": [0.03, 1.0], "recall": [1.0, 0.0]}},
        "dsc_upper_bound": {"dice": 0.5},
        "calibrated": {"dice_pooled": 0.25, "squash_percent": 12.5, "source": "calibrated",
                       "fpr_healthy": 0.0123, "fpr_test_lesion_free_brain": None},
        "ssim": {"healthy_volumes": 0.8},
        "paper_compatible": {"auroc_all_pixels": 0.97, "auprc_all_pixels": 0.35, "slice_dice_smoothed_s1": None},
        "per_kind": {"ms": {"auroc": 0.7, "auprc": 0.1, "dsc_upper_bound": 0.2, "positives": 10},
                     "tumour": {"auroc": None, "auprc": 0.9, "dsc_upper_bound": 0.8, "positives": 20}},
        "per_volume": [{"name": name, "dice_calibrated": dice} for name, dice in volume_dices.items()],
    }


def test_detectors_take_every_compared_score_a_checkpoint_offers(bz, tmp_path):
    from napari_tae.checkpoint import save_checkpoint
    from napari_tae.models import build_model

    model = build_model("b_tae", img_size=32, depth=1, embed_dim=16, num_heads=2, patch_size=8)
    scored = save_checkpoint(tmp_path / "scored.safetensors", model, preprocessing={},
                             scores={"default": "fused", "fused": {"weight": 1.0}, "prior": {"threshold": 0.5}})
    plain = save_checkpoint(tmp_path / "plain.safetensors", model, preprocessing={})
    found = bz.detectors({"b_tae": {"status": "trained", "checkpoint": scored},
                          "vae": {"status": "reused", "checkpoint": plain},
                          "sc_tae": {"status": "failed", "checkpoint": tmp_path / "missing.safetensors"}})
    assert [(d.name, d.scores) for d in found] == [
        ("b_tae", ("residual", "fused", "prior")), ("vae", ("residual",)), ("intensity", ("residual",))]


def test_summary_per_kind_takes_the_volumes_of_that_kind_only(bz):
    kinds = {"case_000": ["ms"], "case_001": ["tumour"], "case_002": ["ms"], "case_003": ["ms", "tumour"]}
    summary = bz.summarise(_evaluate_json({"case_000": 0.2, "case_001": 0.6, "case_002": 0.4, "case_003": 0.9}),
                           kinds)
    overall = summary["overall"]
    assert overall["prevalence"] == pytest.approx(0.03)
    assert math.isnan(overall["fpr_lesion_free_brain"]) and overall["fpr_healthy"] == 0.0123
    assert summary["per_kind"]["ms"]["label_free_dice"] == pytest.approx(0.3)  # case_003 mixes kinds
    assert summary["per_kind"]["ms"]["volumes"] == 2
    assert summary["per_kind"]["tumour"]["label_free_dice"] == pytest.approx(0.6)
    assert math.isnan(summary["per_kind"]["tumour"]["auroc"])
    assert summary["pr_curve"]["recall"] == [1.0, 0.0]
    # a volume without any Dice (nan) does not count
    nan_volume = bz.summarise(_evaluate_json({"case_000": None, "case_002": 0.4}), kinds)
    assert nan_volume["per_kind"]["ms"]["label_free_dice"] == pytest.approx(0.4)


def _results(bz) -> dict:
    kinds = {"case_000": ["ms"], "case_001": ["tumour"]}
    synthetic = bz.summarise(_evaluate_json({"case_000": 0.2, "case_001": 0.6}), kinds)
    real = bz.summarise({**_evaluate_json({"mslub": 0.1}), "per_kind": None}, {})
    real["overall"]["squash_percent"] = NAN  # per-scan thresholds
    return {
        "settings": {"img_size": 64, "epochs": 1, "batch_size": 12, "lr": 1e-4, "sched": "constant", "seed": 0,
                     "data": "/data", "data_seed": 7, "kernel": 5, "mode": "2d"},
        "training": {"b_tae": {"parameters": 2_139_616, "seconds": 250.0, "epochs": 1, "best_epoch": 1,
                               "best_val_loss": 0.123456, "status": "trained", "overrides": {}},
                     "h_tae": {"status": "failed", "overrides": {"patch_size": "2"}}},
        "evaluations": [
            {"model": "b_tae", "split": "synthetic", "score": "residual", "status": "done", **synthetic},
            {"model": "b_tae", "split": "real", "score": "prior", "status": "done", **real},
            {"model": "intensity", "split": "real", "score": "residual", "status": "failed"},
        ],
        "commands": ["python -m training synth --out /data", "# skipped (checkpoint exists): python -m training train"],
    }


def test_tables_from_a_results_dict(bz):
    text = bz.format_tables(_results(bz))
    lines = text.splitlines()
    assert "64 px, 1 epoch, batch 12, lr 0.0001 (constant), seed 0" in text
    assert "| b_tae | 2.14 M | - | 4.2 min | 1 (1) | 0.12346 | trained |" in lines
    assert "| h_tae | n/a | patch_size=2 | n/a | n/a | n/a | failed |" in lines
    assert ("| b_tae | residual | 0.910 | 0.420 | 0.500 | 0.250 | 12.5 % (calibrated) | 1.23 % | n/a | 0.800 |"
            in lines)
    assert "| b_tae | prior | 0.910 | 0.420 | 0.500 | 0.250 | per scan | 1.23 % | n/a | 0.800 |" in lines
    # the real split has its own table, after the synthetic one; no per-kind rows for it
    assert lines.index("## synthetic (synthetic test split)") < lines.index("## real (mslub_patient07)")
    at = lines.index("## Per anomaly kind (synthetic): label-free Dice (mean per volume)")
    assert lines[at + 2] == "| model | score | ms | tumour |"  # kinds present, in KINDS order
    assert lines[at + 4] == "| b_tae | residual | 0.200 | 0.600 |"
    assert lines[at + 5] == ""
    auroc = lines.index("## Per anomaly kind (synthetic): AUROC")
    assert lines[auroc + 4] == "| b_tae | residual | 0.700 | n/a |"
    assert "| b_tae | prior | real | 0.970 | 0.350 | n/a |" in lines  # the paper's variants
    assert "Failed evaluations: intensity real residual" in text
    assert text.rstrip().endswith("```") and "# skipped (checkpoint exists): python -m training train" in lines


def test_lesion_slices_most_lesion_first_apart_and_never_empty(bz):
    counts = np.array([0, 5, 9, 8, 0, 0, 7, 1, 0])
    assert bz.lesion_slices(counts, 1) == [2]
    assert bz.lesion_slices(counts, 3) == [2, 3, 6]
    assert bz.lesion_slices(counts, 2, min_gap=3) == [2, 6]
    assert bz.lesion_slices(counts, 5, min_gap=3) == [2, 6]  # slice 7 is too close, none left
    assert bz.lesion_slices(np.zeros(4), 2) == []


def test_figures_are_small_pngs(bz, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    results = _results(bz)
    size = bz.plot_pr_curves(results["evaluations"], "synthetic", "residual", tmp_path / "pr.png")
    assert 0 < size < bz.FIGURE_BYTES and (tmp_path / "pr.png").stat().st_size == size
    assert bz.plot_pr_curves(results["evaluations"], "real", "residual", tmp_path / "none.png") is None
    # ten detectors of noisy 180 x 200 slices: the worst case for the size
    rng = np.random.default_rng(0)
    brain = np.zeros((180, 200), bool)
    brain[20:160, 30:170] = True
    image = rng.random((180, 200)) * brain
    rows = [(f"model_{i}", (image, rng.random(image.shape), rng.random(image.shape) * brain, image > 0.9,
                            image > 0.95), brain, 0.5) for i in range(10)]
    assert bz.plot_slices(rows, "noise", tmp_path / "slices.png") < bz.FIGURE_BYTES
