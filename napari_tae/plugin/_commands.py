"""Commands of the manifest that act on the viewer (the layer context menu's "Find anomalies...")."""

from __future__ import annotations

import napari  # resolved at run time: napari injects arguments by their type annotations

__all__ = ["find_anomalies"]

WIDGET_NAME = "Find anomalies (TAE)"  # napari.yaml: widgets' display_name


def find_anomalies(viewer: napari.viewer.Viewer) -> None:
    """Dock the anomaly widget (or raise the docked one) with the active image layer selected."""
    layer = viewer.layers.selection.active
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-tae", WIDGET_NAME)
    if layer is not None:
        widget.select_input(layer)
