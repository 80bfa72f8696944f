"""napari reader contribution for NIfTI FLAIR volumes, and the radiological camera view.

The layer is placed in world millimetres (``scale`` = voxel size, ``translate`` = origin) of the
canonical RAS volume in napari order ``(S, A, R)``; the source geometry travels in
``layer.metadata`` so results can be written back on the original grid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from napari_tae.io import Volume, is_nifti_path, load_mask, load_volume, nifti_stem
from napari_tae.plugin._layers import contrast_limits, layer_kwargs, set_radiological_view

__all__ = [
    "is_label_volume",
    "napari_get_reader",
    "read_nifti",
]

LayerData = tuple[Any, dict[str, Any], str]
PathOrPaths = str | Sequence[str]

#: A file with integer voxels taking at most this many values opens as a Labels layer.
MAX_LABEL_VALUES = 256

def napari_get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData]] | None:
    """Return :func:`read_nifti` for ``.nii``/``.nii.gz`` paths (all of them), else None."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(is_nifti_path(p) for p in paths):
        return None
    return read_nifti


def is_label_volume(volume: Volume) -> bool:
    """True for masks and label maps: integer storage and few distinct integer values."""
    if volume.geometry.source_header.get_data_dtype().kind not in "iub":
        return False
    values = np.unique(volume.data)
    return values.size <= MAX_LABEL_VALUES and bool(np.all(values == np.round(values)))


def read_nifti(path: PathOrPaths) -> list[LayerData]:
    """Read NIfTI volumes: masks/label maps as Labels, anything else as Image layers.

    Raises VolumeError on broken files. An all-zero mask (a lesion-free case) is a valid Labels
    file; a constant image is refused.
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    layers = []
    for p in paths:
        volume = load_mask(p)
        kwargs = layer_kwargs(volume.geometry, nifti_stem(p))
        if is_label_volume(volume):
            layers.append((volume.data.astype(np.int32), kwargs, "labels"))
            continue
        if volume.data.min() == volume.data.max():
            load_volume(p)  # refuses constant images with its usual message
        kwargs.update(colormap="gray", contrast_limits=contrast_limits(volume.data))
        layers.append((volume.data, kwargs, "image"))
    _radiological_current_viewer()
    return layers


def _radiological_current_viewer() -> None:
    import napari

    viewer = napari.current_viewer()
    if viewer is not None:
        set_radiological_view(viewer)
