"""NIfTI loading/saving: round trips on data AND affine, geometry, and a corpus of bad files."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from napari_tae import io as tio
from napari_tae.io import Geometry, VolumeError, load_volume, save_volume
from napari_tae.plugin._layers import GEOMETRY_KEY, layer_kwargs

SHAPE = (12, 10, 7)


def _affine(matrix, offset=(-40.0, 25.0, 13.5)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = matrix
    aff[:3, 3] = offset
    return aff


_OBLIQUE = Rotation.from_euler("xz", [17, -9], degrees=True).as_matrix() @ np.diag([0.9, 1.2, 3.0])
AFFINES = {
    "ras_anisotropic": _affine(np.diag([0.9, 1.2, 3.0])),
    "lps": _affine(np.diag([-0.9, -1.2, 3.0])),
    "las": _affine(np.diag([-1.0, 1.0, 1.5])),
    # sagittal acquisition: i -> A, j -> S, k -> L (ASL)
    "permuted_asl": _affine(np.array([[0, 0, -1.1], [0.95, 0, 0], [0, 2.5, 0]])),
    "oblique": _affine(_OBLIQUE),
}


def write_nifti(
    path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    qform_code: int = 1,
    sform_code: int = 1,
    disk_dtype: type | None = None,
) -> str:
    """Write ``data`` with explicit qform/sform codes; ``disk_dtype`` int16 makes nibabel scale."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    if disk_dtype is not None:
        img.set_data_dtype(disk_dtype)
    nib.save(img, path)
    return os.fspath(path)


def _ramp(shape=SHAPE, dtype=np.float32) -> np.ndarray:
    # every voxel distinct, so any axis flip/permutation error changes the array
    return (np.arange(np.prod(shape)).reshape(shape) + 1).astype(dtype)


def _world_from_layer(geometry: Geometry, index) -> np.ndarray:
    """World (R, A, S) mm of a napari index, as napari places it (scale/translate)."""
    zyx = np.asarray(geometry.origin) + np.asarray(geometry.spacing) * np.asarray(index)
    return zyx[::-1]


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_round_trip_same_array_and_affine(tmp_path, name):
    affine = AFFINES[name]
    src = write_nifti(tmp_path / f"{name}.nii.gz", _ramp(), affine, qform_code=1, sform_code=2)
    vol = load_volume(src)
    assert vol.data.dtype == np.float32
    assert vol.geometry.source_path == src

    out = save_volume(vol.data, vol.geometry, tmp_path / "out.nii.gz")
    again = load_volume(out)
    np.testing.assert_array_equal(again.data, vol.data)
    np.testing.assert_allclose(again.geometry.source_affine, affine, atol=1e-5)
    # on-disk array identical to the source file's (reorientation undone, not just self-consistent)
    np.testing.assert_array_equal(nib.load(out).get_fdata(), nib.load(src).get_fdata())
    hdr, src_hdr = nib.load(out).header, nib.load(src).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 2)
    np.testing.assert_allclose(hdr.get_qform(), src_hdr.get_qform(), atol=1e-6)
    np.testing.assert_allclose(hdr.get_sform(), src_hdr.get_sform(), atol=1e-6)
    assert again.geometry.shape == vol.geometry.shape
    assert again.geometry.spacing == pytest.approx(vol.geometry.spacing)
    assert again.geometry.origin == pytest.approx(vol.geometry.origin)


@pytest.mark.parametrize("name", ["ras_anisotropic", "lps", "las", "permuted_asl"])
def test_canonical_ras_napari_order(tmp_path, name):
    """Each napari voxel lands at the world position the file's affine gives that voxel."""
    affine = AFFINES[name]
    disk = _ramp()
    vol = load_volume(write_nifti(tmp_path / "v.nii", disk, affine))
    geo = vol.geometry
    # axial slices first, and spacing positive: a (S, A, R) grid
    assert all(s > 0 for s in geo.spacing)
    rng = np.random.default_rng(0)
    for _ in range(20):
        napari_index = tuple(int(rng.integers(n)) for n in geo.shape)
        value = vol.data[napari_index]
        ijk = np.argwhere(disk == value)[0]
        expected = affine @ np.r_[ijk, 1.0]
        np.testing.assert_allclose(_world_from_layer(geo, napari_index), expected[:3], atol=1e-5)


