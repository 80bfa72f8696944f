"""NIfTI volumes in and out, with the geometry needed to write results back faithfully.

A FLAIR volume is loaded with nibabel, reoriented to the closest canonical RAS orientation and
transposed so that napari's axes are ``(Z, Y, X) = (S, A, R)``: axial slices first, as the model
(Ghorbel et al., BrainLes 2022) works on axial slices. :class:`Geometry` keeps the on-disk
header, affine and shape so that :func:`save_volume` can undo the reorientation and write a mask
on the original grid with the original qform/sform (rules: docs/geometry.md).

No napari import in this module: it is shared by the plugin, the CLI and training.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from napari_tae._atomic import atomic_path

__all__ = [
    "MAX_AXIS",
    "MAX_VOXELS",
    "NIFTI_SUFFIXES",
    "Geometry",
    "Volume",
    "VolumeError",
    "error_line",
    "is_nifti_path",
    "load_mask",
    "load_volume",
    "looks_like_label_map",
    "nifti_files",
    "nifti_stem",
    "same_file",
    "save_volume",
]

#: Largest accepted size of one spatial axis; MRI volumes are a few hundred voxels per axis.
MAX_AXIS = 2048
#: Largest accepted number of voxels (2 GiB as float32).
MAX_VOXELS = 512 * 1024 * 1024
#: Largest accepted voxel size in mm; anything above is a broken header, not an MRI.
MAX_SPACING = 100.0
#: NIfTI file endings, longest first so that stripping ``.nii.gz`` wins over ``.nii``.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
#: A label map with more values than this must say so by its NIfTI intent (``label``).
MAX_NAMED_LABEL_VALUES = 64
#: Words of a file name that mark a mask or label map (``flair_lesion_mask``, ``aseg``...).
_LABEL_WORDS = frozenset({
    "mask", "masks", "label", "labels", "labelmap", "seg", "segmentation", "lesion", "lesions",
    "gt", "truth", "groundtruth", "aseg", "aparc", "parcellation", "roi", "wmh", "annotation",
})


class VolumeError(ValueError):
    """A volume that cannot be read or written; the message is ``"<file>: <problem>"``."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def is_nifti_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``, any case)."""
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_files(folder: str | os.PathLike) -> list[Path]:
    """The NIfTI files directly inside ``folder`` (not recursive), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_nifti_path(p))


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without its NIfTI ending (``case_01.nii.gz`` -> ``case_01``; any case)."""
    name = os.path.basename(os.fspath(path))
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _canonical_affine(affine: np.ndarray, ornt: np.ndarray, source_shape: tuple[int, ...]) -> np.ndarray:
    """Affine of the array reoriented by ``ornt`` (nibabel's ``io_orientation``) to RAS."""
    return affine @ inv_ornt_aff(ornt, source_shape[:3])


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a napari-order array sits in the world, and how to put it back on disk.

    Attributes
    ----------
    shape : tuple of int
        ``(Z, Y, X)`` = ``(S, A, R)`` shape of the canonical array (axial slices first).
    spacing : tuple of float
        Voxel size in mm, napari order (``layer.scale``).
    origin : tuple of float
        World coordinate in mm of voxel ``(0, 0, 0)``, napari order (``layer.translate``).
    source_affine : ndarray
        4x4 affine of the file (nibabel's best affine: sform, else qform, else pixdim).
    source_header : nibabel.Nifti1Header
        Copy of the file's header (a ``Nifti2Header`` for NIfTI-2 files).
    source_shape : tuple of int
        On-disk shape, trailing singleton axes kept.
    source_path : str or None
        File the volume was read from; :func:`save_volume` refuses to write over it.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    source_affine: np.ndarray
    source_header: nib.Nifti1Header
    source_shape: tuple[int, ...]
    source_path: str | None = None

    @classmethod
    def from_affine(
        cls,
        affine: np.ndarray,
        source_shape: tuple[int, ...],
        header: nib.Nifti1Header | None = None,
        source_path: str | os.PathLike | None = None,
    ) -> Geometry:
        """Geometry of an on-disk array of ``source_shape`` with ``affine``.

        Without ``header`` a NIfTI-1 header is made with qform and sform both set to ``affine``
        (code 2, aligned). Used by :func:`load_volume` and by code that makes volumes in memory.
        """
        affine = np.asarray(affine, dtype=np.float64)
        source_shape = tuple(int(n) for n in source_shape)
        if header is None:
            header = nib.Nifti1Header()
            header.set_data_shape(source_shape)
            header.set_qform(affine, code=2)
            header.set_sform(affine, code=2)
        else:
            header = header.copy()
        ornt = io_orientation(affine)
        ras_affine = _canonical_affine(affine, ornt, source_shape)
        ras_shape = np.empty(3, dtype=int)
        ras_shape[ornt[:, 0].astype(int)] = source_shape[:3]  # file axis i -> RAS axis ornt[i, 0]
        # reversing (R, A, S) gives napari's (S, A, R) order
        spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)[::-1]
        origin = ras_affine[:3, 3][::-1]
        return cls(
            shape=tuple(int(n) for n in ras_shape[::-1]),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in origin),
            source_affine=affine,
            source_header=header,
            source_shape=source_shape,
            source_path=None if source_path is None else os.fspath(source_path),
        )

    @property
    def _ornt(self) -> np.ndarray:
        # deterministic from the affine, so not stored (keeps the dataclass to the contract)
        return io_orientation(self.source_affine)

    @property
    def ras_affine(self) -> np.ndarray:
        """Affine of the canonical (RAS) array: equal for two volumes on the same grid, whatever
        their on-disk axis order."""
        return _canonical_affine(self.source_affine, self._ornt, self.source_shape)

    def to_source(self, data: np.ndarray) -> np.ndarray:
        """Napari-order ``(S, A, R)`` array -> on-disk orientation and shape (a view if possible)."""
        data = np.asarray(data)
        if data.shape != self.shape:
            raise ValueError(f"Array shape {data.shape} doesn't match the geometry {self.shape}.")
        back = ornt_transform(_RAS, self._ornt)
        return apply_orientation(data.transpose(2, 1, 0), back).reshape(self.source_shape)

    def from_source(self, data: np.ndarray) -> np.ndarray:
        """On-disk array -> napari-order ``(S, A, R)`` array (inverse of :meth:`to_source`)."""
        data = np.asarray(data)
        if int(np.prod(data.shape)) != int(np.prod(self.source_shape)) or tuple(
            data.shape[:3]
        ) != tuple(self.source_shape[:3]):
            raise ValueError(
                f"Array shape {data.shape} doesn't match the on-disk shape {self.source_shape}."
            )
        data = data.reshape(self.source_shape[:3])
        return apply_orientation(data, self._ornt).transpose(2, 1, 0)


