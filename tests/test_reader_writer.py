"""Reader/writer contributions, headless and through napari itself, plus the real MS volume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_tae.io import Geometry, VolumeError, load_volume, save_volume
from napari_tae.plugin._layers import GEOMETRY_KEY, RADIOLOGICAL_ORIENTATION, contrast_limits, set_radiological_view
from napari_tae.plugin._reader import napari_get_reader, read_nifti
from napari_tae.plugin._writer import write_image, write_labels

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "mslub_patient07"
REAL = REAL if REAL.exists() else Path("/work/shared/data/real/mslub_patient07")
FLAIR = REAL / "FLAIR.nii.gz"
LESIONS = REAL / "lesion_mask.nii.gz"

# LPS, anisotropic, with a non-trivial origin
LPS = np.array(
    [[-0.9, 0.0, 0.0, 60.0], [0.0, -1.1, 0.0, 80.0], [0.0, 0.0, 3.0, -40.0], [0, 0, 0, 1]]
)
SHAPE = (24, 30, 9)


def _brainish(shape=SHAPE) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < 0.8
    values = 100 + 50 * grids[0] + 20 * grids[1]
    return np.where(inside, values, 0).astype(np.float32)


@pytest.fixture
def lps_file(tmp_path) -> str:
    img = nib.Nifti1Image(_brainish(), LPS)
    img.header.set_qform(LPS, code=1)
    img.header.set_sform(LPS, code=2)
    path = tmp_path / "src" / "flair.nii.gz"
    path.parent.mkdir()
    nib.save(img, path)
    return os.fspath(path)


# ------------------------------------------------------------------ headless contributions
@pytest.mark.parametrize(
    "path", ["a.png", "a.nii.txt", "nii", "scan.tif", ["a.nii", "b.png"], []]
)
def test_reader_declines_non_nifti(path):
    assert napari_get_reader(path) is None


@pytest.mark.parametrize("path", ["a.nii", "b.nii.gz", "C.NII.GZ", ["a.nii", "b.nii.gz"]])
def test_reader_accepts_nifti(path):
    assert napari_get_reader(path) is read_nifti


def test_reader_layer_geometry(lps_file):
    [(data, kwargs, layer_type)] = napari_get_reader(lps_file)(lps_file)
    assert layer_type == "image"
    assert data.shape == (9, 30, 24)  # (S, A, R)
    # LPS file: R runs along -i, A along -j; voxel sizes (S, A, R) = (3, 1.1, 0.9)
    assert kwargs["scale"] == pytest.approx((3.0, 1.1, 0.9))
    assert kwargs["translate"] == pytest.approx((-40.0, 80 - 1.1 * 29, 60 - 0.9 * 23))
    assert kwargs["units"] == ("mm", "mm", "mm")
    assert kwargs["axis_labels"] == ("S", "A", "R")
    assert kwargs["name"] == "flair"
    assert isinstance(kwargs["metadata"][GEOMETRY_KEY], Geometry)
    lo, hi = kwargs["contrast_limits"]
    brain = data[data != 0]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(brain, [1, 99.5])))


def test_reader_broken_file_raises_volume_error(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    reader = napari_get_reader(os.fspath(bad))
    with pytest.raises(VolumeError, match="broken.nii.gz"):
        reader(os.fspath(bad))


def test_contrast_limits_flat_volume_falls_back_to_range():
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 0, 1] = 5.0  # tiny object: percentiles of it are flat
    assert contrast_limits(data) == (0.0, 5.0)


def test_writers_headless(lps_file, tmp_path):
    [(data, kwargs, _)] = read_nifti(lps_file)
    mask = (data > 120).astype(np.uint8)
    meta = {"metadata": kwargs["metadata"], "scale": kwargs["scale"], "name": "m"}
    out = write_labels(os.fspath(tmp_path / "mask.nii.gz"), mask, meta)
    assert out == [os.fspath(tmp_path / "mask.nii.gz")]
    img = nib.load(out[0])
    src = nib.load(lps_file)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, src.affine)
    np.testing.assert_array_equal(img.get_fdata(), (src.get_fdata() > 120).astype(np.uint8))
    # image writer: float32, and the geometry's source is protected even though napari's dialog
    # already asked about overwriting
    out = write_image(os.fspath(tmp_path / "img.nii"), data, meta)
    assert nib.load(out[0]).get_data_dtype() == np.float32
    with pytest.raises(VolumeError, match="source"):
        write_image(lps_file, data, meta)
    # a layer without geometry: scale/translate only
    plain = write_labels(
        os.fspath(tmp_path / "plain.nii.gz"), mask, {"scale": (2.0, 1.0, 0.5), "translate": (1, 2, 3)}
    )
    np.testing.assert_allclose(
        nib.load(plain[0]).affine, [[0.5, 0, 0, 3], [0, 1, 0, 2], [0, 0, 2, 1], [0, 0, 0, 1]]
    )
    with pytest.raises(VolumeError, match="doesn't match"):
        write_labels(os.fspath(tmp_path / "crop.nii.gz"), mask[1:], meta)


def test_npe2_validate():
    npe2 = shutil.which("npe2", path=os.path.dirname(sys.executable)) or shutil.which("npe2")
    assert npe2, "npe2 command not found next to the interpreter"
    result = subprocess.run(
        [npe2, "validate", "napari_tae"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


# ------------------------------------------------------------------ through napari itself
def test_open_and_save_through_napari(make_napari_viewer, lps_file, tmp_path):
    viewer = make_napari_viewer()
    default_orientation = tuple(map(str, viewer.scene.camera.orientation))
    [layer] = viewer.open(lps_file, plugin="napari-tae")
    # the reader returns layer data only: the camera is the widget's and the demo's business
    assert tuple(map(str, viewer.scene.camera.orientation)) == default_orientation
    vol = load_volume(lps_file)
    np.testing.assert_allclose(layer.scale, vol.geometry.spacing)
    np.testing.assert_allclose(layer.translate, vol.geometry.origin)
    assert tuple(layer.axis_labels) == ("S", "A", "R")
    assert all(str(u) == "millimeter" for u in layer.units)
    # napari's data -> world mapping lands each voxel where the file's affine puts it
    src = nib.load(lps_file)
    for ijk in [(0, 0, 0), (23, 29, 8), (5, 17, 2)]:
        ras = (src.affine @ np.r_[ijk, 1.0])[:3]
        zyx = (ijk[2], 29 - ijk[1], 23 - ijk[0])  # LPS -> (S, A, R) index
        np.testing.assert_allclose(layer.data_to_world(zyx), ras[::-1], atol=1e-5)

    labels = viewer.add_labels(
        (layer.data > 120).astype(np.uint8),
        scale=layer.scale,
        translate=layer.translate,
        metadata={GEOMETRY_KEY: layer.metadata[GEOMETRY_KEY]},
        name="lesions",
    )
    out = os.fspath(tmp_path / "lesions.nii.gz")
    viewer.layers.selection = {labels}
    saved = viewer.layers.save(out, selected=True, plugin="napari-tae")
    assert saved == [out]
    written = nib.load(out)
    hdr, src_hdr = written.header, src.header
    assert written.get_data_dtype() == np.uint8
    assert written.shape == src.shape
    np.testing.assert_allclose(written.affine, src.affine)
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 2)
    np.testing.assert_allclose(hdr.get_qform(), src_hdr.get_qform(), atol=1e-6)
    np.testing.assert_allclose(hdr.get_sform(), src_hdr.get_sform(), atol=1e-6)
    np.testing.assert_array_equal(written.get_fdata(), src.get_fdata() > 120)
    assert sorted(os.listdir(tmp_path)) == ["lesions.nii.gz", "src"]  # no temporary left behind

    # the image layer through napari's writer machinery, then read back through the reader
    image_out = os.fspath(tmp_path / "copy.nii")
    viewer.layers.selection = {layer}
    assert viewer.layers.save(image_out, selected=True, plugin="napari-tae") == [image_out]
    [again] = viewer.open(image_out, plugin="napari-tae")
    np.testing.assert_array_equal(again.data, layer.data)
    np.testing.assert_allclose(again.translate, layer.translate)


def test_set_radiological_view_on_plain_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    set_radiological_view(viewer)
    assert tuple(map(str, viewer.scene.camera.orientation)) == RADIOLOGICAL_ORIENTATION
    assert tuple(map(str, viewer.scene.camera.orientation2d)) == ("up", "left")


# ------------------------------------------------------------------ real MS volume
@pytest.mark.skipif(not FLAIR.exists(), reason="real MS volume not present")
def test_real_ms_volume_geometry(tmp_path):
    vol = load_volume(FLAIR)
    img = nib.load(FLAIR)
    geo = vol.geometry
    # LAS 1 mm MNI-like grid, 182 x 218 x 182
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    assert geo.shape == (182, 218, 182) and geo.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert geo.origin == pytest.approx((-72.0, -126.0, 90.0 - 181.0))
    assert geo.source_shape == img.shape
    np.testing.assert_allclose(geo.source_affine, img.affine)
    # the same voxel, two ways: napari (S, A, R) index vs the file's (i, j, k)
    disk = img.get_fdata(dtype=np.float32)
    i, j, k = 100, 120, 80
    np.testing.assert_array_equal(vol.data[k, j, 181 - i], disk[i, j, k])

    if LESIONS.exists():
        lesions = load_volume(LESIONS)
        assert lesions.geometry.shape == geo.shape
        out = tmp_path / "lesions_copy.nii.gz"
        save_volume(lesions.data, geo, out, labels=True)
        np.testing.assert_array_equal(nib.load(out).get_fdata(), nib.load(LESIONS).get_fdata())
        np.testing.assert_allclose(nib.load(out).affine, img.affine)


def _write(tmp_path, name, data) -> str:
    img = nib.Nifti1Image(data, LPS)
    img.header.set_qform(LPS, code=1)
    img.header.set_sform(LPS, code=2)
    path = os.fspath(tmp_path / name)
    nib.save(img, path)
    return path


def test_reader_opens_masks_as_labels_and_scans_as_images(tmp_path, lps_file):
    lesions = np.zeros(SHAPE, np.uint8)
    lesions[5:9, 10:14, 3:5] = 1
    lesions[15:18, 20:22, 4] = 2
    data, kwargs, kind = read_nifti(_write(tmp_path, "lesions.nii.gz", lesions))[0]
    assert kind == "labels" and data.dtype.kind == "i"
    assert set(np.unique(data)) == {0, 1, 2} and int(data.sum()) == int(lesions.sum())
    assert kwargs["scale"] == pytest.approx((3.0, 1.1, 0.9))
    # a reference: every lesion in the reference colour, never the anomaly mask's
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_tae.plugin._layers import ANOMALY_COLOUR, REFERENCE_COLOUR

    colormap = kwargs["colormap"]
    for label in (1, 2):
        np.testing.assert_allclose(colormap.map(np.array([label]))[0], transform_color(REFERENCE_COLOUR)[0])
    assert REFERENCE_COLOUR != ANOMALY_COLOUR and colormap.map(np.array([0]))[0][3] == 0
    # a parcellation keeps napari's colour per label
    parcels = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 40
    assert "colormap" not in read_nifti(_write(tmp_path, "aseg.nii.gz", parcels.astype(np.int16)))[0][1]
    # a lesion-free case is a valid mask file
    data, _, kind = read_nifti(_write(tmp_path, "empty.nii.gz", np.zeros(SHAPE, np.int16)))[0]
    assert kind == "labels" and not data.any()
    # integer FLAIR with many grey values stays an image
    assert read_nifti(_write(tmp_path, "int_flair.nii.gz", (10 * _brainish()).astype(np.int16)))[0][2] == "image"
    assert read_nifti(lps_file)[0][2] == "image"
    with pytest.raises(VolumeError, match="constant"):
        read_nifti(_write(tmp_path, "flat.nii.gz", np.full(SHAPE, 3.5, np.float32)))


@pytest.mark.skipif(not LESIONS.exists(), reason="real MS data not present")
def test_real_lesion_mask_opens_as_labels():
    data, kwargs, kind = read_nifti(os.fspath(LESIONS))[0]
    assert kind == "labels" and data.shape == (182, 218, 182) and data.any()


# ------------------------------------------------------------------ integer FLAIRs
def _flair_levels(n_levels: int, dtype) -> np.ndarray:
    """A head-like integer volume with exactly ``n_levels`` grey values (0 outside)."""
    brain = _brainish()
    levels = np.round((brain - brain[brain > 0].min()) / np.ptp(brain[brain > 0]) * (n_levels - 2))
    return np.where(brain > 0, levels + 1, 0).astype(dtype)


@pytest.mark.parametrize(
    "name, data, kind",
    [
        ("flair.nii.gz", _flair_levels(200, np.uint8), "image"),  # uint8 FLAIR, < 256 values
        ("sub-01_FLAIR.nii.gz", _flair_levels(40, np.int16), "image"),  # few values, image name
        ("flair_brain.nii.gz", _flair_levels(30, np.uint8), "image"),  # skull-stripped, not a mask
        ("sub-01_lesion_seg.nii.gz", _flair_levels(40, np.int16), "labels"),  # few values + name
        ("aseg.nii.gz", _flair_levels(60, np.int16), "labels"),
        ("scan_labels.nii.gz", _flair_levels(200, np.uint8), "image"),  # too many for a name alone
        ("anything.nii.gz", (_brainish() > 120).astype(np.float32), "labels"),  # 0/1 only
        ("mask.nii.gz", _brainish() / 7.0, "image"),  # not integers
    ],
)
def test_integer_flairs_open_as_images_and_masks_as_labels(tmp_path, name, data, kind):
    path = _write(tmp_path, name, data)
    assert len(np.unique(data)) == len(np.unique(load_volume(path, allow_constant=True).data))
    layer_data, _, layer_type = read_nifti(path)[0]
    assert layer_type == kind
    if kind == "image":
        np.testing.assert_array_equal(layer_data, load_volume(path).data)


def test_nifti_label_intent_marks_a_label_map(tmp_path):
    img = nib.Nifti1Image(_flair_levels(100, np.int16), LPS)
    path = os.fspath(tmp_path / "parcels.nii.gz")
    nib.save(img, path)
    assert read_nifti(path)[0][2] == "image"
    img.header.set_intent("label")
    nib.save(img, path)
    assert read_nifti(path)[0][2] == "labels"


def test_int_flair_reaches_the_widget_and_converts_both_ways(make_napari_viewer, tmp_path,
                                                             monkeypatch):
    from napari.layers import Image, Labels
    from napari.layers._layer_actions import _convert_to_image, _convert_to_labels

    from napari_tae.plugin._widget import AnomalyWidget
    from napari_tae.settings import CONFIG_ENV

    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))

    viewer = make_napari_viewer()
    widget = AnomalyWidget(viewer, synchronous=True)
    [flair] = viewer.open(_write(tmp_path, "flair.nii.gz", _flair_levels(200, np.uint8)),
                          plugin="napari-tae")
    [seg] = viewer.open(_write(tmp_path, "lesion_seg.nii.gz", _flair_levels(40, np.int16)),
                        plugin="napari-tae")
    assert isinstance(flair, Image) and isinstance(seg, Labels)
    choices = [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert choices == ["flair"]
    # napari's own "Convert to Image" turns a layer read as labels into a selectable input, with
    # its placement and source geometry kept
    viewer.layers.selection = {seg}
    _convert_to_image(viewer.layers)
    converted = viewer.layers["lesion_seg"]
    assert isinstance(converted, Image)
    np.testing.assert_allclose(converted.scale, seg.scale)
    assert isinstance(converted.metadata[GEOMETRY_KEY], Geometry)
    choices = [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())]
    assert sorted(choices) == ["flair", "lesion_seg"]
    viewer.layers.selection = {converted}
    _convert_to_labels(viewer.layers)
    assert isinstance(viewer.layers["lesion_seg"], Labels)
    widget.cleanup()
