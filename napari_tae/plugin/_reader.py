"""napari reader contributions: NIfTI FLAIR volumes and masks, and folders of DICOM series.

The layer is placed in world millimetres (``scale`` = voxel size, ``translate`` = origin) of the
canonical RAS volume in napari order ``(S, A, R)``; the source geometry travels in
``layer.metadata`` so results can be written back on the original grid. The readers return layer
data only; the radiological camera is set where layers are added (the widget, the demo).

A NIfTI file opens as Labels or Image by :func:`napari_tae.io.looks_like_label_map`. To change
that choice for one layer, napari's own layer-list actions "Convert to Image" / "Convert to
Labels" keep the data, placement and metadata (a second reader contribution for the same files
is no option: npe2 tries a plugin's compatible readers in no fixed order).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from napari_tae.dicom import DicomVolume, is_dicom_folder, list_series, load_series
from napari_tae.io import (
    Volume,
    VolumeError,
    is_nifti_path,
    load_mask,
    load_volume,
    looks_like_label_map,
    nifti_stem,
)
from napari_tae.plugin._layers import DICOM_KEY, contrast_limits, layer_kwargs, reference_style

__all__ = [
    "napari_get_reader",
    "read_dicom",
    "read_nifti",
]

LayerData = tuple[Any, dict[str, Any], str]

#: A label map with at most this many labels is a reference (a lesion mask, its instances or
#: kinds) shown in the reference colour; more is a parcellation, kept in napari's per-label colours.
REFERENCE_MAX_LABELS = 8
PathOrPaths = str | Sequence[str]
Reader = Callable[[PathOrPaths], list[LayerData]]


def _paths(path: PathOrPaths) -> list[str]:
    return [os.fspath(path)] if isinstance(path, str | os.PathLike) else [os.fspath(p) for p in path]


def napari_get_reader(path: PathOrPaths) -> Reader | None:
    """:func:`read_nifti` for NIfTI paths, :func:`read_dicom` for folders of DICOM files."""
    paths = _paths(path)
    if paths and all(is_nifti_path(p) for p in paths):
        return read_nifti
    if paths and all(is_dicom_folder(p) for p in paths):
        return read_dicom
    return None


def _image_layer(volume: Volume, name: str) -> LayerData:
    kwargs = layer_kwargs(volume.geometry, name)
    kwargs.update(colormap="gray", contrast_limits=contrast_limits(volume.data))
    return volume.data, kwargs, "image"


def read_nifti(path: PathOrPaths) -> list[LayerData]:
    """Read NIfTI volumes: masks/label maps as Labels, anything else as Image layers.

    Raises VolumeError on broken files. An all-zero mask (a lesion-free case) is a valid Labels
    file; a constant image is refused.
    """
    layers = []
    for p in _paths(path):
        volume = load_mask(p)
        name = nifti_stem(p)
        if looks_like_label_map(volume, p):
            kwargs = layer_kwargs(volume.geometry, name)
            if np.unique(volume.data).size <= REFERENCE_MAX_LABELS + 1:  # docs/review.md
                kwargs.update(reference_style())
            layers.append((volume.data.astype(np.int32), kwargs, "labels"))
            continue
        if volume.data.min() == volume.data.max():
            load_volume(p)  # refuses constant images with its usual message
        layers.append(_image_layer(volume, name))
    return layers


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name} ({n})", n + 1
    taken.add(candidate)
    return candidate


def read_dicom(path: PathOrPaths) -> list[LayerData]:
    """One 3D Image layer per image series of each folder, named after its SeriesDescription.

    A series that cannot be a volume (a localizer in three planes, a series with a missing
    slice) is skipped with a warning naming it, as long as another series of the folder opens;
    otherwise its one-line :class:`~napari_tae.io.VolumeError` is raised.
    """
    layers: list[LayerData] = []
    taken: set[str] = set()
    for folder in _paths(path):
        volumes: list[DicomVolume] = []
        errors: list[VolumeError] = []
        for series in list_series(folder):
            try:
                volumes.append(load_series(series))
            except VolumeError as exc:
                errors.append(exc)
        if not volumes:
            raise errors[0]
        for exc in errors:
            warnings.warn(f"skipped: {exc}", UserWarning, stacklevel=2)
        for volume in volumes:
            data, kwargs, kind = _image_layer(volume, _unique(volume.series.label, taken))
            kwargs["metadata"][DICOM_KEY] = volume.series
            layers.append((data, kwargs, kind))
    return layers
