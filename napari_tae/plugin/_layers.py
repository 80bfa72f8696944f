"""napari layer helpers: world placement in millimetres, display window, radiological view.

A volume's layer is placed in world millimetres (``scale`` = voxel size, ``translate`` = origin) of
the canonical RAS volume in napari order ``(S, A, R)``; the source geometry travels in
``layer.metadata[GEOMETRY_KEY]`` so that results can be written back on the original grid.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from napari_tae.io import Geometry
from napari_tae.preprocess import brain_mask

__all__ = [
    "AXIS_LABELS",
    "DICOM_KEY",
    "GEOMETRY_KEY",
    "RADIOLOGICAL_ORIENTATION",
    "contrast_limits",
    "layer_kwargs",
    "set_radiological_view",
    "viewer_camera",
]

#: ``layer.metadata`` key of the source :class:`~napari_tae.io.Geometry`
GEOMETRY_KEY = "napari_tae_geometry"
#: ``layer.metadata`` key of the :class:`~napari_tae.dicom.DicomSeries` a layer was read from
DICOM_KEY = "napari_tae_dicom_series"
AXIS_LABELS = ("S", "A", "R")

#: Camera orientation (depth, vertical, horizontal) for the (S, A, R) axes: anterior up, the
#: patient's right on the screen's left, superior away from the viewer (seen from the feet).
RADIOLOGICAL_ORIENTATION = ("away", "up", "left")


def layer_kwargs(geometry: Geometry, name: str) -> dict[str, Any]:
    """napari layer keyword arguments placing a napari-order array in world mm coordinates."""
    return {
        "name": name,
        "scale": geometry.spacing,
        "translate": geometry.origin,
        "axis_labels": AXIS_LABELS,
        "units": ("mm", "mm", "mm"),
        "metadata": {GEOMETRY_KEY: geometry},
    }


def contrast_limits(data: np.ndarray) -> tuple[float, float]:
    """Display window: 1st to 99.5th percentile of the brain (of the volume if that is flat)."""
    with warnings.catch_warnings():
        # the not-skull-stripped warning is for the model; display works either way
        warnings.simplefilter("ignore")
        try:
            values = data[brain_mask(data)]
        except ValueError:
            values = data.ravel()
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.5]))
    if not hi > lo:
        lo, hi = float(data.min()), float(data.max())
    return lo, hi


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` (napari >= 0.9), else ``viewer.camera``."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def set_radiological_view(viewer: Any) -> None:
    """Radiological display through the camera: anterior up, patient's right on screen left.

    Flips the camera orientation instead of using negative layer scales, so world coordinates
    (and everything written back) stay in true RAS millimetres. Called where layers are added
    (the widget, the demo), never by the reader: a reader returns layer data only.
    """
    viewer_camera(viewer).orientation = RADIOLOGICAL_ORIENTATION
