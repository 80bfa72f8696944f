"""Brain extraction (deepbet), the "not skull-stripped" check and the skull_strip rule;
N4 and extraction on the real raw heads when the data folder is present."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_tae.brain import (
    BrainExtractionError,
    extract_brain,
    resolve_brain_mask,
    unstripped_reason,
)
from napari_tae.preprocess import NotSkullStrippedWarning, bias_correct
from napari_tae.synthetic import healthy_subject
from napari_tae.synthetic_head import HEAD_LAYERS_MM, add_head

RAW_HEADS = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
             / "mslub_longitudinal_raw")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def head():
    """A 2 mm synthetic head on a zero background, napari order: (data, true brain, spacing)."""
    subject = healthy_subject(3, shape=(96, 112, 96))
    made = add_head(subject, 3)
    spacing = subject.spacing[::-1]
    return made.data.transpose(2, 1, 0), made.brain.transpose(2, 1, 0), spacing, subject


def test_synthetic_head_has_the_layers_around_an_unchanged_brain(head):
    data, brain, spacing, subject = head
    np.testing.assert_array_equal(data[brain], subject.data.transpose(2, 1, 0)[brain])
    outside = ndi.distance_transform_edt(~brain, sampling=spacing)
    shell = (outside > 1.0) & (outside < HEAD_LAYERS_MM[-1][1])
    assert np.count_nonzero(data[shell]) > 0.95 * np.count_nonzero(shell)
    # scalp fat is bright and the bone of the skull dark, as on FLAIR
    wm = subject.wm_level
    assert np.median(data[(outside > 9.0) & (outside < 11.0)]) > 0.7 * wm
    assert data.max() > 0 and np.count_nonzero(data) > 1.5 * np.count_nonzero(brain)
    with pytest.raises(ValueError, match="too small"):
        add_head(healthy_subject(3, shape=(96, 112, 96), spacing=1.4), 3)


def test_zero_background_head_is_detected_and_a_brain_is_not(head):
    data, _, spacing, subject = head
    reason = unstripped_reason(data, spacing)
    assert reason is not None and "more than a brain" in reason
    assert unstripped_reason(subject.data.transpose(2, 1, 0), spacing) is None
    noisy = data + np.random.default_rng(0).rayleigh(5.0, data.shape).astype(np.float32)
    assert "corners" in unstripped_reason(noisy, spacing)


def test_deepbet_extracts_the_synthetic_head(head):
    data, brain, spacing, _ = head
    resolved = resolve_brain_mask(data, spacing)  # auto
    assert resolved.method == "deepbet" and "L" in resolved.reason
    assert resolved.mask.shape == data.shape and resolved.mask.dtype == bool
    assert _dice(resolved.mask, brain) > 0.9
    # nothing of the skull or scalp: every mask voxel within 2 mm of the true brain
    outside = ndi.distance_transform_edt(~brain, sampling=spacing)
    assert np.count_nonzero(resolved.mask & (outside > 2.5)) < 0.005 * np.count_nonzero(brain)


def test_skull_strip_choices(head):
    data, _, spacing, subject = head
    stripped = subject.data.transpose(2, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = resolve_brain_mask(stripped, spacing)
    assert auto.method == "non_background" and auto.reason == ""
    np.testing.assert_array_equal(auto.mask, stripped != 0)
    supplied = np.zeros(data.shape, np.uint8)
    supplied[10:20, 20:40, 20:40] = 2
    given = resolve_brain_mask(data, spacing, supplied=supplied, skull_strip="always")
    assert given.method == "supplied" and np.array_equal(given.mask, supplied > 0)
    with pytest.warns(NotSkullStrippedWarning, match="more than a brain"):
        never = resolve_brain_mask(data, spacing, skull_strip="never")
    assert never.method == "non_background" and never.litres(spacing) > 2.4
    with pytest.raises(BrainExtractionError, match="unknown skull_strip"):
        resolve_brain_mask(data, spacing, skull_strip="yes")


def test_extraction_failure_is_one_clear_error():
    # a tiny cube is not a head: deepbet finds (almost) nothing
    cube = np.zeros((30, 30, 30), np.float32)
    cube[12:18, 12:18, 12:18] = 100.0
    with pytest.raises(BrainExtractionError, match="brain") as info:
        extract_brain(cube, (1.0, 1.0, 1.0))
    assert "\n" not in str(info.value)
    # auto on a small field of view whose corners are tissue: no head to find, so the
    # non-background is used, with a warning that says why
    crop = np.random.default_rng(0).uniform(50, 100, (20, 30, 30)).astype(np.float32)
    with pytest.warns(NotSkullStrippedWarning, match="corners.*but brain extraction found"):
        fallback = resolve_brain_mask(crop, (2.0, 1.0, 1.0))
    assert fallback.method == "non_background"
    with pytest.raises(BrainExtractionError):
        resolve_brain_mask(crop, (2.0, 1.0, 1.0), skull_strip="always")


def test_n4_removes_a_smooth_bias_field(head):
    _, brain, spacing, subject = head
    stripped = subject.data.transpose(2, 1, 0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in stripped.shape], indexing="ij")
    field = np.exp(0.25 * (x + 0.5 * y - 0.3 * z)).astype(np.float32)
    biased = stripped * field
    corrected = bias_correct(biased, brain, spacing)
    assert corrected.shape == biased.shape and np.isfinite(corrected).all()
    wm = subject.wm.transpose(2, 1, 0) > 0.9

    def cv(a):
        return float(np.std(a[wm]) / np.mean(a[wm]))

    # white matter is far more uniform after the correction, close to the unbiased volume
    assert cv(corrected) < 0.7 * cv(biased) and cv(corrected) < 1.3 * cv(stripped)


@pytest.fixture(scope="module")
def raw_heads():
    if not RAW_HEADS.is_dir():
        pytest.skip(f"{RAW_HEADS} absent (real raw heads)")
    from napari_tae.io import load_volume

    heads = []
    for path in sorted(RAW_HEADS.glob("*.nii.gz")):
        volume = load_volume(path)
        spacing = volume.geometry.spacing
        heads.append((path.name, volume.data, spacing, resolve_brain_mask(volume.data, spacing)))
    return heads


def _shallow_fraction(mask: np.ndarray, data: np.ndarray, spacing) -> float:
    """Fraction of ``mask`` within 4 mm (in-plane) of the head's outline: scalp, not brain.

    In-plane per axial slice: along 3-4 mm slices a 3D distance is too coarse near the vertex.
    """
    head = data > 0.05 * np.percentile(data, 99)
    head = np.stack([ndi.binary_fill_holes(ndi.binary_closing(s, iterations=2)) for s in head])
    depth = np.stack([ndi.distance_transform_edt(s, sampling=spacing[1:]) for s in head])
    return np.count_nonzero(mask & (depth < 4.0)) / np.count_nonzero(mask)


def test_real_heads_brain_extraction(raw_heads):
    assert len(raw_heads) == 4
    for name, data, spacing, resolved in raw_heads:
        assert resolved.method == "deepbet", name
        litres = resolved.litres(spacing)
        assert 1.1 < litres < 1.7, (name, litres)
        # no scalp: the brain lies inside the head's outline (skin and skull are 5 mm or more)
        assert _shallow_fraction(resolved.mask, data, spacing) < 0.005, name
        # what the old non-background rule took for brain fails the same check
        assert _shallow_fraction(data > 0, data, spacing) > 0.05, name


def _low_frequency_cv(data: np.ndarray, core: np.ndarray, spacing) -> float:
    """Variation of the 8 mm local mean inside ``core``: what a bias field adds."""
    sigma = (0.0, 8.0 / spacing[1], 8.0 / spacing[2])
    weight = ndi.gaussian_filter(core.astype(np.float32), sigma)
    local = ndi.gaussian_filter(np.where(core, data, 0.0).astype(np.float32), sigma)
    local = (local / np.maximum(weight, 1e-6))[core & (weight > 0.5)]
    return float(local.std() / local.mean())


def test_real_heads_n4(raw_heads):
    for name, data, spacing, resolved in raw_heads[:2]:
        corrected = bias_correct(data, resolved.mask, spacing)
        core = ndi.binary_erosion(resolved.mask, iterations=3)
        assert np.isfinite(corrected).all()
        assert _low_frequency_cv(corrected, core, spacing) < 0.9 * _low_frequency_cv(data, core, spacing), name
