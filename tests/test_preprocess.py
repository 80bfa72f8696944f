"""Brain mask, normalisation and the slice grid (evaluation protocol steps 2-4)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.transform import resize

from napari_tae.preprocess import (
    NormParams,
    NotSkullStrippedWarning,
    SliceGrid,
    brain_mask,
    fit_normalisation,
    normalise,
    prepare_volume,
)


def _ellipsoid(shape=(20, 40, 30), radii=(0.8, 0.8, 0.8)) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True)) < 1.0


def _brain(background: float, shape=(20, 40, 30), seed=0) -> tuple[np.ndarray, np.ndarray]:
    inside = _ellipsoid(shape)
    rng = np.random.default_rng(seed)
    data = np.full(shape, background, np.float32)
    data[inside] = rng.uniform(background + 1.0, background + 500.0, inside.sum())
    return data, inside


@pytest.mark.parametrize("background", [0.0, -1.37, 250.0])
def test_brain_mask_zero_and_nonzero_background(background):
    data, inside = _brain(background)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skull-stripped volume must not warn
        mask = brain_mask(data)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, inside)


def test_brain_mask_zscored_background_below_brain_and_inside_values():
    # z-scored data: background constant, brain values on both sides of it
    data, inside = _brain(0.0)
    data[inside] -= 250.0
    data[~inside] = -3.0
    data[inside & (data == -3.0)] = -2.9
    np.testing.assert_array_equal(brain_mask(data), inside)


def test_brain_mask_supplied():
    data, inside = _brain(0.0)
    supplied = np.zeros(data.shape, np.uint8)
    supplied[5:10, 10:20, 10:20] = 3
    np.testing.assert_array_equal(brain_mask(data, supplied), supplied > 0)
    with pytest.raises(ValueError, match="shape"):
        brain_mask(data, supplied[1:])
    with pytest.raises(ValueError, match="empty"):
        brain_mask(data, np.zeros_like(supplied))


def test_not_skull_stripped_warns():
    rng = np.random.default_rng(1)
    data, inside = _brain(0.0)
    noisy = data + rng.uniform(0, 20, data.shape).astype(np.float32)  # scanner noise in the air
    with pytest.warns(NotSkullStrippedWarning, match="skull"):
        mask = brain_mask(noisy)
    assert mask.any()
    # constant corners but the "brain" fills the box: a head with its scalp cropped tightly
    full = np.full((20, 40, 30), 100.0, np.float32) + rng.uniform(0, 50, (20, 40, 30))
    full[0, 0, 0] = full[0, 0, -1] = full[0, -1, 0] = full[0, -1, -1] = 0
    full[-1, 0, 0] = full[-1, 0, -1] = full[-1, -1, 0] = full[-1, -1, -1] = 0
    with pytest.warns(NotSkullStrippedWarning, match="fills"):
        brain_mask(full)


def test_brain_mask_constant_volume_is_empty():
    with pytest.raises(ValueError, match="empty"):
        brain_mask(np.zeros((4, 5, 6), np.float32))


def test_fit_normalisation_matches_numpy_percentiles():
    data, inside = _brain(0.0)
    params = fit_normalisation(data, inside)
    values = data[inside]
    assert params.high == pytest.approx(np.percentile(values, 99.5))
    assert params.low == pytest.approx(np.percentile(values, 0.5))
    plain = fit_normalisation(data, inside, upper_percentile=100, lower_percentile=0)
    assert (plain.low, plain.high) == (pytest.approx(values.min()), pytest.approx(values.max()))
    with pytest.raises(ValueError, match="Percentiles"):
        fit_normalisation(data, inside, upper_percentile=0.1, lower_percentile=0.5)


def test_normalise_range_and_values():
    data, inside = _brain(-1.0)
    params = fit_normalisation(data, inside)
    out = normalise(data, inside, params)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[~inside] == 0)
    # hand formula inside the window
    sel = inside & (data > params.low) & (data < params.high)
    expected = (data[sel] - params.low) / (params.high - params.low)
    np.testing.assert_allclose(out[sel], expected, rtol=1e-5, atol=1e-6)
    # about 0.5% of the brain is clipped at each end
    assert np.mean(out[inside] == 1.0) == pytest.approx(0.005, abs=0.002)


def test_norm_params_dict_round_trip():
    params = NormParams(low=1.5, high=812.0, upper_percentile=99.0)
    d = json.loads(json.dumps(params.to_dict()))
    assert NormParams.from_dict(d) == params
    assert NormParams.from_dict({"low": 0, "high": 1, "extra": "ignored"}).high == 1.0
    with pytest.raises(ValueError, match="high"):
        NormParams.from_dict({"low": 0})


def _smooth_stack(z, ny, nx) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    return np.stack(
        [np.sin(2.0 * yy + k) * np.cos(1.5 * xx) + 0.3 * k for k in range(z)]
    ).astype(np.float32)


def test_to_model_matches_skimage_resize_on_square_input():
    stack = _smooth_stack(3, 64, 64)
    grid = SliceGrid((64, 64), 100)
    out = grid.to_model(stack)
    assert out.shape == (3, 100, 100) and out.dtype == np.float32
    for k in range(3):
        ref = resize(stack[k], (100, 100), order=1, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(out[k], ref, atol=1e-5)


def test_padding_is_centred_and_aspect_kept():
    grid = SliceGrid((40, 100), 50)
    ones = np.ones((1, 40, 100), np.float32)
    out = grid.to_model(ones)[0]
    # 40 x 100 padded to 100 x 100 then halved: 20 rows of ones, centred, full width
    rows = np.flatnonzero(out.mean(axis=1) > 0.5)
    assert len(rows) == 20 and rows[0] == 15 and rows[-1] == 34
    assert np.all(out[rows].min(axis=1) > 0.5)
    com = ndi.center_of_mass(out)
    assert com == pytest.approx((24.5, 24.5), abs=0.3)


@pytest.mark.parametrize(
    ("native", "size"), [((150, 200), 256), ((240, 180), 256), ((218, 182), 128), ((97, 64), 64)]
)
def test_to_native_inverts_to_model(native, size):
    stack = _smooth_stack(3, *native)
    grid = SliceGrid(native, size)
    model = grid.to_model(stack)
    assert model.shape == (3, size, size)
    back = grid.to_native(model)
    assert back.shape == stack.shape and back.dtype == np.float32
    # smooth images: only interpolation error remains; the border pixels blend with padding
    err = np.abs(back - stack)[:, 2:-2, 2:-2]
    assert err.max() < 0.02, err.max()
    # a misplaced crop (off by one pixel) would be far worse than that on these gradients
    assert np.abs(back[:, 1:] - stack[:, :-1]).max() > 3 * err.max()


def test_slice_grid_rejects_wrong_shapes():
    grid = SliceGrid((30, 40), 32)
    with pytest.raises(ValueError, match="doesn't match"):
        grid.to_model(np.zeros((2, 40, 30), np.float32))
    with pytest.raises(ValueError, match="doesn't match"):
        grid.to_native(np.zeros((2, 30, 40), np.float32))


def test_prepare_volume():
    data, inside = _brain(-0.5, shape=(6, 50, 36))
    prepared = prepare_volume(data, 64)
    assert prepared.slices.shape == (6, 64, 64) and prepared.slices.dtype == np.float32
    assert prepared.mask_slices.shape == (6, 64, 64) and prepared.mask_slices.dtype == bool
    assert prepared.slices.min() >= 0.0 and prepared.slices.max() <= 1.0
    np.testing.assert_array_equal(prepared.brain, inside)
    np.testing.assert_array_equal(
        prepared.normalised, normalise(data, inside, fit_normalisation(data, inside))
    )
    np.testing.assert_allclose(prepared.slices, prepared.grid.to_model(prepared.normalised))
    # stored parameters are reused as given (checkpoint normalisation)
    fixed = NormParams(low=0.0, high=1000.0)
    again = prepare_volume(data, 64, norm=fixed, mask=inside.astype(np.uint8))
    assert again.norm == fixed
    assert again.normalised.max() < 0.6
    with pytest.raises(ValueError, match="3D"):
        prepare_volume(data[0])
