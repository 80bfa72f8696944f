"""``napari-tae demo``: napari with the sample volume, the anomaly widget docked and the default model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_tae.cli import DEMO_SCORE, CLIError
from napari_tae.plugin._layers import set_radiological_view

__all__ = ["build_demo", "run_demo"]

_logger = logging.getLogger("napari_tae.cli")
DEMO_WINDOW = (1280, 800)



def build_demo(viewer: Any, *, checkpoint: str | None = None, device: str = "auto",
               synchronous: bool = False, score: str = DEMO_SCORE) -> Any:
    """Load the sample into ``viewer``, dock the anomaly widget and select the model and score.

    napari is imported inside the functions, so that importing this module stays cheap. Returns the docked ``AnomalyWidget``.
    """
    from napari_tae.checkpoint import (
        CheckpointError,
        bundled_checkpoints,
        default_checkpoint,
        resolve_checkpoint,
    )
    from napari_tae.plugin._sample_data import SAMPLE_NAME, make_sample_data
    from napari_tae.plugin._widget import AnomalyWidget

    spec = checkpoint or default_checkpoint()
    try:
        path = resolve_checkpoint(spec)  # fail early, with the one-line message, on a bad name
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    layers = make_sample_data()
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = AnomalyWidget(viewer, synchronous=synchronous)
    viewer.window.add_dock_widget(widget, name="Find anomalies (TAE)", area="right")
    widget.image_combo.setCurrentText(SAMPLE_NAME)
    if path is not None and spec not in bundled_checkpoints():
        widget.load_checkpoint_file(str(path))
    else:
        index = widget.model_combo.findData(spec)
        widget.model_combo.setCurrentIndex(index)
    widget.device_combo.setCurrentText(device)
    if widget.score_combo.findText(score) < 0:
        offered = [widget.score_combo.itemText(i) for i in range(widget.score_combo.count())]
        raise CLIError(f"demo: {spec} has no calibrated {score!r} score (available: {', '.join(offered)})")
    widget.score_combo.setCurrentText(score)
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


def display_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why napari cannot open a window here (None when it can, as far as one can tell).

    napari's canvas needs OpenGL on a real or virtual X/Wayland display: Qt's ``offscreen`` and
    ``minimal`` platforms have no OpenGL context, and Qt aborts the process (a core dump) when
    its xcb platform finds no X server. So this is checked before Qt starts.
    """
    env = os.environ if environ is None else environ
    platform = env.get("QT_QPA_PLATFORM", "").split(":")[0]
    hint = "run it under a virtual display: xvfb-run -a napari-tae demo ..."
    if platform in ("offscreen", "minimal"):
        return f"QT_QPA_PLATFORM={platform} has no OpenGL for napari's canvas; {hint}"
    on_linux = sys.platform.startswith("linux")
    if on_linux and platform in ("", "xcb") and not env.get("DISPLAY") and not (
            platform == "" and env.get("WAYLAND_DISPLAY")):
        return f"no display (DISPLAY is not set); {hint}"
    return None


def run_demo(args: argparse.Namespace) -> int:
    """Run ``napari-tae demo``: napari with the sample volume, the widget and the default model.

    With ``--screenshot`` the model runs synchronously, the viewer is saved to the file and the
    command exits; otherwise the napari event loop runs until the window is closed.
    """
    problem = display_problem()
    if problem is not None:
        raise CLIError(f"demo: {problem}")
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
                            synchronous=headless, score=args.score)
        if not headless:
            _logger.info("demo: model '%s' with the %s score selected; press Run in the dock",
                         widget.checkpoint_spec(), args.score)
            napari.run()
            return 0
        # a laptop screen: the layout must fit 1280 x 800 with the lesion table readable
        viewer.window.resize(*DEMO_WINDOW)
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