@dataclass
class Volume:
    """A loaded volume: float32 array in napari order and its :class:`Geometry`."""

    data: np.ndarray
    geometry: Geometry


def _check_header(path: str, img: nib.Nifti1Image) -> tuple[int, ...]:
    """Refuse shapes and voxel sizes that no brain MRI has, before reading any data."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or any(n == 1 for n in shape[:3]):
        raise VolumeError(path, f"2D image (shape {shape}); a 3D volume is needed")
    if any(n == 0 for n in shape):
        raise VolumeError(path, f"empty volume (shape {shape})")
    extra = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    if extra > 1:
        raise VolumeError(
            path, f"more than one volume (shape {shape}); a single 3D volume is needed"
        )
    if any(n > MAX_AXIS for n in shape[:3]) or int(np.prod(shape[:3])) > MAX_VOXELS:
        raise VolumeError(
            path, f"absurd dimensions {shape[:3]} (at most {MAX_AXIS} voxels per axis)"
        )
    # voxel sizes as the affine has them (sform, else qform): that is what the layer scale uses
    affine = np.asarray(img.affine, dtype=float)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(zooms < 1e-6) or np.any(zooms > MAX_SPACING):
        shown = tuple(round(float(z), 6) for z in zooms)
        raise VolumeError(path, f"invalid voxel size {shown} mm in the header affine")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9 * float(np.prod(zooms)):
        raise VolumeError(path, "invalid header affine (its axes are not independent)")
    return shape


def load_volume(path: str | os.PathLike, *, allow_constant: bool = False) -> Volume:
    """Load a 3D NIfTI volume in canonical RAS, napari order ``(S, A, R)``, as float32.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.nii`` or ``.nii.gz`` file with a 3D volume or a 4D volume with one time point.
    allow_constant : bool
        Accept constant data: an all-zero lesion mask is valid, a constant image is not.

    Returns
    -------
    Volume
        ``data`` (float32, scaling applied) and its :class:`Geometry`.

    Raises
    ------
    VolumeError
        One-line message naming the file: missing, not NIfTI, truncated/corrupt, empty, 2D,
        several volumes, absurd dimensions or voxel sizes, NaN/Inf voxels (refused, not
        cleaned: a silent fill would change the brain mask), or constant data.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VolumeError(path, "no such file")
    if not is_nifti_path(path):
        raise VolumeError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    if os.path.getsize(path) == 0:
        raise VolumeError(path, "empty file")
    try:
        # header only (lazy): dimensions are checked before any voxel is decompressed
        img = nib.load(path)
    except (nib.filebasedimages.ImageFileError, gzip.BadGzipFile) as exc:
        raise VolumeError(path, f"not a NIfTI file ({error_line(exc)})") from None
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise VolumeError(path, f"truncated or corrupt file ({error_line(exc)})") from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise VolumeError(path, f"not a NIfTI file (read as {type(img).__name__})")
    shape = _check_header(path, img)
    try:
        with open(path, "rb") as f:
            blob = f.read()
        if path.lower().endswith(".gz"):
            # whole-stream decompression verifies gzip's CRC and length, which a partial read
            # of the voxel bytes (what nibabel does) never reaches: bit rot would pass silently
            blob = gzip.decompress(blob)
        raw = np.asarray(type(img).from_bytes(blob).dataobj)
    except (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise VolumeError(path, f"truncated or corrupt file ({error_line(exc)})") from None
    del blob
    if raw.dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported data type {raw.dtype}")
    data = raw.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        raise VolumeError(path, f"{n_bad} NaN/Inf voxels (non-finite data are refused)")
    lo, hi = float(data.min()), float(data.max())
    if lo == hi and not allow_constant:
        raise VolumeError(path, f"constant volume (every voxel is {lo:g})")
    geometry = Geometry.from_affine(img.affine, shape, img.header, source_path=path)
    canonical = np.ascontiguousarray(geometry.from_source(data))
    return Volume(data=canonical, geometry=geometry)


def looks_like_label_map(volume: Volume, name: str | os.PathLike | None = None) -> bool:
    """Whether a loaded volume is a mask or label map rather than an (integer) image.

    A uint8 or int16 FLAIR often has fewer than 256 grey values, so the data type and the count
    of values alone do not tell. A label map is: only the values 0 and 1 (a mask, any data
    type; an empty mask too); or integer values, at most :data:`MAX_NAMED_LABEL_VALUES` of
    them, with a mask-like word in the file name (``mask``, ``label``, ``seg``, ``lesion``,
    ``gt``, ``aseg``...); or integer values in a NIfTI file whose intent is ``label``.
    """
    data = volume.data
    # a strided sample settles most float images before a pass over every voxel
    sample = data.ravel()[:: max(1, data.size // 100_000)]
    if not (_integer_valued(sample) and _integer_valued(data)):
        return False
    lo, hi = float(data.min()), float(data.max())
    if lo >= 0 and hi <= 1:
        return True
    if volume.geometry.source_header.get_intent()[0] == "label":
        return True
    words = re.split(r"[^a-z0-9]+", nifti_stem(name).lower()) if name is not None else []
    if not any(w in _LABEL_WORDS or w.endswith(("mask", "label", "labels", "seg")) for w in words):
        return False
    return hi - lo < MAX_NAMED_LABEL_VALUES or np.unique(data).size <= MAX_NAMED_LABEL_VALUES


def _integer_valued(data: np.ndarray) -> bool:
    return bool(np.array_equal(data, np.round(data)))


def load_mask(path: str | os.PathLike) -> Volume:
    """Load a mask or label volume (an empty mask is allowed); ``data`` holds the label values."""
    return load_volume(path, allow_constant=True)


def error_line(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """An exception as a one-line user message; names ``path`` when the message does not already."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if path is not None and os.fspath(path) not in text:
        text = f"{os.fspath(path)}: {text}"
    return text


def _label_dtype(data: np.ndarray, path: str) -> np.dtype:
    """Smallest NIfTI-friendly integer dtype holding the labels (uint8, int16, else int32)."""
    if data.size == 0:
        return np.dtype(np.uint8)
    if data.dtype.kind == "f" and not (np.all(np.isfinite(data)) and np.array_equal(data, np.round(data))):
        raise VolumeError(path, "labels must be integers")
    lo, hi = (int(data.min()), int(data.max())) if data.dtype != bool else (0, 1)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    raise VolumeError(path, f"label values {lo}..{hi} do not fit int32")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name one file (existing: same inode; else same resolved path)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _header_for(
    data: np.ndarray,
    geometry: Geometry | None,
    scale: Any,
    translate: Any,
    path: str,
) -> tuple[np.ndarray, nib.Nifti1Header]:
    """On-disk array and header: the source grid if known, else a diagonal affine."""
    if geometry is not None:
        if data.shape != geometry.shape:
            raise VolumeError(
                path, f"array shape {data.shape} doesn't match its geometry {geometry.shape}"
            )
        return geometry.to_source(data), geometry.source_header.copy()
    if data.ndim != 3:
        raise VolumeError(path, f"need a 3D array (got shape {data.shape})")
    scale = np.ones(3) if scale is None else np.asarray(scale, dtype=float)[-3:]
    translate = np.zeros(3) if translate is None else np.asarray(translate, dtype=float)[-3:]
    # napari (Z, Y, X) is treated as (S, A, R), the same convention the reader uses
    affine = np.diag([*scale[::-1], 1.0])
    affine[:3, 3] = translate[::-1]
    header = nib.Nifti1Header()
    header.set_qform(affine, code=2)
    header.set_sform(affine, code=2)
    header.set_xyzt_units("mm")
    return data.transpose(2, 1, 0), header


def save_volume(
    data: np.ndarray,
    geometry: Geometry | None,
    path: str | os.PathLike,
    *,
    labels: bool = False,
    scale: Any = None,
    translate: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a napari-order array as NIfTI on the source grid, atomically.

    Parameters
    ----------
    data : ndarray
        ``(S, A, R)`` array (``geometry.shape``) or, without geometry, any 3D array.
    geometry : Geometry or None
        Source geometry; the array is put back in the on-disk orientation and shape and written
        with the source header (qform, sform and their codes kept; scl_slope/inter reset).
        ``None`` writes a diagonal affine from ``scale``/``translate`` (napari order).
    path : str or os.PathLike
        ``.nii`` or ``.nii.gz`` output file.
    labels : bool
        Store integers (uint8, else int16, else int32) instead of float32.
    overwrite : bool
        Replace an existing file. The geometry's source file is never replaced.

    Returns
    -------
    Path
        The written file.
    """
    path = os.fspath(path)
    if not is_nifti_path(path):
        raise VolumeError(path, "output must end with .nii or .nii.gz")
    if geometry is not None and geometry.source_path and same_file(path, geometry.source_path):
        raise VolumeError(path, "refusing to write over the source volume")
    if os.path.exists(path) and not overwrite:
        raise VolumeError(path, "file exists; not replaced (--overwrite, or overwrite=True from Python, replaces it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VolumeError(path, "output folder does not exist")
    data = np.asarray(data)
    disk, header = _header_for(data, geometry, scale, translate, path)
    if labels:
        disk = disk.astype(_label_dtype(disk, path), copy=False)
    else:
        disk = disk.astype(np.float32, copy=False)
    header.set_data_dtype(disk.dtype)
    header.set_data_shape(disk.shape)
    header.set_slope_inter(1.0, 0.0)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # affine=None: the header's qform/sform and their codes are written unchanged
    img = image_class(disk, None, header=header)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)
