"""Evaluation metrics against scikit-learn, scikit-image and hand-computed cases."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from training import metrics as M


def _random_case(seed, n=5000, quantise=None):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.1
    # positives score higher on average, with heavy overlap
    scores = np.clip(rng.normal(0.3 + 0.25 * labels, 0.15), 0.0, 1.0)
    if quantise:
        scores = np.round(scores * quantise) / quantise  # many exact ties
    return scores, labels


def _structured_case():
    """A residual-like volume: most scores exactly 0, a bright blob with a soft edge, noise."""
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:12, :40, :40]
    r = np.sqrt((z - 6) ** 2 + (y - 20) ** 2 + (x - 18) ** 2)
    labels = r < 5
    scores = np.clip(0.6 * np.exp(-((r / 6) ** 2)) + rng.normal(0, 0.05, r.shape), 0, None)
    scores[rng.random(r.shape) < 0.5] = 0.0
    brain = r < 15
    return scores, labels, brain


@pytest.mark.parametrize("seed, quantise", [(0, None), (1, None), (2, 20), (3, 1000)])
def test_auroc_auprc_match_sklearn(seed, quantise):
    scores, labels = _random_case(seed, quantise=quantise)
    acc = M.BinnedScores().update(scores, labels)
    assert acc.n_pos == labels.sum() and acc.n_neg == (~labels).sum()
    assert abs(acc.auroc() - roc_auc_score(labels, scores)) < 1e-3
    assert abs(acc.average_precision() - average_precision_score(labels, scores)) < 1e-3
    if quantise:  # ties share a bin exactly: binned == exact
        assert acc.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert acc.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_structured_volume_with_mask_and_all_pixel_variant():
    scores, labels, brain = _structured_case()
    assert abs(M.auroc(scores, labels, brain) - roc_auc_score(labels[brain], scores[brain])) < 1e-3
    assert abs(M.average_precision(scores, labels, brain)
               - average_precision_score(labels[brain], scores[brain])) < 1e-3
    # paper-compatible all-pixel variant: no mask, background included
    assert abs(M.auroc(scores, labels) - roc_auc_score(labels.ravel(), scores.ravel())) < 1e-3
    assert abs(M.average_precision(scores, labels)
               - average_precision_score(labels.ravel(), scores.ravel())) < 1e-3
    # masking matters here (so the test can tell the two apart)
    assert abs(M.auroc(scores, labels) - M.auroc(scores, labels, brain)) > 1e-3


def test_coarse_bins_still_close_and_out_of_range_scores_clamped():
    scores, labels = _random_case(4)
    coarse = M.BinnedScores(n_bins=10_000)
    coarse.update(scores, labels)
    assert abs(coarse.auroc() - roc_auc_score(labels, scores)) < 1e-3
    # scores beyond [0, max] are clamped into the end bins: same as clipping first
    wild = scores * 3.0 - 1.0
    acc = M.BinnedScores(max_score=1.0).update(wild, labels)
    clipped = np.clip(wild, 0.0, 1.0)
    assert acc.auroc() == pytest.approx(roc_auc_score(labels, clipped), abs=1e-3)
    assert acc.average_precision() == pytest.approx(average_precision_score(labels, clipped), abs=1e-3)
    with pytest.raises(ValueError, match="NaN"):
        M.BinnedScores().update(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        M.BinnedScores().update(np.zeros(3), np.zeros(4))


def test_streaming_chunks_and_merge_equal_one_shot():
    scores, labels, brain = _structured_case()
    one = M.BinnedScores().update(scores, labels, brain)
    chunked = M.BinnedScores()
    for z in range(scores.shape[0]):  # slice by slice, as evaluation streams volumes
        chunked.update(scores[z], labels[z], brain[z])
    np.testing.assert_array_equal(one.pos, chunked.pos)
    np.testing.assert_array_equal(one.neg, chunked.neg)
    a, b = M.BinnedScores(), M.BinnedScores()
    a.update(scores[:6], labels[:6], brain[:6])
    b.update(scores[6:], labels[6:], brain[6:])
    merged = a + b
    assert merged.auroc() == one.auroc() and merged.average_precision() == one.average_precision()
    assert merged.best_dice() == one.best_dice()
    a += b
    np.testing.assert_array_equal(a.pos, one.pos)
    with pytest.raises(ValueError, match="cannot combine"):
        a += M.BinnedScores(n_bins=10)
    # memory is fixed by the bins, not by the voxels seen
    assert one.pos.shape == (100_001,) and one.pos.nbytes < 1_000_000


def test_internal_chunking_matches(monkeypatch):
    scores, labels = _random_case(5, n=10_000)
    ref = M.BinnedScores().update(scores, labels)
    monkeypatch.setattr(M, "_CHUNK", 777)
    small = M.BinnedScores().update(scores, labels)
    np.testing.assert_array_equal(ref.pos, small.pos)
    np.testing.assert_array_equal(ref.neg, small.neg)


def test_undefined_cases_all_negative_all_positive():
    scores = np.linspace(0, 1, 50)
    neg = M.BinnedScores().update(scores, np.zeros(50, bool))
    assert np.isnan(neg.auroc()) and np.isnan(neg.average_precision())
    assert np.isnan(neg.best_dice()).all()
    assert neg.false_positive_rate(0.5) == pytest.approx(25 / 50, abs=0.02)
    pos = M.BinnedScores().update(scores, np.ones(50, bool))
    assert np.isnan(pos.auroc())
    # scikit-learn's convention: with only positives precision is 1 everywhere
    assert pos.average_precision() == pytest.approx(average_precision_score(np.ones(50), scores))
    assert pos.average_precision() == 1.0
    d, t = pos.best_dice()
    assert d == 1.0 and t == -np.inf  # predicting everything is perfect
    empty = M.BinnedScores()
    assert np.isnan(empty.auroc()) and np.isnan(empty.false_positive_rate(0.1))


def _brute_best_dice(scores, labels, thresholds):
    best = (-1.0, None)
    for t in thresholds:
        pred = scores > t
        d = 2 * np.sum(pred & labels) / (pred.sum() + labels.sum())
        if d > best[0]:
            best = (d, t)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_dice_matches_brute_force(seed):
    scores, labels = _random_case(seed, n=400)
    acc = M.BinnedScores(n_bins=1000).update(scores, labels)
    d, t = acc.best_dice()
    # the same threshold set: every bin edge
    bd, bt = _brute_best_dice(scores, labels, acc.thresholds)
    assert d == pytest.approx(bd, abs=1e-12) and t == bt
    # the true optimum over all thresholds (each distinct score) is within binning error
    exact, _ = _brute_best_dice(scores, labels, np.concatenate([[-1.0], np.unique(scores)]))
    assert abs(d - exact) < 0.02
    fine = M.BinnedScores().update(scores, labels).best_dice()[0]
    assert fine == pytest.approx(exact, abs=1e-9)
    # the reported threshold reproduces the Dice on the raw scores
    assert M.dice_at_threshold(scores, labels, t) == pytest.approx(d, abs=1e-12)
    # Dice curve agrees with direct computation at a few edges
    curve = acc.dice_curve()
    for k in (1, 200, 500):
        assert curve[k] == pytest.approx(M.dice_at_threshold(scores, labels, acc.thresholds[k]), abs=1e-12)


def test_dice_hand_cases():
    assert M.dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert M.dice(np.array([1, 1, 0]), np.array([1, 1, 0])) == 1.0
    assert M.dice(np.array([0, 0, 1]), np.array([1, 1, 0])) == 0.0
    assert M.dice(np.array([0, 0]), np.array([1, 0])) == 0.0  # nothing found
    assert M.dice(np.array([1, 0]), np.array([0, 0])) == 0.0  # false alarm on a lesion-free volume
    assert np.isnan(M.dice(np.zeros(4), np.zeros(4)))  # both empty: excluded by default
    assert M.dice(np.zeros(4), np.zeros(4), empty=1.0) == 1.0
    # labels with several ids (kind maps) count as foreground
    assert M.dice(np.array([1, 1, 0]), np.array([2, 5, 0])) == 1.0
    # 3 of 4 predicted, 1 false positive: 2*3 / (4 + 4)
    pred = np.array([1, 1, 1, 1, 0, 0], bool)
    lab = np.array([1, 1, 1, 0, 1, 0], bool)
    assert M.dice(pred, lab) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shape"):
        M.dice(np.zeros(3), np.zeros(4))


def test_dice_at_threshold_is_strict_and_masked():
    scores = np.array([0.0, 0.01, 0.02, 0.5, 0.5])
    labels = np.array([0, 0, 1, 1, 0])
    # strictly greater: 0.01 is not above 0.01 -> pred = [0,0,1,1,1]; 2*2/(3+2)
    assert M.dice_at_threshold(scores, labels, 0.01) == pytest.approx(0.8)
    mask = np.array([1, 1, 1, 1, 0], bool)
    assert M.dice_at_threshold(scores, labels, 0.01, mask) == 1.0
    assert M.mean_std([0.5, np.nan, 1.0]) == (0.75, 0.25, 2)
    m, s, n = M.mean_std([np.nan])
    assert np.isnan(m) and np.isnan(s) and n == 0


def test_false_positive_rate():
    scores = np.array([0.0, 0.005, 0.01, 0.02, 0.5, 1.0])
    assert M.false_positive_rate(scores, 0.01) == pytest.approx(3 / 6)
    assert M.false_positive_rate(scores, 0.01, scores > 0) == pytest.approx(3 / 5)
    acc = M.BinnedScores().update(scores, np.zeros(6))
    # thresholds on bin edges are exact and agree with the array function
    for t in (0.0, 0.01, 0.02, 0.3):
        assert acc.false_positive_rate(t) == pytest.approx(M.false_positive_rate(scores, t))
    rng = np.random.default_rng(0)
    healthy = rng.random(20_000) ** 3
    acc = M.BinnedScores().update(healthy, np.zeros(healthy.shape))
    for t in (0.001, 0.0123456, 0.25):
        assert abs(acc.false_positive_rate(t) - M.false_positive_rate(healthy, t)) <= 2 / healthy.size


def test_slice_dice_smoothed_hand_computed():
    pred = np.zeros((3, 2, 2))
    lab = np.zeros((3, 2, 2))
    pred[0, 0, :] = 1          # 2 predicted
    lab[0, :, 0] = 1           # 2 labelled, 1 overlap -> (2*1 + 1) / (2 + 2 + 1) = 0.6
    lab[2, 0, 0] = 1           # missed lesion -> (0 + 1) / (0 + 1 + 1) = 0.5
    values = M.slice_dice_smoothed(pred, lab)
    np.testing.assert_allclose(values, [0.6, 1.0, 0.5])  # empty slice -> 1
    # soft predictions and another slice axis
    soft = np.full((2, 2, 1), 0.5)
    lab2 = np.ones((2, 2, 1))
    np.testing.assert_allclose(M.slice_dice_smoothed(soft, lab2, axis=0), [(2 * 1 + 1) / (1 + 2 + 1)] * 2)
    np.testing.assert_allclose(M.slice_dice_smoothed(pred, lab, axis=2).shape, (2,))


def test_ssim_matches_skimage_with_gaussian_window():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = rng.random((48, 40))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    ref = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert M.ssim(x, y) == pytest.approx(ref, abs=1e-12)
    # the default uniform 7x7 window gives another number: the settings are in effect
    assert abs(M.ssim(x, y) - structural_similarity(x, y, data_range=1.0)) > 1e-4
    assert M.ssim(x, x) == pytest.approx(1.0)
    vol = np.stack([x, np.zeros_like(x), y])
    rec = np.stack([y, np.zeros_like(x), y])
    values = M.ssim_slices(vol, rec)
    np.testing.assert_allclose(values, [ref, 1.0])  # empty middle slice skipped
    assert M.ssim_slices(vol, rec, skip_empty=False).shape == (3,)


def _from_histograms(pos, neg, n_bins):
    """Scores and labels holding ``pos[k]`` positives and ``neg[k]`` negatives in bin k (one score
    per bin: 0 for bin 0, the bin's centre above)."""
    width = 1.0 / n_bins
    centre = np.concatenate([[0.0], (np.arange(1, n_bins + 1) - 0.5) * width])
    scores = np.concatenate([np.repeat(centre, pos), np.repeat(centre, neg)])
    labels = np.concatenate([np.ones(int(np.sum(pos)), bool), np.zeros(int(np.sum(neg)), bool)])
    return scores, labels


def test_precision_recall_curve_from_histograms_matches_sklearn():
    from sklearn.metrics import precision_recall_curve

    # empty bins in between, a negative-only top bin (precision 0 there), ties within bins
    pos = np.array([0, 1, 0, 2, 0, 3, 1, 0, 0, 2, 0])
    neg = np.array([5, 3, 2, 0, 0, 1, 0, 2, 1, 0, 4])
    scores, labels = _from_histograms(pos, neg, 10)
    acc = M.BinnedScores(n_bins=10).update(scores, labels)
    np.testing.assert_array_equal(acc.pos, pos)
    np.testing.assert_array_equal(acc.neg, neg)
    precision, recall = acc.precision_recall_curve()
    ref_precision, ref_recall, _ = precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, ref_precision, rtol=0, atol=1e-12)
    np.testing.assert_allclose(recall, ref_recall, rtol=0, atol=1e-12)
    assert precision[-2] == 0.0  # the top bin holds negatives only
    # average precision from the points (scikit-learn's step sum) is the accumulator's
    ap = -np.sum(np.diff(recall) * precision[:-1])
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert ap == pytest.approx(acc.average_precision(), abs=1e-12)


def test_precision_recall_curve_thinned_keeps_ends_and_true_points():
    scores, labels = _random_case(5, n=20_000)
    acc = M.BinnedScores(n_bins=20_000).update(scores, labels)
    precision, recall = acc.precision_recall_curve()
    assert precision.size > 1000
    thin_p, thin_r = acc.precision_recall_curve(max_points=50)
    assert 10 < thin_p.size <= 50
    assert (thin_p[0], thin_r[0]) == (precision[0], recall[0])
    assert (thin_p[-1], thin_r[-1]) == (1.0, 0.0)
    full = set(zip(precision.tolist(), recall.tolist()))
    assert all(point in full for point in zip(thin_p.tolist(), thin_r.tolist()))
    assert np.all(np.diff(thin_r) <= 0)  # still in curve order
    # short curves come back whole; no positives: no curve
    small = M.BinnedScores(n_bins=2).update(*_from_histograms([0, 1, 2], [1, 0, 3], 2))
    assert small.precision_recall_curve(max_points=50)[0].size == small.precision_recall_curve()[0].size
    assert M.BinnedScores().update(scores, np.zeros_like(labels)).precision_recall_curve()[0].size == 0
