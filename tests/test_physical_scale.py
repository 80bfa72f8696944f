"""One physical scale: the model sees the brain at the checkpoint's mm per pixel (docs/preprocessing.md)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_tae.preprocess import (
    PhysicalSliceGrid,
    PreprocessOptions,
    SliceGrid,
    prepare_volume,
    slice_grid,
)


def _phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float],
             centre_mm: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'brain' (ellipse 140 x 110 mm in-plane, inner texture) sampled on a grid.

    Defined in mm, so the same object at any voxel size or field of view; ``centre_mm`` places
    it in the field (default: the middle).
    """
    nz, ny, nx = shape
    _, dy, dx = spacing
    cy, cx = centre_mm if centre_mm is not None else (ny * dy / 2, nx * dx / 2)
    y = (np.arange(ny) + 0.5) * dy - cy
    x = (np.arange(nx) + 0.5) * dx - cx
    yy, xx = np.meshgrid(y, x, indexing="ij")
    r = (yy / 70.0) ** 2 + (xx / 55.0) ** 2
    brain2d = r < 1.0
    texture = 300 + 120 * np.cos(yy / 9.0) * np.sin(xx / 7.0) + 80 * np.exp(-r * 3)
    data = np.stack([np.where(brain2d, texture * (1 + 0.1 * k), 0.0) for k in range(nz)])
    return data.astype(np.float32), np.broadcast_to(brain2d, shape).copy()


def test_slice_grid_without_mm_per_px_is_the_legacy_square_resize():
    _, brain = _phantom((2, 120, 90), (3.0, 1.5, 1.5))
    grid = slice_grid(brain, 64)
    assert grid == SliceGrid((120, 90), 64)
    # and PreprocessOptions of an old checkpoint (no mm_per_px key) selects it
    options = PreprocessOptions.from_dict({"normalisation": "per_volume", "upper_percentile": 99.5})
    assert options.mm_per_px is None and not options.bias_correction
    data, brain = _phantom((2, 120, 90), (3.0, 1.5, 1.5))
    old = prepare_volume(data, 64, mask=brain, options=options)
    assert isinstance(old.grid, SliceGrid)
    np.testing.assert_allclose(old.slices, np.clip(SliceGrid((120, 90), 64).to_model(old.normalised), 0, 1))


def test_physical_grid_pixel_size_and_centre():
    spacing = (3.3, 0.57, 0.8)
    _, brain = _phantom((3, 400, 260), spacing)
    grid = slice_grid(brain, 128, spacing=spacing, mm_per_px=1.5)
    assert isinstance(grid, PhysicalSliceGrid)
    assert grid.step == pytest.approx((1.5 / 0.57, 1.5 / 0.8))
    model = grid.to_model(brain.astype(np.float32)) > 0.5
    rows = np.flatnonzero(model[0].any(1))
    cols = np.flatnonzero(model[0].any(0))
    # 140 x 110 mm at 1.5 mm per pixel, centred on the 128 grid
    assert (rows[-1] - rows[0] + 1) * 1.5 == pytest.approx(140, abs=3.1)
    assert (cols[-1] - cols[0] + 1) * 1.5 == pytest.approx(110, abs=3.1)
    assert (rows[0] + rows[-1]) / 2 == pytest.approx(63.5, abs=1)
    assert (cols[0] + cols[-1]) / 2 == pytest.approx(63.5, abs=1)


def test_crop_box_has_the_margin_and_is_clipped_to_the_image():
    spacing = (3.0, 0.5, 2.0)
    brain = np.zeros((2, 300, 100), bool)
    brain[1, 100:150, 3:60] = True
    grid = slice_grid(brain, 64, spacing=spacing, mm_per_px=2.0, margin_mm=10.0)
    # 10 mm = 20 rows at 0.5 mm, 5 columns at 2 mm; the left edge is clipped at 0
    assert grid.crop == (80, 170, 0, 65)
    assert grid.centre == (124.5, 31.0)
    # what lies beyond the crop is not read
    outside = np.zeros((2, 300, 100), np.float32)
    outside[:, :70] = 1.0
    assert not grid.to_model(outside).any()


@pytest.mark.parametrize("spacing", [(3.0, 0.57, 0.57), (4.0, 0.9, 0.7), (1.0, 1.0, 1.0)])
def test_physical_round_trip_on_anisotropic_in_plane_spacing(spacing):
    shape = (2, int(200 / spacing[1]), int(190 / spacing[2]))
    data, brain = _phantom(shape, spacing)
    grid = slice_grid(brain, 160, spacing=spacing, mm_per_px=1.25)
    field = (data / data.max()).astype(np.float32)
    back = grid.to_native(grid.to_model(field))
    assert back.shape == field.shape and back.dtype == np.float32
    inner = ndi.binary_erosion(brain[0], iterations=int(6 / min(spacing[1:])))
    # smooth content: the round trip loses only what the coarser model pixel cannot hold
    err = np.abs(back[0] - ndi.gaussian_filter(field[0], 1.25 / np.asarray(spacing[1:]) / 2))[inner]
    assert np.percentile(err, 99) < 0.03, np.percentile(err, 99)
    # a grid shifted by one model pixel would be far off: the mapping is exact, not approximate
    shifted = PhysicalSliceGrid(grid.native_shape, grid.size, grid.spacing, grid.mm_per_px,
                                (grid.centre[0] + grid.step[0], grid.centre[1]), grid.crop)
    wrong = np.abs(shifted.to_native(grid.to_model(field))[0] - back[0])[inner]
    assert np.percentile(wrong, 99) > 3 * np.percentile(err, 99)


