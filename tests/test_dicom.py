"""DICOM series in (geometry against nibabel's affine of the source), refusals, SEG round trip.

The series are made here from NIfTI volumes with pydicom: MR Image Storage, uint16 stored values
with rescale slope/intercept, ImagePositionPatient/ImageOrientationPatient from the nibabel
affine converted to LPS, and a file order and InstanceNumbers unrelated to the slice order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy.spatial.transform import Rotation

from napari_tae.dicom import (
    DicomVolume,
    is_dicom_folder,
    list_series,
    load_dicom,
    output_name,
    write_seg,
)
from napari_tae.io import VolumeError, load_volume, save_volume

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "mslub_longitudinal_raw"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (20, 24, 7)  # NIfTI (i, j, k): columns, rows, slices


def _values(shape=SHAPE, seed=0) -> np.ndarray:
    """Distinct-looking integer intensities (a FLAIR-like range), so any axis mix-up shows."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1200, shape).astype(np.float64)


def write_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    description: str = "AX FLAIR",
    slope=1.0,
    intercept=0.0,
    series_uid: str | None = None,
    series_number: int = 3,
    seed: int = 0,
) -> list[Path]:
    """Write ``data`` (NIfTI axes, RAS ``affine``) as an MR series, one file per k slice.

    Column index = i, row index = j (pixel ``[row, column]`` = ``data[i, j, k]`` at ``(j, i)``);
    ``slope``/``intercept`` may be one value or one per slice. File names and InstanceNumbers
    are shuffled, so nothing but the positions tells the slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ affine
    col_step, row_step = lps[:3, 0], lps[:3, 1]  # moving along a row = next column
    orientation = [*(col_step / np.linalg.norm(col_step)), *(row_step / np.linalg.norm(row_step))]
    n = data.shape[2]
    slopes = np.broadcast_to(np.asarray(slope, float), (n,))
    intercepts = np.broadcast_to(np.asarray(intercept, float), (n,))
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(n) + 1
    names = rng.permutation(n)
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "napari-tae-test"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyID = "1"
        ds.StudyDate, ds.StudyTime = "20240101", "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.FrameOfReferenceUID = frame_uid
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
        ds.SliceThickness = 9.9  # deliberately wrong: the spacing must come from the positions
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = float(slopes[k]), float(intercepts[k])
        stored = np.round((data[:, :, k].T - intercepts[k]) / slopes[k])
        assert stored.min() >= 0 and stored.max() < 65536, "value out of uint16 range"
        assert np.allclose(stored * slopes[k] + intercepts[k], data[:, :, k].T), "not on the grid"
        ds.PixelData = stored.astype(np.uint16).tobytes()
        path = folder / f"IM{series_number}_{int(names[k]):04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def rescaled(stored: np.ndarray, slope, intercept) -> np.ndarray:
    """Real values of stored integers with a slope/intercept (one value or one per k slice)."""
    return stored * np.asarray(slope, float) + np.asarray(intercept, float)


def _nifti(tmp_path: Path, data: np.ndarray, affine: np.ndarray, name="source.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def _oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    rotation = Rotation.from_euler("xyz", [12, -17, 25], degrees=True).as_matrix()
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 3.3])
    affine[:3, 3] = [-80.5, 60.25, -30.0]
    return affine


LPS_AFFINE = np.array(
    [[-0.57, 0, 0, 110.0], [0, -0.57, 0, 95.0], [0, 0, 3.3, -60.0], [0, 0, 0, 1]]
)


@pytest.mark.parametrize(
    "affine, slope, intercept",
    [
        (_oblique_affine(), 0.5, 10.0),
        (LPS_AFFINE, [1.0, 2.0, 0.5, 1.0, 4.0, 1.0, 0.25], -7.0),  # slope changes per slice
        # slices stacked against the normal: file k runs towards the feet
        (np.array([[0.8, 0, 0, 0], [0, 0, -4.0, 20], [0, 1.2, 0, -5], [0, 0, 0, 1.0]]), 1.0, 0.0),
    ],
    ids=["oblique", "lps-per-slice-rescale", "coronal-reversed"],
)
def test_series_geometry_matches_nibabel(tmp_path, affine, slope, intercept):
    values = rescaled(_values(), slope, intercept)
    write_series(tmp_path / "dcm", values, affine, slope=slope, intercept=intercept)
    volume = load_dicom(tmp_path / "dcm")
    reference = load_volume(_nifti(tmp_path, values, affine))
    assert isinstance(volume, DicomVolume) and volume.data.dtype == np.float32
    assert volume.geometry.shape == reference.geometry.shape
    np.testing.assert_allclose(volume.geometry.ras_affine, reference.geometry.ras_affine, atol=1e-4)
    np.testing.assert_allclose(volume.geometry.spacing, reference.geometry.spacing, atol=1e-5)
    np.testing.assert_allclose(volume.geometry.origin, reference.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(volume.data, reference.data, atol=1e-3)
    # voxel by voxel through both affines: file voxel (i, j, k) of the source lands at its RAS
    # position in the DICOM volume's own affine
    dcm_affine = volume.geometry.source_affine
    for ijk in [(0, 0, 0), (19, 23, 6), (7, 11, 3)]:
        world = affine @ [*ijk, 1]
        dcm_ijk = np.round(np.linalg.solve(dcm_affine, world)[:3]).astype(int)
        np.testing.assert_allclose(dcm_affine @ [*dcm_ijk, 1], world, atol=1e-4)
        disk = volume.geometry.to_source(volume.data)
        assert disk[tuple(dcm_ijk)] == pytest.approx(values[ijk], abs=1e-3)


def test_nifti_outputs_on_the_series_grid(tmp_path):
    values = _values()
    write_series(tmp_path / "dcm", values, _oblique_affine())
    volume = load_dicom(tmp_path / "dcm")
    out = save_volume(volume.data > 600, volume.geometry, tmp_path / "mask.nii.gz", labels=True)
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, volume.geometry.source_affine, atol=1e-6)
    assert img.shape == SHAPE  # (columns, rows, slices): the series' own grid
    # same grid as the NIfTI the series was made from
    np.testing.assert_allclose(img.affine, _oblique_affine(), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj) > 0, values > 600)


def test_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "study"
    write_series(folder, _values(seed=1), LPS_AFFINE, description="AX FLAIR", series_number=4)
    write_series(folder, _values((16, 16, 5), seed=2), _oblique_affine(), description="T2 TSE",
                 series_number=2, seed=5)
    series = list_series(folder)
    assert [(s.description, s.n_slices, s.number) for s in series] == [
        ("T2 TSE", 5, 2), ("AX FLAIR", 7, 4)]
    with pytest.raises(VolumeError, match=r"study: 2 image series; choose one") as err:
        load_dicom(folder)
    assert series[0].uid in str(err.value) and "AX FLAIR" in str(err.value)
    flair = load_dicom(folder, series[1].uid)
    np.testing.assert_allclose(flair.data, load_volume(_nifti(tmp_path, _values(seed=1), LPS_AFFINE)).data)
    with pytest.raises(VolumeError, match="no series 1.2.3"):
        load_dicom(folder, "1.2.3")
    assert output_name(series[1]) == "AX_FLAIR"


def _slice_file(paths: list[Path], k: int) -> Path:
    """The file of slice ``k`` of a series written with ``LPS_AFFINE`` (by its position)."""
    z = LPS_AFFINE[2, 3] + k * LPS_AFFINE[2, 2]
    [path] = [p for p in paths if float(pydicom.dcmread(p).ImagePositionPatient[2]) == pytest.approx(z)]
    return path


def test_missing_slice_is_refused(tmp_path):
    _slice_file(write_series(tmp_path / "dcm", _values(), LPS_AFFINE), 3).unlink()
    with pytest.raises(VolumeError, match=r"dcm: series 'AX FLAIR' .*irregular slice spacing: "
                                          r"gap of 6.6 mm .* 3.3 mm elsewhere"):
        load_dicom(tmp_path / "dcm")


def test_mixed_orientation_is_refused(tmp_path):
    paths = write_series(tmp_path / "dcm", _values(), LPS_AFFINE)
    ds = pydicom.dcmread(paths[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an axial series
    ds.save_as(paths[2])
    with pytest.raises(VolumeError, match=r"dcm: .*mixed slice orientations \(2 different"):
        load_dicom(tmp_path / "dcm")


def test_duplicate_positions_are_refused(tmp_path):
    values = _values()
    folder = tmp_path / "dcm"
    uid = generate_uid()
    write_series(folder, values, LPS_AFFINE, series_uid=uid)
    (folder / "echo2").mkdir()
    for p in write_series(folder / "echo2", values, LPS_AFFINE, series_uid=uid, seed=3):
        p.rename(folder / f"E2{p.name}")
    with pytest.raises(VolumeError, match="slices share a position"):
        load_dicom(folder)


def _non_image(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SR"
    ds.save_as(path, enforce_file_format=True)


def test_non_image_and_empty_folders_are_refused(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    _non_image(folder / "SR0001")
    assert is_dicom_folder(folder)
    with pytest.raises(VolumeError, match=r"report: no image series; found only Basic Text "
                                          r"SR Storage x1$"):
        load_dicom(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    assert not is_dicom_folder(empty)
    with pytest.raises(VolumeError, match="empty: folder holds no DICOM file"):
        load_dicom(empty)
    # images without the Image Plane module (screenshots, some scanners' derived series)
    flat = tmp_path / "flat"
    for path in write_series(flat, _values((8, 8, 3)), LPS_AFFINE):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    with pytest.raises(VolumeError, match=r"flat: no image series; found only MR Image Storage "
                                          r"without position, orientation or pixel spacing x3$"):
        load_dicom(flat)
    # a report beside an image series is ignored, not an error
    write_series(folder, _values(), LPS_AFFINE)
    assert load_dicom(folder).data.shape == (7, 24, 20)


def test_dicomdir_file_set_points_to_its_subfolders(tmp_path):
    from pydicom.fileset import FileSet

    staging = tmp_path / "staging"
    paths = write_series(staging, _values(), LPS_AFFINE)
    file_set = FileSet()
    for path in paths:
        file_set.add(pydicom.dcmread(path))
    cd = tmp_path / "cd"
    file_set.write(cd)  # DICOMDIR at the root, the images in subfolders, as on a CD
    assert (cd / "DICOMDIR").is_file()
    with pytest.raises(VolumeError, match=r"cd: no image series; found only Media Storage "
                                          r"Directory Storage x1; the images may be in a "
                                          r"subfolder$"):
        load_dicom(cd)
    # beside the images of a series, a DICOMDIR is ignored
    (staging / "DICOMDIR").write_bytes((cd / "DICOMDIR").read_bytes())
    assert load_dicom(staging).data.shape == (7, 24, 20)


def test_single_slice_and_broken_file_are_refused(tmp_path):
    write_series(tmp_path / "one", _values((8, 8, 1)), LPS_AFFINE)
    with pytest.raises(VolumeError, match="one: .*a single slice"):
        load_dicom(tmp_path / "one")
    paths = write_series(tmp_path / "broken", _values(), LPS_AFFINE)
    blob = paths[0].read_bytes()
    paths[0].write_bytes(blob[:200])  # magic kept, header cut
    with pytest.raises(VolumeError, match=f"{paths[0].name}: incomplete DICOM file"):
        load_dicom(tmp_path / "broken")
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(blob))
    del ds.ImagePositionPatient
    ds.save_as(paths[0])
    with pytest.raises(VolumeError, match=f"{paths[0].name}: image without position"):
        load_dicom(tmp_path / "broken")
    paths[0].write_bytes(blob[:-100])  # pixel data cut
    with pytest.raises(VolumeError, match="broken: series 'AX FLAIR' .*pixel data cannot be read"):
        load_dicom(tmp_path / "broken")


# ------------------------------------------------------------------ DICOM SEG
def test_seg_round_trip_overlays_the_right_voxels(tmp_path):
    import highdicom as hd

    values = _values()
    paths = write_series(tmp_path / "dcm", values, _oblique_affine())
    volume = load_dicom(tmp_path / "dcm")
    mask_disk = np.zeros(SHAPE, bool)  # on the NIfTI source's axes
    mask_disk[3:9, 5:12, 2] = True
    mask_disk[10:12, 2:4, 4:6] = True
    # the mask in napari order, as inference gives it: through nibabel's reference geometry
    mask = load_volume(_nifti(tmp_path, mask_disk.astype(np.float32), _oblique_affine())).data > 0
    out = write_seg(mask, volume.geometry, volume.series, tmp_path / "case_mask.seg.dcm")
    seg = hd.seg.segread(out)
    assert seg.SegmentSequence[0].SegmentLabel == "Anomaly"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "napari-tae"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series.uid
    # every frame references the source instance holding that slice, and its pixels are the
    # mask on that slice (pixel [row, column] = mask[column, row, k])
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    position_to_k = {tuple(np.round((RAS_TO_LPS @ _oblique_affine() @ [0, 0, k, 1])[:3], 3)): k
                     for k in range(SHAPE[2])}
    frames = seg.pixel_array.reshape(-1, SHAPE[1], SHAPE[0])
    assert len(frames) == 3  # slices 2, 4 and 5; empty slices are omitted
    seen = set()
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source_uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = by_uid[source_uid]
        k = position_to_k[tuple(np.round([float(v) for v in source.ImagePositionPatient], 3))]
        np.testing.assert_array_equal(frame.astype(bool), mask_disk[:, :, k].T)
        seen.add(k)
    assert seen == {2, 4, 5}
    with pytest.raises(VolumeError, match="file exists"):
        write_seg(mask, volume.geometry, volume.series, out)
    other = load_dicom(write_series(tmp_path / "other", _values(), LPS_AFFINE)[0].parent)
    with pytest.raises(VolumeError, match="wrong.seg.dcm: the mask is not on the grid of series"):
        write_seg(mask, other.geometry, volume.series, tmp_path / "wrong.seg.dcm")


def test_seg_of_an_empty_mask(tmp_path):
    import highdicom as hd

    write_series(tmp_path / "dcm", _values(), LPS_AFFINE)
    volume = load_dicom(tmp_path / "dcm")
    out = write_seg(np.zeros(volume.data.shape, bool), volume.geometry, volume.series,
                    tmp_path / "empty.seg.dcm")
    seg = hd.seg.segread(out)
    assert not np.asarray(seg.pixel_array).any()
    assert sorted(os.listdir(tmp_path)) == ["dcm", "empty.seg.dcm"]  # no temporary left


# ------------------------------------------------------------------ real raw head
@pytest.mark.skipif(not RAW.exists(), reason="real raw heads not present")
def test_real_raw_head_as_dicom_series(tmp_path):
    source = min(RAW.glob("*.nii.gz"))
    img = nib.load(source)
    k0 = img.shape[2] // 2
    cropped = img.slicer[:, :, k0 - 3:k0 + 3]  # six slices keep the test fast
    values = np.asarray(cropped.dataobj).astype(np.float64)
    write_series(tmp_path / "dcm", values, cropped.affine)
    volume = load_dicom(tmp_path / "dcm")
    reference = load_volume(_nifti(tmp_path, values, cropped.affine))
    np.testing.assert_allclose(volume.geometry.ras_affine, reference.geometry.ras_affine, atol=1e-4)
    np.testing.assert_array_equal(volume.data, reference.data)


# ------------------------------------------------------------------ napari reader
def test_reader_contract_for_folders(tmp_path):
    from napari_tae.plugin._reader import napari_get_reader, read_dicom

    write_series(tmp_path / "dcm", _values(), LPS_AFFINE)
    assert napari_get_reader(os.fspath(tmp_path / "dcm")) is read_dicom
    nifti_only = tmp_path / "nifti"
    nifti_only.mkdir()
    _nifti(nifti_only, _values(), LPS_AFFINE)
    assert napari_get_reader(os.fspath(nifti_only)) is None
    assert napari_get_reader(os.fspath(tmp_path / "missing")) is None


def test_reader_opens_one_layer_per_series(make_napari_viewer, tmp_path, monkeypatch):
    from napari_tae.plugin._layers import (
        DICOM_KEY,
        GEOMETRY_KEY,
        RADIOLOGICAL_ORIENTATION,
    )
    from napari_tae.plugin._widget import AnomalyWidget
    from napari_tae.settings import CONFIG_ENV

    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    folder = tmp_path / "study"
    flair = rescaled(_values(seed=1), 2.0, 5.0)
    write_series(folder, flair, LPS_AFFINE, slope=2.0, intercept=5.0, series_number=4)
    write_series(folder, _values((16, 16, 5), seed=2), _oblique_affine(), series_number=5,
                 seed=4)  # same description: the names must still differ
    write_series(folder, _values((16, 16, 5), seed=3), _oblique_affine(), description="T2 TSE",
                 series_number=2, seed=5)
    viewer = make_napari_viewer()
    default_orientation = tuple(map(str, viewer.scene.camera.orientation))
    layers = viewer.open(os.fspath(folder), plugin="napari-tae")
    assert [layer.name for layer in layers] == ["T2 TSE", "AX FLAIR", "AX FLAIR (2)"]
    assert all(layer.ndim == 3 and type(layer).__name__ == "Image" for layer in layers)
    # the reader leaves the camera alone
    assert tuple(map(str, viewer.scene.camera.orientation)) == default_orientation
    reference = load_volume(_nifti(tmp_path, flair, LPS_AFFINE))
    flair_layer = viewer.layers["AX FLAIR"]
    np.testing.assert_allclose(flair_layer.data, reference.data)
    np.testing.assert_allclose(flair_layer.scale, reference.geometry.spacing)
    np.testing.assert_allclose(flair_layer.translate, reference.geometry.origin, atol=1e-4)
    assert flair_layer.metadata[DICOM_KEY].number == 4
    np.testing.assert_allclose(flair_layer.metadata[GEOMETRY_KEY].ras_affine,
                               reference.geometry.ras_affine, atol=1e-4)
    # the widget applies the radiological view where layers arrive
    widget = AnomalyWidget(viewer, synchronous=True)
    assert tuple(map(str, viewer.scene.camera.orientation)) == RADIOLOGICAL_ORIENTATION
    viewer.scene.camera.orientation = default_orientation
    viewer.open(os.fspath(folder), plugin="napari-tae")
    assert tuple(map(str, viewer.scene.camera.orientation)) == RADIOLOGICAL_ORIENTATION
    widget.cleanup()


def test_reader_skips_a_broken_series_beside_a_good_one(tmp_path):
    from napari_tae.plugin._reader import read_dicom

    folder = tmp_path / "study"
    write_series(folder, _values(), LPS_AFFINE)
    localizer = write_series(folder, _values((8, 8, 3)), LPS_AFFINE, description="localizer",
                             series_number=1, seed=2)
    ds = pydicom.dcmread(localizer[1])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(localizer[1])
    with pytest.warns(UserWarning, match=r"skipped: .*study: series 'localizer' .*mixed slice"):
        layers = read_dicom(os.fspath(folder))
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["AX FLAIR"]
    for p in folder.iterdir():
        if p not in localizer:
            p.unlink()
    with pytest.raises(VolumeError, match="localizer"):
        read_dicom(os.fspath(folder))


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def flair_case(tmp_path_factory):
    """A synthetic FLAIR with lesions, on a grid of 0.1 steps (uint16 with slope 0.1), as a
    NIfTI file and as a DICOM series (LPS, 2.5 mm slices) beside a second series."""
    from napari_tae.synthetic import add_anomalies, healthy_volume

    root = tmp_path_factory.mktemp("cli")
    data, affine = healthy_volume(3, shape=(40, 48, 14), spacing=(1.0, 1.0, 2.5))
    data, _ = add_anomalies(data, 3, kinds=("ms", "tumour"), affine=affine)
    lps_storage = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_storage[:3, 3] = [39, 47, 0]
    affine = affine @ lps_storage  # stored right-to-left, posterior-to-anterior, like scanners
    values = np.round(np.clip(data[::-1, ::-1], 0, None) / 0.1) * 0.1
    nifti = _nifti(root, values, affine, name="flair.nii.gz")
    folder = root / "study"
    write_series(folder, values, affine, slope=0.1, series_number=7)
    write_series(folder, _values((16, 16, 5)), _oblique_affine(), description="T2 TSE",
                 series_number=2, seed=5)
    return {"nifti": nifti, "folder": folder, "affine": affine, "series": list_series(folder)}


def test_cli_refuses_several_series_with_their_list(flair_case, tmp_path, capsys):
    from napari_tae.cli import main

    status = main(["segment", str(flair_case["folder"]), "-m", "intensity", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{flair_case['folder']}: 2 image series; choose one with --series UID" in err
    for s in flair_case["series"]:
        assert s.uid in err and f"{s.n_slices:>4} slices" in err and s.description in err
    assert list(tmp_path.iterdir()) == []  # nothing ran, not even the output folder
    status = main(["segment", str(flair_case["folder"]), "--series", "1.2.3", "-m", "intensity",
                   "-o", str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err
    assert f"{flair_case['folder']}: no series 1.2.3; its series are:" in err
    assert all(s.uid in err for s in flair_case["series"])
    single = tmp_path / "single"
    write_series(single, _values(), LPS_AFFINE)
    assert main(["segment", str(single), "--series", "1.2.3", "-m", "intensity",
                 "-o", str(tmp_path / "out")]) == 2
    assert "--series 1.2.3: no input DICOM folder holds this series" in capsys.readouterr().err


def test_cli_segments_a_series_and_writes_its_seg(flair_case, tmp_path):
    import highdicom as hd

    from napari_tae.cli import OUTPUT_SUFFIXES, main
    from napari_tae.dicom import SEG_SUFFIX

    flair = next(s for s in flair_case["series"] if s.description == "AX FLAIR")
    out = tmp_path / "out"
    # a fixed threshold: the mask must not be empty whatever the baseline's calibration
    args = ["-q", "segment", "-m", "intensity", "-o", str(out), "--min-size", "2", "--squash", "60"]
    assert main([*args, str(flair_case["folder"]), "--series", flair.uid]) == 0
    assert main([*args, str(flair_case["nifti"])]) == 0
    for suffix in (*OUTPUT_SUFFIXES, SEG_SUFFIX):
        assert (out / f"AX_FLAIR{suffix}").is_file()
    # the same scan as DICOM and as NIfTI: the same results, on the same grid
    dicom_mask = nib.load(out / "AX_FLAIR_mask.nii.gz")
    nifti_mask = nib.load(out / "flair_mask.nii.gz")
    np.testing.assert_allclose(dicom_mask.affine, flair_case["affine"], atol=1e-4)
    mask = np.asarray(dicom_mask.dataobj)
    np.testing.assert_array_equal(mask, np.asarray(nifti_mask.dataobj))
    assert 0 < mask.sum() < mask.size / 10
    provenance = json.loads((out / "AX_FLAIR_provenance.json").read_text())
    assert provenance["settings"]["dicom_series_uid"] == flair.uid
    assert provenance["outputs"]["seg"].endswith("AX_FLAIR_mask.seg.dcm")
    # the SEG: each frame references the source slice it lies on and holds its mask pixels
    seg = hd.seg.segread(out / f"AX_FLAIR{SEG_SUFFIX}")
    k_of = {h.SOPInstanceUID: round((float(h.ImagePositionPatient[2]) -
                                      float(flair_case["affine"][2, 3])) / 2.5)
            for h in flair.headers}
    frames = seg.pixel_array.reshape(-1, 48, 40)
    on_slices = []
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = k_of[uid]
        np.testing.assert_array_equal(frame, mask[:, :, k].T)
        on_slices.append(k)
    assert sorted(on_slices) == [k for k in range(mask.shape[2]) if mask[:, :, k].any()]
    # again: the set is complete, with the same request: skipped, nothing rewritten
    stamp = (out / f"AX_FLAIR{SEG_SUFFIX}").stat().st_mtime_ns
    assert main([*args, str(flair_case["folder"]), "--series", flair.uid]) == 0
    assert (out / f"AX_FLAIR{SEG_SUFFIX}").stat().st_mtime_ns == stamp
    record = json.loads((out / "AX_FLAIR_provenance.json").read_text())
    assert set(record["files"]) == {"reconstruction", "residual", "score", "mask", "brain", "lesions", "seg"}


def test_cli_dicom_folder_without_image_series_fails_by_name(flair_case, tmp_path, capsys):
    from napari_tae.cli import main

    report = tmp_path / "report"
    report.mkdir()
    _non_image(report / "SR1")
    gappy = tmp_path / "gappy"
    _slice_file(write_series(gappy, _values(), LPS_AFFINE), 3).unlink()
    status = main(["-q", "segment", str(report), str(gappy), str(flair_case["nifti"]),
                   "-m", "intensity", "-o", str(tmp_path / "out")])
    assert status == 2  # two inputs failed, by name, on one line each; the third ran
    errors = capsys.readouterr().err.splitlines()
    assert f"napari-tae: ERROR: {report}: no image series; found only Basic Text SR Storage x1" \
        in errors
    assert any(e.startswith(f"napari-tae: ERROR: {gappy}: series 'AX FLAIR'")
               and "irregular slice spacing" in e for e in errors)
    assert len(errors) == 3  # the two failures and the summary
    assert (tmp_path / "out" / "flair_provenance.json").is_file()


def test_widget_export_of_a_dicom_layer_writes_the_seg(make_napari_viewer, flair_case, tmp_path,
                                                       monkeypatch):
    import highdicom as hd

    from napari_tae.plugin._widget import AnomalyWidget
    from napari_tae.settings import CONFIG_ENV

    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    viewer = make_napari_viewer()
    viewer.open(os.fspath(flair_case["folder"]), plugin="napari-tae")
    widget = AnomalyWidget(viewer, synchronous=True)
    widget.image_combo.setCurrentText("AX FLAIR")
    widget.model_combo.setCurrentIndex(widget.model_combo.findData("intensity"))
    widget.device_combo.setCurrentText("cpu")
    widget.run()
    mask_layer = viewer.layers["AX FLAIR anomaly mask"]
    mask_layer.data[mask_layer.data.shape[0] // 2, 10:14, 10:14] = 1  # a manual edit is exported
    paths = widget.export(os.fspath(tmp_path), "case")
    assert paths is not None, widget.status.text()
    seg = hd.seg.segread(paths["seg"])
    flair = next(s for s in flair_case["series"] if s.description == "AX FLAIR")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair.uid
    # the SEG and the exported NIfTI mask say the same, slice by slice of the source series
    mask = np.asarray(nib.load(paths["mask"]).dataobj)
    by_uid = {h.SOPInstanceUID: h for h in flair.headers}
    frames = seg.pixel_array.reshape(-1, mask.shape[1], mask.shape[0])
    top = float(flair_case["affine"][2, 3])
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source = by_uid[group.DerivationImageSequence[0].SourceImageSequence[0]
                        .ReferencedSOPInstanceUID]
        k = round((float(source.ImagePositionPatient[2]) - top) / 2.5)
        np.testing.assert_array_equal(frame, mask[:, :, k].T)
    assert len(frames) == int(np.count_nonzero(mask.any(axis=(0, 1))))
    provenance = json.loads(paths["provenance"].read_text())
    assert provenance["settings"]["dicom_series_uid"] == flair.uid
    # the SEG is part of the overwrite check like the other files
    for kind, path in paths.items():
        if kind != "seg":
            path.unlink()
    assert widget.export(os.fspath(tmp_path), "case") is None
    assert "case_mask.seg.dcm: file exists" in widget.status.text()
    widget.cleanup()
