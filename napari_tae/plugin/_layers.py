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
    "ANOMALY_COLOUR",
    "AXIS_LABELS",
    "BRAIN_MASK_COLOUR",
    "DICOM_KEY",
    "GEOMETRY_KEY",
    "RADIOLOGICAL_ORIENTATION",
    "REFERENCE_COLOUR",
    "SideBySide",
    "brain_mask_style",
    "contrast_limits",
    "follow_threshold",
    "layer_kwargs",
    "reference_style",
    "residual_limits",
    "result_style",
    "set_radiological_view",
    "single_colour",
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

#: Every lesion of the anomaly mask in one colour that stands out on grey FLAIR and on the
#: inferno heat overlay alike (napari's default label colours are random, some dark).
ANOMALY_COLOUR = "#00e5ff"
#: Reference masks (ground truth, an expert's mask) in a second, clearly different colour.
REFERENCE_COLOUR = "#ff3df2"
#: Opacity of the residual heat overlay: the FLAIR stays readable underneath.
RESIDUAL_OPACITY = 0.6
#: A positive stride fills napari's grid cells in layer-list order (index 0 first): the input,
#: below its results, comes first (left), then reconstruction, then residual.
GRID_STRIDE = 1

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


def single_colour(colour: str) -> Any:
    """Labels colormap showing every non-zero label in ``colour`` (0 transparent)."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: colour, 0: "transparent"})


#: the brain mask's outline: visible on grey FLAIR, away from the anomaly cyan and reference magenta
BRAIN_MASK_COLOUR = "#ffd400"


def brain_mask_style() -> dict[str, Any]:
    """``add_labels`` keywords of the brain mask a run used: an outline, so it shows where the
    extraction ended without tinting the brain; painting and erasing work as on any Labels layer."""
    return {"colormap": single_colour(BRAIN_MASK_COLOUR), "opacity": 0.8, "contour": 1}


def reference_style() -> dict[str, Any]:
    """``add_labels`` keywords of a reference mask (ground truth, a mask opened from a file): filled
    in its own colour, translucent over the FLAIR, distinct from the anomaly mask's outline."""
    return {"colormap": single_colour(REFERENCE_COLOUR), "opacity": 0.45}


def residual_limits(residual: np.ndarray, squash: float) -> tuple[float, float]:
    """Contrast limits of the residual overlay from the squash threshold (percent).

    Values at or below the threshold map to the colormap's black, which additive blending makes
    transparent: only what the mask could contain is coloured. The top is the 99.9th percentile of
    the residual above the threshold (at least three times the threshold), so the hottest lesions
    saturate and faint ones stay visible.
    """
    low = max(float(squash) / 100.0, 1e-4)
    above = residual[residual > low]
    top = float(np.percentile(above, 99.9)) if above.size else 0.0
    return low, max(top, 3.0 * low)


def follow_threshold(limits: tuple[float, float], squash: float) -> tuple[float, float]:
    """Residual contrast limits after a squash change: the start moves, the top is kept."""
    low = max(float(squash) / 100.0, 1e-4)
    return low, max(float(limits[1]), 3.0 * low)


def result_style(kind: str, *, squash: float, data: np.ndarray) -> dict[str, Any]:
    """napari ``add_image``/``add_labels`` keywords of a result layer (see ``docs/review.md``)."""
    if kind == "residual":
        return {"colormap": "inferno", "blending": "additive", "opacity": RESIDUAL_OPACITY,
                "contrast_limits": residual_limits(data, squash)}
    if kind == "score":  # what the mask thresholds (napari_tae.scores): hidden, shown on demand
        low, high = contrast_limits(data)
        return {"colormap": "inferno", "visible": False,
                "contrast_limits": (low, high if high > low else low + 1.0)}
    if kind == "reconstruction":
        low, high = contrast_limits(data)
        return {"colormap": "gray", "visible": False,
                "contrast_limits": (low, high if high > low else low + 1.0)}  # a flat image
    if kind == "anomaly mask":
        # the outline keeps the FLAIR and the heat inside a lesion visible
        return {"colormap": single_colour(ANOMALY_COLOUR), "opacity": 1.0, "contour": 1}
    raise ValueError(f"unknown result kind {kind!r}")


def _grid(viewer: Any) -> Any:
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9 moved the grid to the canvas
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


class SideBySide:
    """Toggle napari's grid mode with FLAIR, reconstruction and residual side by side.

    Other layers are hidden while the grid is on (napari's grid leaves hidden layers out); turning
    it off restores every layer's visibility and the residual's overlay blending.
    """

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self._visible: dict[Any, bool] = {}
        self._residual: tuple[Any, str, float, tuple[float, float]] | None = None

    @property
    def enabled(self) -> bool:
        return bool(_grid(self.viewer).enabled)

    def show(self, flair: Any, reconstruction: Any, residual: Any) -> None:
        shown = (flair, reconstruction, residual)
        if not self.enabled:
            self._visible = {layer: layer.visible for layer in self.viewer.layers}
            self._residual = (residual, residual.blending, residual.opacity,
                              tuple(residual.contrast_limits))
        for layer in self.viewer.layers:
            layer.visible = layer in shown
        # in its own cell the residual is opaque and shown from 0: all of it, not only the
        # part above the threshold
        residual.blending, residual.opacity = "translucent", 1.0
        residual.contrast_limits = (0.0, self._residual[3][1])
        grid = _grid(self.viewer)
        grid.stride, grid.shape, grid.enabled = GRID_STRIDE, (1, 3), True
        self.viewer.reset_view()  # the grid is three times wider than one view

    def hide(self) -> None:
        _grid(self.viewer).enabled = False
        layers = self.viewer.layers
        for layer, visible in self._visible.items():
            if layer in layers:
                layer.visible = visible
        if self._residual is not None and self._residual[0] in layers:
            residual, blending, opacity, limits = self._residual
            residual.blending, residual.opacity, residual.contrast_limits = blending, opacity, limits
        self._visible, self._residual = {}, None
