"""DICOM series in, as the project's :class:`~napari_tae.io.Volume`, and a DICOM SEG of the mask out.

A folder's DICOM files are grouped by SeriesInstanceUID from their headers (pydicom); an image
series is checked (one orientation, one image size, slices at distinct positions along the
normal with regular gaps, no shear) and its voxels are read by SimpleITK's ImageSeriesReader
(GDCM: decompression, rescale slope/intercept per slice) in the order of the slice positions
along the normal. Its LPS geometry becomes a NIfTI-style RAS affine, so the volume goes through
preprocessing, inference and :func:`~napari_tae.io.save_volume` like a NIfTI file, and results
are written on the series' own grid. Decisions and what is refused: ``docs/dicom.md``.

No napari import in this module: it is shared by the plugin and the CLI.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_tae._atomic import atomic_path
from napari_tae.export import OUTPUT_KINDS
from napari_tae.io import (
    MAX_AXIS,
    MAX_VOXELS,
    Geometry,
    Volume,
    VolumeError,
    error_line,
)

if TYPE_CHECKING:  # pydicom is imported where it is used: the CLI's --help stays instant
    from pydicom.dataset import Dataset

__all__ = [
    "SEG_SUFFIX",
    "DicomSeries",
    "DicomVolume",
    "dicom_files",
    "format_series_table",
    "is_dicom_folder",
    "list_series",
    "load_dicom",
    "load_series",
    "output_name",
    "pick_series",
    "write_seg",
]

_logger = logging.getLogger(__name__)

#: Output file ending of the DICOM SEG written beside the NIfTI outputs.
SEG_SUFFIX = OUTPUT_KINDS["seg"]
#: Gaps between consecutive slices may differ from their median by this fraction (a missing
#: slice doubles a gap; DS rounding of ImagePositionPatient is ~1e-5 mm).
GAP_TOLERANCE = 0.01
#: Direction cosines of two slices count as the same orientation within this.
ORIENTATION_TOLERANCE = 1e-4
#: Sideways drift of a slice from the normal through the first one, in pixels (gantry tilt).
SHEAR_TOLERANCE = 0.1
#: LPS (DICOM patient coordinates) <-> RAS (NIfTI world coordinates)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """One series of a folder: its UID, how it presents itself, and its image headers.

    Attributes
    ----------
    folder : str
        Folder holding the files.
    uid : str
        SeriesInstanceUID.
    description : str
        SeriesDescription ("" when absent).
    number : int or None
        SeriesNumber.
    modality : str
        Modality ("" when absent).
    headers : tuple of pydicom.Dataset
        Headers (no pixel data) of the series' image instances, in file-name order;
        ``header.filename`` is the file.
    """

    folder: str
    uid: str
    description: str
    number: int | None
    modality: str
    headers: tuple[Dataset, ...]

    @property
    def n_slices(self) -> int:
        return len(self.headers)

    @property
    def label(self) -> str:
        """How the series is named to the user: its description, else its number or UID."""
        if self.description:
            return self.description
        return f"series {self.number}" if self.number is not None else self.uid


@dataclass
class DicomVolume(Volume):
    """A :class:`~napari_tae.io.Volume` read from a DICOM series (``series``, for the SEG)."""

    series: DicomSeries | None = None


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files (Part 10, ``DICM`` magic) directly inside ``folder``, sorted by name."""
    from pydicom.misc import is_dicom

    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_dicom(p))


