"""Post-processing: the fast majority-vote mask against the scipy median reference, and the
component / calibration helpers against skimage, numpy and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import remove_small_objects

from napari_tae.postprocess import (
    anomaly_mask,
    calibrate,
    label_lesions,
    lesion_table,
    median_filtered,
    ml_to_voxels,
    remove_small,
    residual,
    slice_mask,
)

KERNELS = (1, 3, 5, 7, 15)


def _random(shape, seed):
    return np.random.default_rng(seed).random(shape, dtype=np.float32) * 0.04


def _quantised(shape, seed):
    # many values exactly at the thresholds tested (0.01, 0.02): ties must not survive
    levels = np.array([0.0, 0.01, 0.02, 0.03], dtype=np.float32)
    return levels[np.random.default_rng(seed).integers(0, 4, shape)]


def _structured(shape, seed):
    rng = np.random.default_rng(seed)
    r = np.abs(rng.normal(0, 0.006, shape)).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    for _ in range(4):
        c = [rng.integers(0, s) for s in shape]
        rad = rng.uniform(1.5, 5)
        blob = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < rad**2
        r[blob] += rng.uniform(0.02, 0.3)
    r[:, :2] = 0  # a flat zero border, like the background around the brain
    return r


DATA = {"random": _random, "quantised": _quantised, "structured": _structured}


@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_fast_mask_equals_median_then_threshold(kind, kernel, mode):
    # (6, 23, 18): odd/even in-plane sizes; the 15-kernel radius exceeds the 6-slice depth, which
    # exercises repeated reflection at the borders
    r = DATA[kind]((6, 23, 18), seed=kernel)
    filtered = median_filtered(r, kernel, mode)
    size = (kernel, kernel, kernel) if mode == "3d" else (1, kernel, kernel)
    np.testing.assert_array_equal(filtered, ndi.median_filter(r, size=size))
    for squash in (0.0, 1.0, 2.0, 2.5):
        fast = anomaly_mask(r, kernel=kernel, squash=squash, mode=mode)
        assert fast.dtype == bool and fast.shape == r.shape
        np.testing.assert_array_equal(fast, filtered > squash / 100)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_mask_on_tiny_and_2d_inputs(kernel):
    for shape in [(1, 1, 1), (2, 1, 5), (3, 4, 2)]:
        r = _random(shape, seed=3)
        for mode in ("2d", "3d"):
            np.testing.assert_array_equal(
                anomaly_mask(r, kernel=kernel, squash=2, mode=mode),
                median_filtered(r, kernel, mode) > 0.02,
            )
    r2 = _structured((1, 40, 33), seed=1)[0]
    np.testing.assert_array_equal(
        anomaly_mask(r2, kernel=kernel, squash=1),
        ndi.median_filter(r2, size=kernel) > 0.01,
    )


@pytest.mark.parametrize("kernel", (1, 5, 7))
@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_slice_mask_equals_volume_mask(kernel, mode):
    r = _structured((7, 30, 25), seed=5)
    brain = np.zeros(r.shape, bool)
    brain[:, 3:-3, 2:-2] = True
    full = anomaly_mask(r, kernel=kernel, squash=1.5, mode=mode, brain=brain)
    for z in range(r.shape[0]):  # includes both ends, where 3d windows reflect
        one = slice_mask(r, kernel=kernel, squash=1.5, mode=mode, index=z, brain=brain)
        np.testing.assert_array_equal(one, full[z])
        if mode == "2d":
            np.testing.assert_array_equal(
                slice_mask(r[z], kernel=kernel, squash=1.5, brain=brain[z]), full[z]
            )
    np.testing.assert_array_equal(
        slice_mask(r, kernel=kernel, squash=1.5, mode=mode, index=-1, brain=brain), full[-1]
    )


def test_higher_squash_gives_subset():
    r = _structured((8, 40, 40), seed=2)
    for mode in ("2d", "3d"):
        prev = anomaly_mask(r, kernel=5, squash=0.0, mode=mode)
        for squash in np.linspace(0.2, 20, 25):
            cur = anomaly_mask(r, kernel=5, squash=squash, mode=mode)
            assert not (cur & ~prev).any(), f"mask grew at squash {squash} ({mode})"
            prev = cur
        assert prev.sum() < anomaly_mask(r, kernel=5, squash=0.0, mode=mode).sum()


def test_kernel_one_is_no_filtering():
    r = _structured((5, 30, 30), seed=4)
    np.testing.assert_array_equal(median_filtered(r, 1), r)
    for mode in ("2d", "3d"):
        np.testing.assert_array_equal(anomaly_mask(r, kernel=1, squash=1, mode=mode), r > 0.01)


def test_brain_and_min_size_applied_after_vote():
    r = _structured((6, 32, 32), seed=7)
    brain = np.zeros(r.shape, bool)
    brain[1:5, 4:28, 4:28] = True
    ref = (ndi.median_filter(r, size=(1, 5, 5)) > 0.01) & brain
    np.testing.assert_array_equal(anomaly_mask(r, squash=1, brain=brain), ref)
    expected = remove_small_objects(ref, max_size=9, connectivity=3)
    np.testing.assert_array_equal(anomaly_mask(r, squash=1, brain=brain, min_size=10), expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda r: median_filtered(r, 4),
        lambda r: median_filtered(r, 0),
        lambda r: anomaly_mask(r, kernel=2),
        lambda r: anomaly_mask(r, kernel=3.0),
        lambda r: anomaly_mask(r, mode="xy"),
        lambda r: anomaly_mask(r[0], mode="3d"),
        lambda r: anomaly_mask(r, squash=float("nan")),
        lambda r: anomaly_mask(r, brain=np.ones((2, 2), bool)),
        lambda r: slice_mask(r, index=9),
        lambda r: slice_mask(r[0], mode="3d"),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(_random((3, 8, 8), seed=0))


def test_even_kernel_message_names_the_problem():
    with pytest.raises(ValueError, match="odd integer >= 1, got 4"):
        anomaly_mask(_random((2, 5, 5), 0), kernel=4)


def test_residual_is_positive_part_inside_brain():
    rng = np.random.default_rng(0)
    x, x_hat = rng.random((2, 3, 6, 6))
    brain = rng.random((3, 6, 6)) > 0.3
    r = residual(x, x_hat, brain)
    assert r.dtype == np.float32
    np.testing.assert_allclose(r, brain * np.maximum(x - x_hat, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(residual(x, np.zeros_like(x), None), x.astype(np.float32))
    with pytest.raises(ValueError, match="doesn't match"):
        residual(x, x_hat[:2], brain)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("min_size", [0, 1, 2, 5, 30])
def test_remove_small_matches_skimage(connectivity, min_size):
    mask = np.random.default_rng(connectivity).random((10, 30, 30)) > 0.7
    ours = remove_small(mask, min_size, connectivity=connectivity)
    ref = remove_small_objects(mask, max_size=max(min_size - 1, 0), connectivity=connectivity)
    np.testing.assert_array_equal(ours, ref)


def test_remove_small_2d_default_is_full_connectivity():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one component of 2 with 8-connectivity
    np.testing.assert_array_equal(remove_small(mask, 2), mask)
    assert not remove_small(mask, 2, connectivity=1).any()


def test_ml_to_voxels():
    assert ml_to_voxels(0.1, (1, 1, 1)) == 100
    assert ml_to_voxels(0.1, (2.0, 1.0, 1.0)) == 50
    assert ml_to_voxels(0.01, (3.0, 1.0, 1.0)) == 4  # 3.33 voxels -> 4 needed to reach 0.01 mL
    assert ml_to_voxels(0, (1, 1, 1)) == 0
    with pytest.raises(ValueError):
        ml_to_voxels(1, (0, 1, 1))


def test_lesion_table_hand_computed():
    mask = np.zeros((8, 9, 10), bool)
    res = np.zeros(mask.shape, np.float32)
    mask[1:3, 1:3, 1:3] = True  # 8-voxel cube, centroid (1.5, 1.5, 1.5)
    res[1:3, 1:3, 1:3] = 0.25
    res[2, 2, 2] = 0.75  # mean = (7 * 0.25 + 0.75) / 8 = 0.3125
    mask[5, 6, 7] = True  # single voxel
    res[5, 6, 7] = 0.5
    mask[6, 7, 8] = True  # touches the previous voxel by a corner only
    res[6, 7, 8] = 0.1
    spacing, origin = (2.0, 1.0, 0.5), (-10.0, 20.0, 5.0)  # 1 mm^3 voxels

    table = lesion_table(mask, res, spacing, origin)
    assert [row["label"] for row in table] == [1, 2]
    big, pair = table
    assert big["voxels"] == 8 and big["volume_ml"] == pytest.approx(0.008)
    assert big["max_residual"] == pytest.approx(0.75)
    assert big["mean_residual"] == pytest.approx(0.3125)
    assert big["centroid_voxel"] == pytest.approx((1.5, 1.5, 1.5))
    assert big["centroid_mm"] == pytest.approx((-7.0, 21.5, 5.75))
    assert pair["voxels"] == 2 and pair["volume_ml"] == pytest.approx(0.002)
    assert pair["max_residual"] == pytest.approx(0.5)
    assert pair["mean_residual"] == pytest.approx(0.3)
    assert pair["centroid_voxel"] == pytest.approx((5.5, 6.5, 7.5))
    assert pair["centroid_mm"] == pytest.approx((1.0, 26.5, 8.75))

    # face connectivity splits the corner-touching pair: three lesions, the cube first
    face = lesion_table(mask, res, spacing, origin, connectivity=1)
    assert [row["voxels"] for row in face] == [8, 1, 1]
    assert lesion_table(np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3)), (1, 1, 1)) == []


def test_label_lesions_numbered_by_size():
    mask = np.zeros((5, 12, 12), bool)
    mask[0, 0, 0] = True
    mask[2:4, 5:9, 5:9] = True
    mask[4, 0:3, 10] = True
    labels, sizes = label_lesions(mask)
    assert sizes.tolist() == [32, 3, 1]
    assert labels[2, 5, 5] == 1 and labels[4, 0, 10] == 2 and labels[0, 0, 0] == 3
    assert [int((labels == i).sum()) for i in (1, 2, 3)] == sizes.tolist()
    table = lesion_table(mask, mask.astype(np.float32), (1, 1, 1))
    assert [row["voxels"] for row in table] == sizes.tolist()
    assert lesion_table(None, mask.astype(np.float32), (1, 1, 1), labels=labels) == table


def test_lesion_table_from_given_labels_keeps_their_ids():
    rng = np.random.default_rng(3)
    mask = rng.random((6, 20, 20)) > 0.8
    res = rng.random(mask.shape).astype(np.float32)
    labels, _ = label_lesions(mask)
    assert lesion_table(mask, res, (1.0, 2.0, 3.0), (1, 2, 3)) == lesion_table(
        None, res, (1.0, 2.0, 3.0), (1, 2, 3), labels=labels
    )
    painted = np.zeros((4, 5, 5), np.int32)
    painted[0, 0, :2] = 7  # ids with gaps, as after painting; one id may span separate blobs
    painted[3, 4, 4] = 7
    painted[2, 2, 2] = 3
    table = lesion_table(None, np.ones(painted.shape), (1, 1, 1), labels=painted)
    assert [(row["label"], row["voxels"]) for row in table] == [(7, 3), (3, 1)]
    assert table[0]["centroid_voxel"] == pytest.approx((1.0, 4 / 3, 5 / 3))


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_calibrate_matches_numpy_percentile(mode):
    rs = [_structured((5, 30, 30), seed=s).astype(np.float32) for s in (10, 11)]
    brains = [np.zeros(r.shape, bool) for r in rs]
    brains[0][:, 5:25, 5:25] = True
    brains[1][1:4, 2:28, 3:20] = True
    size = (3, 3, 3) if mode == "3d" else (1, 3, 3)
    pooled = np.concatenate([ndi.median_filter(r, size=size)[b] for r, b in zip(rs, brains)])
    # the smallest filtered value with at most 1 % (0.5 %, 0.1 %) of the brain above it
    expected = np.percentile(pooled, [99, 99.5, 99.9], method="inverted_cdf") * 100

    cal = calibrate(iter(rs), iter(brains), kernel=3, mode=mode)
    assert set(cal) == {"p99", "p99.5", "p99.9", "default"}
    np.testing.assert_allclose([cal["p99"], cal["p99.5"], cal["p99.9"]], expected, rtol=1e-6)
    assert cal["default"] == cal["p99"]
    # the calibrated squash flags at most 1 % of the calibration brain voxels
    positives = sum(
        anomaly_mask(r, kernel=3, squash=cal["default"], mode=mode, brain=b).sum()
        for r, b in zip(rs, brains)
    )
    assert 0 < positives <= 0.01 * pooled.size


@pytest.mark.parametrize("kernel, mode", [(1, "2d"), (5, "2d"), (7, "3d")])
def test_filtered_quantiles_match_the_median_filter(kernel, mode):
    from napari_tae.postprocess import filtered_quantiles

    rng = np.random.default_rng(3)
    scores = [(rng.random((6, 24, 28), dtype=np.float32) ** 3) for _ in range(2)]
    brains = [np.zeros(s.shape, bool) for s in scores]
    brains[0][:, 4:20, 3:25] = True
    brains[1][1:5, 2:22, 5:27] = True
    pooled = np.concatenate([median_filtered(s, kernel, mode)[b] for s, b in zip(scores, brains)])
    percentiles = [10, 50, 90, 99, 99.9]
    expected = np.percentile(pooled, percentiles, method="inverted_cdf")
    np.testing.assert_array_equal(filtered_quantiles(scores, brains, percentiles, kernel, mode),
                                  expected.astype(np.float32))


def test_calibrate_rejects_empty_and_mismatched():
    r = _random((2, 6, 6), 0)
    with pytest.raises(ValueError, match="no brain voxels"):
        calibrate([r], [np.zeros(r.shape, bool)])
    with pytest.raises(ValueError, match="no brain mask"):
        calibrate([r, r], [np.ones(r.shape, bool)])