def test_same_brain_any_voxel_size_or_field_of_view_gives_the_same_model_input():
    """The bug of issue 12: padding 182 x 218 to 300 x 300 changed what the model saw."""
    options = PreprocessOptions(mm_per_px=1.5)
    views = {
        "1 mm, tight field": ((2, 218, 182), (3.0, 1.0, 1.0)),
        "1 mm, padded to 300 x 300": ((2, 300, 300), (3.0, 1.0, 1.0)),
        "0.57 mm clinical": ((2, 384, 320), (3.3, 0.57, 0.57)),
        "0.9 x 0.7 mm, off-centre": ((2, 256, 330), (3.0, 0.9, 0.7)),
    }
    inputs = {}
    for name, (shape, spacing) in views.items():
        centre = (120.0, 100.0) if "off-centre" in name else None
        data, brain = _phantom(shape, spacing, centre)
        prepared = prepare_volume(data, 128, mask=brain, spacing=spacing, options=options)
        inputs[name] = prepared.slices[0]
    reference = inputs["1 mm, tight field"]
    for name, slc in inputs.items():
        diff = np.abs(slc - reference)
        # interpolation and the brain edge's voxel rounding only (values in [0, 1])
        assert np.mean(diff) < 0.01 and np.percentile(diff, 99) < 0.15, (name, diff.mean())
    # the legacy resize sees the padded field at another scale: the difference is large
    legacy = {}
    for name in ("1 mm, tight field", "1 mm, padded to 300 x 300"):
        data, brain = _phantom(*views[name])
        legacy[name] = prepare_volume(data, 128, mask=brain).slices[0]
    assert np.mean(np.abs(legacy["1 mm, tight field"] - legacy["1 mm, padded to 300 x 300"])) > 0.05


def test_a_brain_larger_than_the_model_field_is_logged(caplog):
    _, brain = _phantom((1, 200, 200), (3.0, 1.0, 1.0))
    with caplog.at_level(logging.WARNING, logger="napari_tae.preprocess"):
        slice_grid(brain, 64, spacing=(3.0, 1.0, 1.0), mm_per_px=1.0)
    assert "more than the model's 64 mm field" in caplog.text


def test_options_round_trip_and_refusals():
    options = PreprocessOptions(upper_percentile=99.0, mm_per_px=1.5, bias_correction=True)
    assert PreprocessOptions.from_dict(options.to_dict()) == options
    assert options.to_dict()["bias_correction"] == "n4"
    with pytest.raises(ValueError, match="mm_per_px"):
        PreprocessOptions(mm_per_px=0.0)
    with pytest.raises(ValueError, match="bias_correction"):
        PreprocessOptions.from_dict({"bias_correction": "yes"})
    with pytest.raises(ValueError, match="Voxel size"):
        prepare_volume(np.ones((2, 8, 8), np.float32), 8, spacing=(1.0, 0.0, 1.0))


def test_brain_beyond_the_model_field_gets_no_residual():
    import torch

    from napari_tae.inference import reconstruct
    from napari_tae.models import build_model

    data, brain = _phantom((2, 200, 160), (3.0, 1.0, 1.0))  # 140 mm long brain, 96 mm field
    model = build_model("intensity", img_size=64)
    with torch.no_grad():
        rec = reconstruct(model, data, brain=brain, spacing=(3.0, 1.0, 1.0),
                          options=PreprocessOptions(mm_per_px=1.5), device="cpu")
    rows = np.arange(200)[:, None] + 0.0 * np.arange(160)[None]
    outside = brain[0] & (np.abs(rows - 99.5) > 50)  # beyond 48 mm from the centre
    assert outside.any() and not rec.residual[0][outside].any()
    assert rec.residual[0][brain[0] & ~outside].any()  # inside the field: the residual as usual


def test_inference_follows_the_checkpoints_preprocessing():
    from types import SimpleNamespace

    from napari_tae.inference import reconstruct
    from napari_tae.models import build_model

    spacing = (3.0, 0.8, 0.8)
    data, brain = _phantom((3, 240, 200), spacing)
    yy = np.linspace(0.8, 1.25, 240, dtype=np.float32)[None, :, None]
    data = data * yy  # a smooth bias field for N4 to remove
    meta = SimpleNamespace(preprocessing={"normalisation": "per_volume", "mm_per_px": 1.5,
                                          "bias_correction": "n4"})
    model = build_model("intensity", img_size=128)
    rec = reconstruct(model, data, brain=brain, meta=meta, spacing=spacing, device="cpu")
    assert rec.options == PreprocessOptions(mm_per_px=1.5, bias_correction=True)
    expected = prepare_volume(data, 128, mask=brain, spacing=spacing, options=rec.options)
    np.testing.assert_allclose(rec.normalised, expected.normalised)
    without_n4 = prepare_volume(data, 128, mask=brain, spacing=spacing,
                                options=PreprocessOptions(mm_per_px=1.5))
    assert np.abs(rec.normalised - without_n4.normalised).max() > 0.05
    with pytest.raises(ValueError, match="voxel size"):
        reconstruct(model, data, brain=brain, meta=meta, device="cpu")