def is_dicom_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a folder directly holding at least one DICOM file."""
    from pydicom.misc import is_dicom

    path = Path(folder)
    if not path.is_dir():
        return False
    try:
        return any(p.is_file() and is_dicom(p) for p in path.iterdir())
    except OSError:
        return False


def _read_header(path: Path) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as exc:
        raise VolumeError(path, f"unreadable DICOM file ({error_line(exc)})") from None


def _is_image_plane(header: Dataset) -> bool:
    """Single-frame image with the Image Plane module (position, orientation, spacing)."""
    return all(
        k in header for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                              "Rows", "Columns")
    ) and int(header.get("NumberOfFrames", 1) or 1) == 1


def _is_directory(header: Dataset) -> bool:
    """A DICOMDIR: the index of a DICOM file set, not an instance of any series."""
    from pydicom.uid import MediaStorageDirectoryStorage

    meta = getattr(header, "file_meta", None)
    return meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage


def _kind(header: Dataset) -> str:
    """What a non-image instance is, for the refusal message."""
    from pydicom.uid import UID

    sop = header.get("SOPClassUID", None) or header.file_meta.get("MediaStorageSOPClassUID", None)
    name = UID(str(sop)).name if sop else "object without SOP class"
    if int(header.get("NumberOfFrames", 1) or 1) > 1:
        if "Segmentation" not in name:
            name += " (multi-frame images are not supported)"
    elif name.endswith("Image Storage"):
        name += " without position, orientation or pixel spacing"
    return name


def list_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The image series of a DICOM folder, ordered by SeriesNumber then UID.

    Non-image objects (structured reports, presentation states, DICOMDIR, SEG, multi-frame
    objects) are left out; a folder with no image series is refused.

    Raises
    ------
    VolumeError
        Naming the folder: not a folder, no DICOM file, only non-image objects, or a file that
        has the DICOM magic but cannot be parsed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise VolumeError(folder, "no such folder")
    files = dicom_files(folder)
    if not files:
        raise VolumeError(folder, "folder holds no DICOM file")
    by_uid: dict[str, list[Dataset]] = {}
    others: dict[str, int] = {}
    planeless: list[Dataset] = []
    for path in files:
        header = _read_header(path)
        if not header.get("SeriesInstanceUID", None) and not _is_directory(header):
            # a Type 1 attribute of every instance: the file is cut short or not an instance
            raise VolumeError(path, "incomplete DICOM file (no SeriesInstanceUID; truncated?)")
        if not _is_image_plane(header):
            kind = _kind(header)
            others[kind] = others.get(kind, 0) + 1
            planeless.append(header)
            continue
        by_uid.setdefault(str(header.SeriesInstanceUID), []).append(header)
    for header in planeless:
        # an instance of an image series without its plane: dropping it would lose a slice
        members = by_uid.get(str(header.get("SeriesInstanceUID", "")), ())
        if any(m.get("SOPClassUID") == header.get("SOPClassUID") for m in members):
            raise VolumeError(header.filename, "image without position or orientation "
                                               "(truncated file?) in an image series")
    if not by_uid:
        found = ", ".join(f"{kind} x{n}" for kind, n in sorted(others.items()))
        hint = "; the images may be in a subfolder" if any(
            p.is_dir() for p in Path(folder).iterdir()) else ""
        raise VolumeError(folder, f"no image series; found only {found}{hint}")
    if others:
        _logger.info("%s: ignored %d non-image DICOM object(s)", folder, sum(others.values()))
    series = []
    for uid, headers in by_uid.items():
        first = headers[0]
        number = first.get("SeriesNumber", None)
        series.append(DicomSeries(
            folder=folder,
            uid=uid,
            description=str(first.get("SeriesDescription", "") or "").strip(),
            number=None if number in (None, "") else int(number),
            modality=str(first.get("Modality", "") or ""),
            headers=tuple(headers),
        ))
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


def format_series_table(series: Sequence[DicomSeries]) -> str:
    """One line per series: UID, slices, modality, description (for refusals and listings)."""
    width = max(len(s.uid) for s in series)
    return "\n".join(
        f"  {s.uid:<{width}}  {s.n_slices:>4} slices  {s.modality or '-':<3}  {s.description or '-'}"
        for s in series
    )


def output_name(series: DicomSeries) -> str:
    """File-name prefix for a series' outputs: its description, else the folder's name."""
    text = series.description or Path(series.folder).resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return name or "series"


def _fail(series: DicomSeries, problem: str) -> VolumeError:
    return VolumeError(series.folder, f"series '{series.label}' ({series.uid}): {problem}")


def _slice_order(series: DicomSeries) -> tuple[list[Dataset], float]:
    """The series' headers sorted by position along the slice normal, and the mean gap (mm).

    Refuses what no single regular 3D grid can hold: mixed orientations or image sizes, one
    slice, several slices at one position, missing or irregular slices, sheared stacks.
    """
    headers = list(series.headers)
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        n_distinct = len({tuple(np.round(o, 3)) for o in orientations})
        raise _fail(series, f"mixed slice orientations ({n_distinct} different "
                            "ImageOrientationPatient values); a volume needs one")
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise _fail(series, f"mixed image sizes {sorted(sizes)}")
    spacings = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
    if np.abs(spacings - spacings[0]).max() > 1e-4 * spacings[0].max():
        raise _fail(series, "mixed pixel spacings")
    if len(headers) < 2:
        raise _fail(series, "a single slice; a 3D volume needs several")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    if np.any(gaps <= 1e-3):
        n_shared = int(np.count_nonzero(gaps <= 1e-3)) + 1
        raise _fail(series, f"{n_shared} slices share a position (several echoes, time points "
                            "or acquisitions in one series)")
    median = float(np.median(gaps))
    irregular = np.flatnonzero(np.abs(gaps - median) > GAP_TOLERANCE * median)
    if irregular.size:
        i = int(irregular[0])
        raise _fail(series, f"irregular slice spacing: gap of {gaps[i]:.3g} mm after slice "
                            f"{i + 1} of {len(headers)}, {median:.3g} mm elsewhere "
                            "(missing slices?)")
    sideways = (positions - positions[0]) - np.outer(along - along[0], normal)
    if np.linalg.norm(sideways, axis=1).max() > SHEAR_TOLERANCE * spacings[0].min():
        raise _fail(series, "slices are offset sideways along the stack (gantry tilt); "
                            "not supported")
    mean_gap = float((along[-1] - along[0]) / (len(headers) - 1))
    return [headers[i] for i in order], mean_gap


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK prints its own sampling warnings to stderr; the checks above already decided."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def load_series(series: DicomSeries) -> DicomVolume:
    """Read one image series as a float32 volume in canonical RAS, napari order ``(S, A, R)``.

    Voxel sizes in-plane are PixelSpacing; between slices the mean gap of the positions along
    the normal (never SliceThickness). The geometry's affine is the NIfTI (RAS) equivalent of the
    series' LPS grid with the file axes ``(column, row, slice)``, so
    :func:`~napari_tae.io.save_volume` writes results on the series' grid.

    Raises
    ------
    VolumeError
        One line naming the folder, the series and the problem.
    """
    import SimpleITK as sitk

    slices, gap = _slice_order(series)
    first = slices[0]
    shape = (int(first.Columns), int(first.Rows), len(slices))  # file axes (i, j, k)
    if any(n > MAX_AXIS for n in shape) or int(np.prod(shape)) > MAX_VOXELS:
        raise _fail(series, f"absurd dimensions {shape} (at most {MAX_AXIS} voxels per axis)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([os.fspath(h.filename) for h in slices])
    reader.SetOutputPixelType(sitk.sitkFloat32)  # rescale slope/intercept may differ by slice
    try:
        with _itk_warnings_off():
            image = reader.Execute()
    except RuntimeError as exc:
        # ITK's message starts with its source location; the reason is its last line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise _fail(series, f"pixel data cannot be read ({lines[-1] if lines else exc})") from None
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=float)
    # ITK takes the slice spacing from the first two slices; the gaps are regular within
    # GAP_TOLERANCE, and the mean gap puts the first and the last slice exactly where they are
    spacing[2] = gap
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    affine = _LPS_TO_RAS @ lps
    # (slice, row, column) from SimpleITK -> file axes (column, row, slice) like a NIfTI array
    disk = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    if disk.min() == disk.max():
        raise _fail(series, f"constant volume (every voxel is {float(disk.min()):g})")
    geometry = Geometry.from_affine(affine, disk.shape, source_path=series.folder)
    data = np.ascontiguousarray(geometry.from_source(disk), dtype=np.float32)
    return DicomVolume(data=data, geometry=geometry, series=series)


def load_dicom(folder: str | os.PathLike, series_uid: str | None = None) -> DicomVolume:
    """Read the series ``series_uid`` of ``folder``, or its only image series.

    Raises
    ------
    VolumeError
        The folder's problem, an unknown UID, or several series without a UID (the message
        lists them, one per line after the first).
    """
    series = list_series(folder)
    return load_series(pick_series(series, series_uid))


def pick_series(series: Sequence[DicomSeries], series_uid: str | None) -> DicomSeries:
    """The series with ``series_uid``, or the only one; refusals list the folder's series."""
    folder = series[0].folder
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s
        raise VolumeError(folder, f"no series {series_uid}; its series are:\n"
                          + format_series_table(series))
    if len(series) > 1:
        raise VolumeError(folder, f"{len(series)} image series; choose one with --series UID:\n"
                          + format_series_table(series))
    return series[0]