def test_spacing_and_origin_by_hand(tmp_path):
    # LPS, 0.9 x 1.2 x 3 mm: R axis = -i, A axis = -j, S axis = k
    vol = load_volume(write_nifti(tmp_path / "lps.nii.gz", _ramp(), AFFINES["lps"]))
    geo = vol.geometry
    assert geo.shape == (7, 10, 12)
    assert geo.spacing == pytest.approx((3.0, 1.2, 0.9))
    # voxel (0,0,0) of the RAS array is disk voxel (11, 9, 0): x = -40 - 0.9*11, y = 25 - 1.2*9
    assert geo.origin == pytest.approx((13.5, 25 - 1.2 * 9, -40 - 0.9 * 11))
    kw = layer_kwargs(geo, "flair")
    assert kw["scale"] == geo.spacing and kw["translate"] == geo.origin
    assert kw["metadata"][GEOMETRY_KEY] is geo
    assert kw["units"] == ("mm", "mm", "mm") and len(kw["axis_labels"]) == 3


def test_int16_with_scl_slope(tmp_path):
    values = np.linspace(-3.7, 91234.5, np.prod(SHAPE)).reshape(SHAPE)  # too wide for int16
    src = write_nifti(tmp_path / "s.nii.gz", values, AFFINES["las"], disk_dtype=np.int16)
    stored = nib.load(src)
    assert stored.get_data_dtype() == np.int16 and stored.dataobj.slope != 1.0  # really scaled
    expected = stored.get_fdata()
    vol = load_volume(src)
    np.testing.assert_allclose(np.sort(vol.data.ravel()), np.sort(expected.ravel()), rtol=1e-6)
    out = save_volume(vol.data, vol.geometry, tmp_path / "o.nii.gz")
    written = nib.load(out)
    assert written.get_data_dtype() == np.float32
    assert written.dataobj.slope == 1.0 and written.dataobj.inter == 0.0  # scaling reset
    np.testing.assert_allclose(written.get_fdata(), expected, rtol=1e-6)
    np.testing.assert_array_equal(load_volume(out).data, vol.data)
    np.testing.assert_allclose(written.affine, AFFINES["las"], atol=1e-6)


def test_4d_singleton(tmp_path):
    disk = _ramp(SHAPE + (1,))
    src = write_nifti(tmp_path / "four.nii.gz", disk, AFFINES["lps"])
    vol = load_volume(src)
    assert vol.data.ndim == 3 and vol.geometry.source_shape == SHAPE + (1,)
    out = save_volume(vol.data, vol.geometry, tmp_path / "back.nii.gz")
    img = nib.load(out)
    assert img.shape == SHAPE + (1,)
    np.testing.assert_array_equal(img.get_fdata(), disk)
    np.testing.assert_allclose(img.affine, AFFINES["lps"], atol=1e-6)


def test_nifti2_and_uncompressed(tmp_path):
    img = nib.Nifti2Image(_ramp(), AFFINES["oblique"])
    nib.save(img, tmp_path / "n2.nii")
    vol = load_volume(tmp_path / "n2.nii")
    out = save_volume(vol.data, vol.geometry, tmp_path / "n2_out.nii")
    assert isinstance(nib.load(out), nib.Nifti2Image)
    np.testing.assert_array_equal(nib.load(out).get_fdata(), _ramp())


