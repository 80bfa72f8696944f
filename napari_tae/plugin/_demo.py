"""``napari-tae demo``: napari with the sample volume, the anomaly widget docked and the default model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from napari_tae.cli import CLIError
from napari_tae.plugin._layers import set_radiological_view

__all__ = ["build_demo", "run_demo"]

_logger = logging.getLogger("napari_tae.cli")



def build_demo(viewer: Any, *, checkpoint: str | None = None, device: str = "auto",
               synchronous: bool = False) -> Any:
    """Load the sample into ``viewer``, dock the anomaly widget and select the model.

    napari is imported inside the functions, so that importing this module stays cheap. Returns the docked ``AnomalyWidget``.
    """
    from napari_tae.plugin._sample_data import SAMPLE_NAME, make_sample_data
    from napari_tae.plugin._widget import AnomalyWidget
    from napari_tae.checkpoint import (
        CheckpointError,
        bundled_checkpoints,
        default_checkpoint,
        resolve_checkpoint,
    )

    spec = checkpoint or default_checkpoint()
    try:
        path = resolve_checkpoint(spec)  # fail early, with the one-line message, on a bad name
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    layers = make_sample_data()
    for data, kwargs, kind in layers:
        layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
    # the ground truth as an outline, so the model's filled mask stays readable on top of it
    layer.contour = 1
    widget = AnomalyWidget(viewer, synchronous=synchronous)
    viewer.window.add_dock_widget(widget, name="Find anomalies (TAE)", area="right")
    widget.image_combo.setCurrentText(SAMPLE_NAME)
    if path is not None and spec not in bundled_checkpoints():
        widget.load_checkpoint_file(str(path))
    else:
        index = widget.model_combo.findData(spec)
        widget.model_combo.setCurrentIndex(index)
    widget.device_combo.setCurrentText(device)
    set_radiological_view(viewer)
    # open on the axial slice with the most ground truth, so the lesions are in view
    truth = layers[1][0]
    z = int(np.argmax((truth > 0).sum(axis=(1, 2)))) if truth.any() else truth.shape[0] // 2
    scale, translate = layers[1][1]["scale"], layers[1][1]["translate"]
    viewer.dims.set_point(0, translate[0] + z * scale[0])
    return widget


def _settle_qt(rounds: int = 10) -> None:
    """Let Qt lay out and paint pending changes (the headless demo has no event loop running)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    for _ in range(rounds):
        app.processEvents()


def run_demo(args: argparse.Namespace) -> int:
    """Run ``napari-tae demo``: napari with the sample volume, the widget and the default model.

    With ``--screenshot`` the model runs synchronously, the viewer is saved to the file and the
    command exits; otherwise the napari event loop runs until the window is closed.
    """
    # torch/timm first: loading them after Qt's OpenGL libraries segfaults (seen with triton's
    # shared library under PyQt6), and the widget would import them on the first run anyway
    import napari

    import napari_tae.inference  # noqa: F401
    import napari_tae.models  # noqa: F401
    from napari_tae.plugin._sample_data import SAMPLE_NAME

    headless = args.screenshot is not None
    if headless:
        shot = Path(args.screenshot)
        if not shot.parent.is_dir():
            raise CLIError(f"{shot}: folder does not exist")
        if shot.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            raise CLIError(f"{shot}: screenshot must be .png, .jpg, .bmp or .tif")
    viewer = napari.Viewer(title="napari-tae demo")
    try:
        widget = build_demo(viewer, checkpoint=args.checkpoint, device=args.device,
                            synchronous=headless)
        if not headless:
            _logger.info("demo: model '%s' selected; press Run in the dock", widget.checkpoint_spec())
            napari.run()
            return 0
        # room for the canvas and the dock side by side (Xvfb's default screen is small)
        viewer.window.resize(1400, 900)
        _settle_qt()
        widget.run()
        mask_layers = [layer for layer in viewer.layers if layer.name.endswith("anomaly mask")]
        if not mask_layers:
            raise CLIError(f"demo: the model run produced no mask ({widget.status.text()})")
        # the ground truth's outline on top of the result layers, as a reader would compare them
        truth = viewer.layers[f"{SAMPLE_NAME}_ground_truth"]
        viewer.layers.move(viewer.layers.index(truth), len(viewer.layers))
        _settle_qt()
        viewer.screenshot(str(shot), canvas_only=False, flash=False)
        n_voxels = int(np.count_nonzero(mask_layers[0].data))
        _logger.info("demo: %s, mask of %d voxels, screenshot %s", widget.status.text(), n_voxels, shot)
        return 0
    finally:
        if headless:
            viewer.close()