def _on_series_grid(geometry: Geometry, slices: Sequence[Dataset]) -> bool:
    """Whether ``geometry``'s file axes are the slices' (column, row, slice) grid, in LPS."""
    first = slices[0]
    if tuple(geometry.source_shape[:3]) != (int(first.Columns), int(first.Rows), len(slices)):
        return False
    lps = _LPS_TO_RAS @ geometry.source_affine  # the flip is its own inverse
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    expected = {
        (0, 0, 0): np.array([float(v) for v in first.ImagePositionPatient]),
        (0, 0, len(slices) - 1): np.array([float(v) for v in slices[-1].ImagePositionPatient]),
    }
    expected[(1, 0, 0)] = expected[(0, 0, 0)] + orientation[:3] * col_spacing
    expected[(0, 1, 0)] = expected[(0, 0, 0)] + orientation[3:] * row_spacing
    tolerance = SHEAR_TOLERANCE * min(row_spacing, col_spacing)
    return all(np.linalg.norm((lps @ [*ijk, 1.0])[:3] - xyz) <= tolerance
               for ijk, xyz in expected.items())


def write_seg(
    mask: np.ndarray,
    geometry: Geometry,
    series: DicomSeries,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a binary DICOM SEG of ``mask`` (napari order, on ``geometry``) referencing ``series``.

    ``geometry`` is the one :func:`load_series` gave for ``series`` (a layer's metadata holds
    both). One segment, "Anomaly" (morphologically abnormal structure / lesion, automatic,
    algorithm napari-tae with its version); the frame of source slice ``k`` is the mask on it
    and references that slice's SOPInstanceUID (slices without anomaly are omitted). Written
    atomically.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from napari_tae import __version__

    path = os.fspath(path)
    slices, _ = _slice_order(series)
    if not _on_series_grid(geometry, slices):
        raise VolumeError(path, f"the mask is not on the grid of series {series.uid}")
    if os.path.exists(path) and not overwrite:
        raise VolumeError(path, "file exists; not replaced (--overwrite, or overwrite=True from Python, replaces it)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise VolumeError(path, "output folder does not exist")
    # napari (S, A, R) -> file axes (column, row, slice) -> SEG frames (slice, row, column)
    frames = geometry.to_source(np.asarray(mask) > 0).transpose(2, 1, 0)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="napari-tae", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=slices,
        pixel_array=np.ascontiguousarray(frames, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=(series.number or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-tae",
        manufacturer_model_name="napari-tae transformer autoencoder anomaly segmentation",
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"napari-tae anomaly mask of {series.label}"[:64],
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)
