"""``napari-tae demo``: sample volume, docked widget, default model; headless screenshot.

Needs a display: run under ``xvfb-run -a``. The sample and the model run take ~10-20 s each on a
2-core CPU, so the two tests here are the only ones that build the demo.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("qtpy")

# torch/timm before any OpenGL context: importing them after one segfaults (triton, PyQt6)
import napari_tae.inference  # noqa: E402, F401
import napari_tae.models  # noqa: E402, F401
from napari_tae.cli import DEMO_SCORE, CLIError  # noqa: E402
from napari_tae.settings import CONFIG_ENV  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    """The widget remembers settings (its JSON file, napari's plugin settings): never the user's."""
    from napari import settings as napari_settings

    napari_cfg = str(tmp_path / "napari" / "settings.yaml")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_CONFIG", napari_cfg)  # for subprocesses
    monkeypatch.setattr(napari_settings, "_CFG_PATH", napari_cfg)
    napari_settings._clear_plugin_settings_cache()
    yield
    napari_settings._clear_plugin_settings_cache()


def _read_rgb(path) -> np.ndarray:
    from imageio.v3 import imread

    return np.asarray(imread(path))[..., :3]


def test_demo_layers_model_and_visible_mask(make_napari_viewer, qtbot):
    from napari_tae.checkpoint import default_checkpoint
    from napari_tae.plugin._demo import build_demo
    from napari_tae.plugin._sample_data import SAMPLE_NAME

    # a shown window: with show=False napari 0.9's canvas screenshots come back black
    viewer = make_napari_viewer(show=True)
    widget = build_demo(viewer, synchronous=True)
    assert widget.checkpoint_spec() == default_checkpoint() != "intensity"
    assert widget.score_combo.currentText() == DEMO_SCORE
    assert widget.image_layer().name == SAMPLE_NAME
    assert viewer.scene.camera.orientation[1:] == ("up", "left")  # radiological: patient right on the left
    image = viewer.layers[SAMPLE_NAME]
    assert image.scale[0] > 1.0 and np.any(np.asarray(image.translate) != 0)

    widget.run()
    mask = viewer.layers[f"{SAMPLE_NAME} anomaly mask"]
    assert mask.visible and mask.data.any()
    np.testing.assert_allclose(mask.scale, image.scale)
    np.testing.assert_allclose(mask.translate, image.translate)

    # the screenshot shows the mask: its colour is on screen, and hiding it changes the picture
    viewer.window.resize(1400, 900)
    qtbot.wait(100)  # let the layout settle so both screenshots have the same size
    with_mask = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    mask.visible = False
    qtbot.wait(50)
    without = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    changed = np.abs(with_mask - without).sum(axis=-1) > 30
    assert changed.sum() > 50, changed.sum()
    colour = (np.asarray(mask.get_color(1))[:3] * 255).astype(int)
    # blended over grey at opacity 0.6 the label colour dominates its pixels: the changed pixels
    # lean towards it (their difference from the unmasked image points the same way)
    direction = colour - without[changed].mean(axis=0)
    shift = (with_mask[changed] - without[changed]).mean(axis=0)
    assert float(np.dot(direction, shift)) > 0


def test_demo_refuses_a_score_the_model_lacks(make_napari_viewer):
    from napari_tae.plugin._demo import build_demo

    with pytest.raises(CLIError, match="demo: intensity has no calibrated 'prior' score"):
        build_demo(make_napari_viewer(), checkpoint="intensity", score="prior")


def test_demo_screenshot_command(tmp_path):
    """The installed command, as a user runs it: exits 0 and writes a non-empty image."""
    shot = tmp_path / "demo.png"
    env = {**os.environ, CONFIG_ENV: str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-m", "napari_tae.cli", "demo", "--screenshot", str(shot)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    rgb = _read_rgb(shot)
    assert rgb.shape[0] > 200 and rgb.shape[1] > 200 and rgb.std() > 5
    assert "mask of" in done.stderr and "screenshot" in done.stderr


def test_demo_without_a_display_says_how_to_run_it(tmp_path):
    """No X server and no Qt platform chosen: one line naming xvfb-run, never a core dump."""
    shot = tmp_path / "demo.png"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env[CONFIG_ENV] = str(tmp_path / "config")
    code = ("import sys\nfrom napari_tae.cli import main\n"
            f"sys.exit(main(['demo', '--screenshot', {str(shot)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])  # not killed by a signal
    lines = [line for line in done.stderr.splitlines() if "demo:" in line]
    assert len(lines) == 1 and "xvfb-run" in lines[0] and "Traceback" not in done.stderr
    assert not shot.exists()


@pytest.mark.parametrize(("env", "ok"), [
    ({"DISPLAY": ":99"}, True),
    ({"QT_QPA_PLATFORM": "offscreen", "DISPLAY": ":99"}, False),  # no OpenGL for the canvas
    ({}, False),
    ({"WAYLAND_DISPLAY": "wayland-0"}, True),
    ({"QT_QPA_PLATFORM": "xcb", "WAYLAND_DISPLAY": "wayland-0"}, False),
])
def test_display_problem(env, ok):
    from napari_tae.plugin._demo import display_problem

    problem = display_problem(env)
    assert (problem is None) == ok or not sys.platform.startswith("linux")
    if problem is not None:
        assert "xvfb-run" in problem