def test_qform_only_and_sform_only_codes_kept(tmp_path):
    for q, s in [(1, 0), (0, 3)]:
        src = write_nifti(tmp_path / f"q{q}s{s}.nii.gz", _ramp(), AFFINES["oblique"], qform_code=q,
                          sform_code=s)
        vol = load_volume(src)
        hdr = nib.load(save_volume(vol.data, vol.geometry, tmp_path / f"o{q}{s}.nii.gz")).header
        assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (q, s)
        np.testing.assert_allclose(hdr.get_best_affine(), AFFINES["oblique"], atol=1e-5)


def test_labels_dtype(tmp_path):
    vol = load_volume(write_nifti(tmp_path / "v.nii.gz", _ramp(), AFFINES["lps"]))
    mask = (vol.data > vol.data.mean()).astype(np.float32)
    out = save_volume(mask, vol.geometry, tmp_path / "m.nii.gz", labels=True)
    assert nib.load(out).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(load_volume(out).data, mask)
    big = mask.astype(np.int32) * 1000 - 3
    out = save_volume(big, vol.geometry, tmp_path / "big.nii.gz", labels=True)
    assert nib.load(out).get_data_dtype() == np.int16
    np.testing.assert_array_equal(load_volume(out).data, big)
    with pytest.raises(VolumeError, match="integers"):
        save_volume(mask * 0.5, vol.geometry, tmp_path / "half.nii.gz", labels=True)


def test_save_without_geometry_uses_scale_translate(tmp_path):
    data = _ramp((6, 8, 9))
    out = save_volume(data, None, tmp_path / "g.nii.gz", scale=(3.0, 1.2, 0.9),
                      translate=(10.0, -20.0, 30.0))
    vol = load_volume(out)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.geometry.spacing == pytest.approx((3.0, 1.2, 0.9))
    assert vol.geometry.origin == pytest.approx((10.0, -20.0, 30.0))


def test_save_refusals_and_atomicity(tmp_path, monkeypatch):
    src = write_nifti(tmp_path / "src.nii.gz", _ramp(), AFFINES["ras_anisotropic"])
    vol = load_volume(src)
    before = open(src, "rb").read()
    with pytest.raises(VolumeError, match="source volume") as err:
        save_volume(vol.data, vol.geometry, src, overwrite=True)
    assert "src.nii.gz" in str(err.value)
    with pytest.raises(VolumeError, match="source volume"):  # same file through another spelling
        save_volume(vol.data, vol.geometry, tmp_path / "." / "src.nii.gz", overwrite=True)
    assert open(src, "rb").read() == before

    out = save_volume(vol.data, vol.geometry, tmp_path / "out.nii.gz")
    with pytest.raises(VolumeError, match="exists"):
        save_volume(vol.data, vol.geometry, out)
    with pytest.raises(VolumeError, match=r"\.nii"):
        save_volume(vol.data, vol.geometry, tmp_path / "out.png")
    with pytest.raises(VolumeError, match="shape"):
        save_volume(vol.data[1:], vol.geometry, tmp_path / "bad.nii.gz")

    # a failing write leaves neither a partial file nor a temporary one, and the old file intact
    previous = open(out, "rb").read()

    def boom(img, filename):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tio.nib, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_volume(vol.data * 2, vol.geometry, out, overwrite=True)
    assert open(out, "rb").read() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz", "src.nii.gz"]


def test_to_source_from_source_inverse():
    geo = Geometry.from_affine(AFFINES["permuted_asl"], SHAPE + (1,))
    disk = _ramp(SHAPE + (1,))
    napari_order = geo.from_source(disk)
    assert napari_order.shape == geo.shape
    np.testing.assert_array_equal(geo.to_source(napari_order), disk)
    with pytest.raises(ValueError, match="shape"):
        geo.to_source(disk)


# ---------------------------------------------------------------- corpus of bad files
def _valid_bytes(tmp_path) -> bytes:
    path = write_nifti(tmp_path / "valid_tmp.nii.gz", _ramp(), AFFINES["lps"])
    data = open(path, "rb").read()
    os.remove(path)
    return data


