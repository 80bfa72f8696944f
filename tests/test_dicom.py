"""DICOM series in (geometry against nibabel's affine of the source), refusals, SEG round trip.

The series are made here from NIfTI volumes with pydicom: MR Image Storage, uint16 stored values
with rescale slope/intercept, ImagePositionPatient/ImageOrientationPatient from the nibabel
affine converted to LPS, and a file order and InstanceNumbers unrelated to the slice order.
"""

from __future__ import annotations

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
        ds.StudyDate = ds.StudyTime = ""
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


def test_missing_slice_is_refused(tmp_path):
    paths = write_series(tmp_path / "dcm", _values(), LPS_AFFINE)
    middle = [p for p in paths if pydicom.dcmread(p).ImagePositionPatient[2] == pytest.approx(-60 + 3 * 3.3)]
    middle[0].unlink()
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
    with pytest.raises(VolumeError, match=r"report: no image series, only non-image DICOM "
                                          r"objects \(Basic Text SR Storage x1\)"):
        load_dicom(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    assert not is_dicom_folder(empty)
    with pytest.raises(VolumeError, match="empty: folder holds no DICOM file"):
        load_dicom(empty)
    # a report beside an image series is ignored, not an error
    write_series(folder, _values(), LPS_AFFINE)
    assert load_dicom(folder).data.shape == (7, 24, 20)


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
    out = write_seg(mask, volume, tmp_path / "case_mask.seg.dcm")
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
        write_seg(mask, volume, out)


def test_seg_of_an_empty_mask(tmp_path):
    import highdicom as hd

    write_series(tmp_path / "dcm", _values(), LPS_AFFINE)
    volume = load_dicom(tmp_path / "dcm")
    out = write_seg(np.zeros(volume.data.shape, bool), volume, tmp_path / "empty.seg.dcm")
    seg = hd.seg.segread(out)
    assert not np.asarray(seg.pixel_array).any()
    assert sorted(os.listdir(tmp_path)) == ["dcm", "empty.seg.dcm"]  # no temporary left


# ------------------------------------------------------------------ real raw head
@pytest.mark.skipif(not RAW.exists(), reason="real raw heads not present")
def test_real_raw_head_as_dicom_series(tmp_path):
    source = sorted(RAW.glob("*.nii.gz"))[0]
    img = nib.load(source)
    k0 = img.shape[2] // 2
    cropped = img.slicer[:, :, k0 - 3:k0 + 3]  # six slices keep the test fast
    values = np.asarray(cropped.dataobj).astype(np.float64)
    write_series(tmp_path / "dcm", values, cropped.affine)
    volume = load_dicom(tmp_path / "dcm")
    reference = load_volume(_nifti(tmp_path, values, cropped.affine))
    np.testing.assert_allclose(volume.geometry.ras_affine, reference.geometry.ras_affine, atol=1e-4)
    np.testing.assert_array_equal(volume.data, reference.data)
