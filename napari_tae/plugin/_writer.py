"""napari writer contributions: Labels and Image layers to NIfTI on the source grid.

A layer carrying the reader's geometry (``metadata[GEOMETRY_KEY]``) is written with the source
header (qform/sform and codes), undoing the reorientation; any other layer is written with a
diagonal affine from its ``scale``/``translate``. napari's save dialog has already asked before
replacing an existing file, so these writers overwrite, but never the source volume itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_tae.io import Geometry, VolumeError, save_volume
from napari_tae.plugin._layers import GEOMETRY_KEY

__all__ = ["write_image", "write_labels"]


def _write(path: str, data: Any, meta: dict, labels: bool) -> list[str]:
    if isinstance(data, list):  # multiscale: the full-resolution level
        data = data[0]
    array = np.asarray(data)
    geometry = (meta.get("metadata") or {}).get(GEOMETRY_KEY)
    if isinstance(geometry, Geometry) and array.shape != geometry.shape:
        raise VolumeError(
            path, f"layer shape {array.shape} doesn't match its source geometry {geometry.shape}"
        )
    if not isinstance(geometry, Geometry):
        geometry = None
    written = save_volume(
        array,
        geometry,
        path,
        labels=labels,
        scale=meta.get("scale"),
        translate=meta.get("translate"),
        overwrite=True,
    )
    return [str(written)]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer as an integer NIfTI (uint8/int16/int32 as the labels need)."""
    return _write(path, data, meta, labels=True)


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an Image layer as a float32 NIfTI."""
    return _write(path, data, meta, labels=False)