def _header_only(path, shape, zooms=(1.0, 1.0, 1.0), sform=None):
    """A header claiming ``shape`` followed by a few bytes: dimension checks must fire first."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    pixdim = hdr["pixdim"].copy()
    pixdim[1:4] = zooms
    hdr["pixdim"] = pixdim
    hdr["qform_code"] = hdr["sform_code"] = 0
    if sform is not None:
        hdr.set_sform(sform, code=1)
    hdr["vox_offset"] = 352
    with open(path, "wb") as f:
        f.write(hdr.binaryblock)
        f.write(b"\0" * 4 + b"\0" * 64)


def _make_bad(kind: str, folder, tmp_path) -> tuple[str, str]:
    """Create one bad file in ``folder``; return its path and a word the error must contain."""
    aff = AFFINES["ras_anisotropic"]
    p = lambda name: os.fspath(folder / name)  # noqa: E731
    if kind == "missing":
        return p("missing.nii.gz"), "no such file"
    if kind == "text_as_nii":
        open(p("notes.nii"), "w").write("this is not an image\n" * 50)
        return p("notes.nii"), "NIfTI"
    if kind == "png_as_niigz":
        open(p("photo.nii.gz"), "wb").write(b"\x89PNG\r\n\x1a\n" + b"\0" * 500)
        return p("photo.nii.gz"), "NIfTI"
    if kind == "wrong_extension":
        open(p("scan.png"), "wb").write(_valid_bytes(tmp_path))
        return p("scan.png"), "not a NIfTI"
    if kind == "empty_file":
        open(p("empty.nii.gz"), "wb").close()
        return p("empty.nii.gz"), "empty"
    if kind == "truncated_gzip":
        blob = _valid_bytes(tmp_path)
        open(p("cut.nii.gz"), "wb").write(blob[: len(blob) // 2])
        return p("cut.nii.gz"), "corrupt"
    if kind == "corrupt_gzip":
        blob = bytearray(_valid_bytes(tmp_path))
        mid = len(blob) // 2
        blob[mid : mid + 64] = bytes(64)
        open(p("bitrot.nii.gz"), "wb").write(bytes(blob))
        return p("bitrot.nii.gz"), "corrupt"
    if kind == "truncated_nii":
        write_nifti(folder / "full.nii", _ramp(), aff)
        blob = open(p("full.nii"), "rb").read()
        os.remove(p("full.nii"))
        open(p("short.nii"), "wb").write(blob[: 352 + 100])
        return p("short.nii"), "corrupt"
    if kind == "gzip_of_garbage":
        with gzip.open(p("garbage.nii.gz"), "wb") as f:
            f.write(b"x" * 1000)
        return p("garbage.nii.gz"), "NIfTI"
    if kind == "nan":
        d = _ramp()
        d[3, 4, 5] = np.nan
        return write_nifti(folder / "nan.nii.gz", d, aff), "NaN"
    if kind == "inf":
        d = _ramp()
        d[0, 0, 0] = np.inf
        return write_nifti(folder / "inf.nii.gz", d, aff), "NaN/Inf"
    if kind == "constant_zero":
        return write_nifti(folder / "zeros.nii.gz", np.zeros(SHAPE, np.float32), aff), "constant"
    if kind == "constant_seven":
        d = np.full(SHAPE, 7, np.int16)
        return write_nifti(folder / "sevens.nii.gz", d, aff), "constant"
    if kind == "2d":
        return write_nifti(folder / "slice.nii.gz", _ramp((12, 10)), aff), "2D"
    if kind == "2d_singleton":
        return write_nifti(folder / "flat.nii.gz", _ramp((12, 10, 1)), aff), "2D"
    if kind == "several_volumes":
        return write_nifti(folder / "bold.nii.gz", _ramp(SHAPE + (3,)), aff), "more than one"
    if kind == "absurd_axis":
        _header_only(p("huge.nii"), (4000, 10, 10))
        return p("huge.nii"), "absurd"
    if kind == "absurd_total":
        _header_only(p("cube.nii"), (2000, 2000, 2000))
        return p("cube.nii"), "absurd"
    if kind == "zero_voxel_size":
        _header_only(p("flatvox.nii"), (10, 10, 10), sform=np.diag([1.0, 0.0, 1.0, 1.0]))
        return p("flatvox.nii"), "voxel size"
    if kind == "singular_affine":
        sform = np.array([[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        _header_only(p("skew.nii"), (10, 10, 10), sform=sform)
        return p("skew.nii"), "affine"
    if kind == "nan_voxel_size":
        _header_only(p("nanvox.nii"), (10, 10, 10), zooms=(1.0, np.nan, 1.0))
        return p("nanvox.nii"), "voxel size"
    raise AssertionError(kind)


BAD_KINDS = [
    "missing", "text_as_nii", "png_as_niigz", "wrong_extension", "empty_file", "truncated_gzip",
    "corrupt_gzip", "truncated_nii", "gzip_of_garbage", "nan", "inf", "constant_zero",
    "constant_seven", "2d", "2d_singleton", "several_volumes", "absurd_axis", "absurd_total",
    "zero_voxel_size", "nan_voxel_size", "singular_affine",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_gives_one_line_error(tmp_path, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    path, word = _make_bad(kind, folder, tmp_path)
    listing = sorted(os.listdir(folder))
    with pytest.raises(VolumeError) as err:
        load_volume(path)
    message = str(err.value)
    assert message.startswith(path + ": "), message
    assert "\n" not in message
    assert word.lower() in message.lower(), message
    assert sorted(os.listdir(folder)) == listing  # nothing written next to the input


def test_load_mask_accepts_an_empty_mask_but_load_volume_refuses_it(tmp_path):
    aff = AFFINES["lps"]
    path = write_nifti(tmp_path / "no_lesions.nii.gz", np.zeros(SHAPE, np.uint8), aff)
    with pytest.raises(VolumeError, match="constant"):
        load_volume(path)
    mask = tio.load_mask(path)
    assert mask.data.shape == SHAPE[::-1] and not mask.data.any()
    np.testing.assert_allclose(mask.geometry.source_affine, aff)


@pytest.mark.parametrize(("name", "stem"), [
    ("case_01.nii.gz", "case_01"), ("/a/b/Scan.NII.GZ", "Scan"), ("x.nii", "x"),
    ("sub.nii.nii.gz", "sub.nii"), ("notes.txt", "notes.txt"),
])
def test_nifti_stem(name, stem):
    assert tio.nifti_stem(name) == stem


def test_nifti_files_lists_only_nifti_files_directly_inside(tmp_path):
    for name in ("b.nii.gz", "a.NII", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.nii.gz").mkdir()  # a folder named like a volume is not a file
    assert [p.name for p in tio.nifti_files(tmp_path)] == ["a.NII", "b.nii.gz"]


def test_ras_affine_is_the_same_for_one_grid_stored_in_two_orientations():
    shape = (5, 6, 7)
    ras = np.array([[2.0, 0, 0, -10], [0, 3.0, 0, 20], [0, 0, 4.0, 5], [0, 0, 0, 1]])
    # the same voxels stored with the first axis reversed (L instead of R) and axes 1/2 swapped
    lps = ras.copy()
    lps[:, 0] = -ras[:, 0]
    lps[:3, 3] = ras[:3, 3] + ras[:3, 0] * (shape[0] - 1)
    lps = lps[:, [0, 2, 1, 3]]
    assert np.allclose(Geometry.from_affine(ras, shape).ras_affine, ras)
    assert np.allclose(Geometry.from_affine(lps, (shape[0], shape[2], shape[1])).ras_affine, ras)
    shifted = ras.copy()
    shifted[0, 3] += 2.0
    assert not np.allclose(Geometry.from_affine(shifted, shape).ras_affine, ras)
