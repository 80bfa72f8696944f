"""The dock widget in a real viewer (run under ``xvfb-run -a``): run, live sliders, review, export."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("qtpy")

from napari_tae.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from napari_tae.inference import segment  # noqa: E402
from napari_tae.io import load_volume  # noqa: E402
from napari_tae.models import build_model  # noqa: E402
from napari_tae.plugin._layers import GEOMETRY_KEY, layer_kwargs  # noqa: E402
from napari_tae.plugin._opengl import canvas_renderer, is_software_renderer  # noqa: E402
from napari_tae.plugin._widget import NEXT_KEY, AnomalyWidget  # noqa: E402
from napari_tae.settings import CONFIG_ENV, load_settings  # noqa: E402
from napari_tae.synthetic import sample_case  # noqa: E402

KINDS = ("reconstruction", "residual", "anomaly mask")
WAIT = 60_000  # ms; generous for a 2-core machine shared with other jobs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small synthetic FLAIR NIfTI on an oblique, anisotropic grid and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("widget")
    flair, _, _ = sample_case(0, shape=(40, 48, 16), n_lesions=3)
    rot = np.array([[-0.98, 0.17, 0.0], [-0.17, -0.98, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([4.0, 4.0, 9.0])
    aff[:3, 3] = [80.0, 100.0, -60.0]
    img = nib.Nifti1Image(flair, aff)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=2)
    nib.save(img, root / "flair.nii.gz")
    model = build_model("b_tae", img_size=64, depth=1, embed_dim=32, num_heads=2, patch_size=8)
    ckpt = save_checkpoint(root / "tiny.safetensors", model, preprocessing={},
                           calibration={"p99": 3.0, "default": 3.0})
    bad = root / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    return {"flair": root / "flair.nii.gz", "ckpt": ckpt, "bad": bad}


@pytest.fixture(autouse=True)
def _config(tmp_path, monkeypatch):
    """The widget remembers settings (its JSON file, napari's plugin settings): never the user's."""
    from napari import settings as napari_settings

    napari_cfg = str(tmp_path / "napari" / "settings.yaml")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_CONFIG", napari_cfg)  # for subprocesses
    monkeypatch.setattr(napari_settings, "_CFG_PATH", napari_cfg)
    napari_settings._clear_plugin_settings_cache()
    yield
    napari_settings._clear_plugin_settings_cache()


@pytest.fixture
def paused_after_first_batch(monkeypatch):
    """Hold every run after its first batch until the test sets the returned event.

    The tiny model finishes the volume in a few ms: without the pause, a cancel or close the test
    makes after seeing the first batch can come after the run's end, and the test then waits for a
    signal that was already sent.
    """
    import threading

    from napari_tae import inference

    resume = threading.Event()
    real_job = inference.inference_job

    def job(*args, **kwargs):
        steps = real_job(*args, **kwargs)
        yield next(steps)
        resume.wait(WAIT / 1000)
        return (yield from steps)

    monkeypatch.setattr(inference, "inference_job", job)
    yield resume
    resume.set()


def _add_volume(viewer, path, name="flair"):
    vol = load_volume(path)
    return viewer.add_image(vol.data, **layer_kwargs(vol.geometry, name)), vol


def _widget(make_napari_viewer, files, *, synchronous=False):
    viewer = make_napari_viewer()
    layer, vol = _add_volume(viewer, files["flair"])
    widget = AnomalyWidget(viewer, synchronous=synchronous)
    viewer.window.add_dock_widget(widget)
    assert widget.load_checkpoint_file(str(files["ckpt"]))
    widget.device_combo.setCurrentText("cpu")
    widget.image_combo.setCurrentText(layer.name)
    return viewer, widget, layer, vol


def _results(viewer, source="flair"):
    return [viewer.layers[f"{source} {k}"] for k in KINDS if f"{source} {k}" in viewer.layers]


def _wait_done(qtbot, widget, viewer, source="flair"):
    qtbot.waitUntil(lambda: not widget.is_running and len(_results(viewer, source)) == 3,
                    timeout=WAIT)


def test_run_layers_progress_and_headless_match(make_napari_viewer, qtbot, files, two_torch_threads):
    # at 2 threads, as on a 2-core machine: the worker thread's batches are split over two threads
    viewer, widget, layer, vol = _widget(make_napari_viewer, files)
    assert widget.squash_slider.value() == pytest.approx(3.0)  # calibrated default
    assert "CPU" in widget.device_label.text()
    seen = []
    widget.run()
    widget._worker.yielded.connect(seen.append)
    _wait_done(qtbot, widget, viewer)
    assert seen and seen[-1][0] == seen[-1][1] == vol.data.shape[0]
    recon, resid, mask = _results(viewer)
    for out in (recon, resid, mask):
        assert out.data.shape == layer.data.shape
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
        assert out.metadata[GEOMETRY_KEY] is layer.metadata[GEOMETRY_KEY]
    assert mask.__class__.__name__ == "Labels" and resid.colormap.name == "inferno"
    assert resid.blending == "additive" and 0.5 <= resid.opacity <= 0.7

    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # the reference: whole batches on one thread
    model, meta = load_checkpoint(files["ckpt"])
    ref = segment(vol, model, meta, kernel=widget.post_settings().kernel, device="cpu")
    torch.set_num_threads(2)
    np.testing.assert_allclose(resid.data, ref.residual, atol=1e-5)
    np.testing.assert_array_equal(mask.data > 0, ref.mask)
    assert widget.lesions.rowCount() == len(ref.lesions)
    assert list(mask.features["index"]) == [0] + [les["label"] for les in ref.lesions]

    # re-running updates the same layers instead of adding new ones
    n_layers = len(viewer.layers)
    widget.run()
    _wait_done(qtbot, widget, viewer)
    assert len(viewer.layers) == n_layers and _results(viewer)[2] is mask


def test_sliders_live_and_manual_edits(make_napari_viewer, qtbot, files):
    viewer, widget, layer, vol = _widget(make_napari_viewer, files, synchronous=True)
    widget.kernel_spin.setValue(1)
    widget.run()
    mask = viewer.layers["flair anomaly mask"]
    resid = viewer.layers["flair residual"].data
    brain = widget._active.brain
    # kernel 1 = plain threshold of the residual
    widget.squash_slider.setValue(2.0)
    np.testing.assert_array_equal(mask.data > 0, (resid > 0.02) & brain)
    # squash up: the mask only shrinks
    prev = mask.data > 0
    for squash in (2.5, 4.0, 8.0, 15.0):
        widget.squash_slider.setValue(squash)
        cur = mask.data > 0
        assert not (cur & ~prev).any()
        prev = cur
    widget.squash_slider.setValue(1.0)
    widget.kernel_spin.setValue(3)
    assert mask.data.any()

    # paint a blob far from anything and erase one automatic voxel, then move sliders
    painted = (slice(0, 2), slice(0, 3), slice(0, 3))
    edited = mask.data.copy()
    edited[painted] = 9
    erased = tuple(np.argwhere(mask.data > 0)[0])
    edited[erased] = 0
    mask.data = edited
    for change in (lambda: widget.squash_slider.setValue(0.5),
                   lambda: widget.kernel_spin.setValue(5),
                   lambda: widget.mode_check.setChecked(True)):
        change()
        assert (mask.data[painted] > 0).all() and mask.data[erased] == 0
    widget.reset_squash()
    assert widget.squash_slider.value() == pytest.approx(3.0)
    assert (mask.data[painted] > 0).all()
    assert widget._active.edits.n_added == 18 and widget._active.edits.n_erased == 1


def test_async_slider_preview_then_volume(make_napari_viewer, qtbot, files):
    viewer, widget, layer, _ = _widget(make_napari_viewer, files)
    widget.run()
    _wait_done(qtbot, widget, viewer)
    mask = viewer.layers["flair anomaly mask"]
    z = int(round(mask.world_to_data(viewer.dims.point)[0]))
    widget.squash_slider.setValue(0.5)
    # the visible slice is updated synchronously, the volume follows in the background
    from napari_tae.postprocess import anomaly_mask

    expected = anomaly_mask(widget._active.residual, kernel=widget.post_settings().kernel,
                            squash=0.5, brain=widget._active.brain)
    np.testing.assert_array_equal(mask.data[z] > 0, expected[z])
    qtbot.waitUntil(lambda: not widget.is_updating, timeout=WAIT)
    np.testing.assert_array_equal(mask.data > 0, expected)


def test_cancel_leaves_nothing(make_napari_viewer, qtbot, files):
    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    widget.settings.batch_size = 1
    widget.run()
    worker = widget._worker
    worker.yielded.connect(lambda _v: widget.cancel())  # cancel at the first batch
    with qtbot.waitSignal(worker.finished, timeout=WAIT):
        pass
    qtbot.wait(50)
    assert _results(viewer) == [] and not widget.is_running
    assert worker.abort_requested
    assert "Cancelled" in widget.status.text()


def test_run_twice_and_switch_layers(make_napari_viewer, qtbot, files):
    viewer, widget, layer, vol = _widget(make_napari_viewer, files)
    other = viewer.add_image(vol.data[:, :20, :30].copy(), name="other")
    widget.image_combo.setCurrentText("flair")
    widget.run()
    widget.run()                               # second click before the first finished
    widget.image_combo.setCurrentText("other")  # user switches layer during the run
    _wait_done(qtbot, widget, viewer)
    qtbot.wait(100)  # let a stale first run deliver (it must be dropped)
    assert len(_results(viewer)) == 3 and _results(viewer, "other") == []
    # reconstruction, residual, score and mask, once each, and the brain mask the run used
    assert len([ly for ly in viewer.layers if ly.name.startswith("flair ")]) == 5
    assert viewer.layers["flair anomaly mask"].data.shape == layer.data.shape

    # run on "other", then remove it mid-run: result discarded, no exception
    widget.run()
    viewer.layers.remove(other)
    qtbot.waitUntil(lambda: not widget.is_running or "discarded" in widget.status.text(),
                    timeout=WAIT)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT)
    assert _results(viewer, "other") == []


def test_bad_checkpoint_changes_nothing(make_napari_viewer, files):
    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    before = (widget.model_combo.currentData(), widget.model_combo.count(),
              load_settings().recent_checkpoints)
    assert not widget.load_checkpoint_file(str(files["bad"]))
    assert str(files["bad"]) in widget.status.text()
    after = (widget.model_combo.currentData(), widget.model_combo.count(),
             load_settings().recent_checkpoints)
    assert after == before


def test_export_round_trip(make_napari_viewer, qtbot, files, tmp_path):
    viewer, widget, layer, _ = _widget(make_napari_viewer, files, synchronous=True)
    widget.run()
    out = tmp_path / "out"
    out.mkdir()
    paths = widget.export(str(out), "case")
    src = nib.load(files["flair"])
    for kind in ("mask", "residual"):
        img = nib.load(paths[kind])
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
        np.testing.assert_allclose(img.get_qform(), src.get_qform(), atol=1e-5)
        np.testing.assert_allclose(img.get_sform(), src.get_sform(), atol=1e-5)
        assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 2)
    np.testing.assert_array_equal(load_volume(paths["mask"]).data > 0,
                                  viewer.layers["flair anomaly mask"].data > 0)
    prov = json.loads(paths["provenance"].read_text())
    assert prov["input"] == str(files["flair"].resolve())
    model = prov["model"]
    assert model["checkpoint"] == str(files["ckpt"].resolve()) and len(model["checkpoint_file_sha256"]) == 64
    assert model["weights_sha256"] and prov["settings"]["squash"] == pytest.approx(3.0)
    # the plugin's record has the CLI's schema: one reader serves both
    assert {"input", "input_sha256", "model", "settings", "lesions", "outputs", "software", "date"} <= set(prov)
    # and the CLI's settings, value for value (brain mask and its source, squash source, batch size)
    from napari_tae.export import jsonable

    model_, meta = load_checkpoint(files["ckpt"])
    headless = jsonable(segment(load_volume(files["flair"]), model_, meta, device="cpu").settings)
    assert {k: prov["settings"][k] for k in headless} == headless
    assert prov["settings"]["squash_source"] == "calibrated" and prov["settings"]["brain_mask"] == "non_background"
    widget.squash_slider.setValue(5.0)
    moved = json.loads(widget.export(str(out), "moved")["provenance"].read_text())["settings"]
    assert moved["squash"] == pytest.approx(5.0) and moved["squash_source"] == "user"
    stamp = paths["mask"].stat().st_mtime_ns
    assert widget.export(str(out), "case") is None          # refuses to overwrite
    assert "exists" in widget.status.text() and paths["mask"].stat().st_mtime_ns == stamp


def test_review_navigation_and_settings(make_napari_viewer, qtbot, files):
    viewer, widget, layer, _ = _widget(make_napari_viewer, files, synchronous=True)
    widget.kernel_spin.setValue(7)
    widget.squash_slider.setValue(0.5)
    widget.precision_combo.setCurrentText("bfloat16")
    widget.run()
    # the run used the chosen arithmetic, as the CLI's --precision does
    assert widget._active.run_settings["precision"] == "bfloat16"
    lesions = widget._active.lesions
    assert lesions
    widget.go_to_lesion(0)
    z_mm = lesions[0]["centroid_mm"][0]
    assert viewer.dims.point[0] == pytest.approx(z_mm, abs=layer.scale[0])
    assert widget.table.currentIndex().row() == 0
    # the stepping keys belong to the result layers, not to the whole viewer
    from napari.utils.key_bindings import coerce_keybinding

    mask = viewer.layers["flair anomaly mask"]
    key = coerce_keybinding(NEXT_KEY)
    assert key in mask.keymap and key in viewer.layers["flair residual"].keymap
    assert key not in viewer.keymap
    mask.keymap[key](mask)
    assert widget.table.currentIndex().row() == 1 % len(lesions)
    widget.close()

    s = load_settings()
    assert s.device == "cpu" and s.kernel == 7 and s.last_checkpoint == str(files["ckpt"])
    assert s.precision == "bfloat16"
    again = AnomalyWidget(viewer)
    assert again.checkpoint_spec() == str(files["ckpt"])
    assert again.kernel_spin.value() == 7 and again.device_combo.currentText() == "cpu"
    assert again.precision_combo.currentText() == "bfloat16"
    again.close()


def test_fresh_install_selects_the_default_bundled_model(make_napari_viewer, monkeypatch, tmp_path):
    from napari_tae import checkpoint
    from napari_tae.settings import Settings, save_settings

    bundled = sorted(checkpoint.bundled_checkpoints())
    assert len(bundled) >= 2
    # not the first in the list, so picking index 0 would fail this test
    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", bundled[-1])
    viewer = make_napari_viewer()
    widget = AnomalyWidget(viewer)
    assert widget.checkpoint_spec() == bundled[-1]
    widget.close()
    # a remembered checkpoint file that has since been deleted falls back to the default too
    save_settings(Settings(last_checkpoint=str(tmp_path / "gone.safetensors")))
    again = AnomalyWidget(viewer)
    assert again.checkpoint_spec() == bundled[-1]
    again.close()


def test_paint_refreshes_table_and_undo_takes_it_back(make_napari_viewer, qtbot, files):
    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    widget.run()
    _wait_done(qtbot, widget, viewer)
    mask = viewer.layers["flair anomaly mask"]
    n = widget.lesions.rowCount()
    mask.selected_label = 5
    mask.brush_size = 1
    mask.paint((0, 0, 0), 5)  # the brush API, as a user stroke does (emits the paint event)
    qtbot.waitUntil(lambda: widget.lesions.rowCount() == n + 1, timeout=WAIT)
    assert mask.data[0, 0, 0] > 0 and widget._active.edits.n_added >= 1
    widget.squash_slider.setValue(widget.squash_slider.value() + 0.5)  # a live update between
    qtbot.waitUntil(lambda: not widget.is_updating, timeout=WAIT)
    assert mask.data[0, 0, 0] > 0
    mask.undo()  # napari's undo history survives the widget's updates
    assert mask.data[0, 0, 0] == 0
    widget.squash_slider.setValue(widget.squash_slider.value() - 0.5)
    qtbot.waitUntil(lambda: not widget.is_updating, timeout=WAIT)
    # the undone voxel is back to automatic (not a new "erased" edit), and stays off
    assert mask.data[0, 0, 0] == 0 and widget.lesions.rowCount() == n
    assert widget._active.edits.n_added == 0 and widget._active.edits.n_erased == 0
    mask.redo()
    assert mask.data[0, 0, 0] > 0


def test_works_through_napari_public_proxy(make_napari_viewer, qtbot, files):
    """napari hands plugin widgets a PublicOnlyProxy of the viewer; everything must still work."""
    from napari.utils._proxies import PublicOnlyProxy

    viewer = make_napari_viewer()
    _add_volume(viewer, files["flair"])
    widget = AnomalyWidget(PublicOnlyProxy(viewer))
    viewer.window.add_dock_widget(widget)
    assert widget.load_checkpoint_file(str(files["ckpt"]))
    widget.device_combo.setCurrentText("cpu")
    widget.run()
    _wait_done(qtbot, widget, viewer)
    widget.squash_slider.setValue(0.5)
    qtbot.waitUntil(lambda: not widget.is_updating, timeout=WAIT)
    widget.go_to_lesion(0)
    widget.close()


def test_opens_and_runs_in_fresh_napari_process(tmp_path, files):
    """Fresh process, canvas first, widget and model run second (the real plugin order).

    In-process tests import torch before any viewer exists, which hides a crash: triton loaded
    after napari's OpenGL canvas segfaults next to Mesa's llvmpipe.
    """
    import os
    import subprocess
    import sys

    code = ("import napari\n"
            "from napari_tae.io import load_volume\nfrom napari_tae.plugin._layers import layer_kwargs\n"
            "v = napari.Viewer(show=False)\n"
            f"vol = load_volume({str(files['flair'])!r})\n"
            "v.add_image(vol.data, **layer_kwargs(vol.geometry, 'flair'))\n"
            "from napari_tae.plugin._widget import AnomalyWidget\n"
            "w = AnomalyWidget(v, synchronous=True)\n"
            "print('opened', w.model_combo.count())\n"
            "w.device_combo.setCurrentText('cpu')\n"
            f"assert w.load_checkpoint_file({str(files['ckpt'])!r})\n"
            "w.run()\n"
            "print('layers', sorted(layer.name for layer in v.layers))\n"
            "w.close(); v.close()\n")
    env = {**os.environ, CONFIG_ENV: str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and "opened" in proc.stdout, proc.stderr[-2000:]
    assert "flair anomaly mask" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_calibrated_squash_above_20_percent_is_not_clamped(make_napari_viewer, files, tmp_path):
    model = build_model("b_tae", img_size=64, depth=1, embed_dim=32, num_heads=2, patch_size=8)
    high = save_checkpoint(tmp_path / "blurry.safetensors", model, preprocessing={},
                           calibration={"p99": 34.9, "default": 34.9})
    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    assert widget.load_checkpoint_file(str(high))
    assert widget.squash_slider.value() == pytest.approx(34.9)
    assert widget.squash_slider.maximum() >= 34.9
    widget.squash_slider.setValue(5.0)
    widget.reset_squash()
    assert widget.squash_slider.value() == pytest.approx(34.9)


@pytest.mark.parametrize("value", [float("nan"), 250.0])
def test_checkpoint_with_a_calibration_outside_a_percentage_is_refused_not_clamped(
        make_napari_viewer, files, tmp_path, value):
    from test_checkpoint import _rewrite

    broken = _rewrite(files["ckpt"], tmp_path / "broken.safetensors",
                      edit=lambda meta: meta["calibration"].update(default=value))
    _, widget, _, _ = _widget(make_napari_viewer, files)
    before = (widget.checkpoint_spec(), widget.squash_slider.value(), widget.squash_slider.maximum())
    assert not widget.load_checkpoint_file(str(broken))
    assert str(broken) in widget.status.text() and "not a percentage" in widget.status.text()
    assert (widget.checkpoint_spec(), widget.squash_slider.value(), widget.squash_slider.maximum()) == before


# ------------------------------------------------------------------------------------- display
def test_overlay_display_settings(make_napari_viewer, files):
    from napari_tae.plugin._layers import ANOMALY_COLOUR, residual_limits

    viewer, widget, layer, _ = _widget(make_napari_viewer, files, synchronous=True)
    widget.run()
    recon, resid, mask = _results(viewer)
    # the heat overlay lets the FLAIR through: additive (black adds nothing), half opaque,
    # starting at the calibrated threshold
    assert resid.blending == "additive" and 0.5 <= resid.opacity <= 0.7
    assert resid.colormap.name == "inferno" and resid.colormap.map(np.array([0.0]))[0][:3].sum() < 0.05
    assert resid.contrast_limits[0] == pytest.approx(widget.post_settings().squash / 100)
    assert resid.contrast_limits[1] >= 3 * resid.contrast_limits[0]
    assert not recon.visible and layer.visible
    # the mask: one fixed colour for every lesion id, drawn as an outline
    from napari.utils.colormaps.standardize_color import transform_color

    want = transform_color(ANOMALY_COLOUR)[0]
    for label in (1, 2, 37):
        np.testing.assert_allclose(mask.colormap.map(np.array([label]))[0], want, atol=1e-6)
    assert mask.colormap.map(np.array([0]))[0][3] == 0 and mask.contour >= 1
    # moving the squash moves the start of the heat scale with it; the top stays
    top = resid.contrast_limits[1]
    assert resid.contrast_limits == pytest.approx(residual_limits(resid.data, 3.0))
    widget.squash_slider.setValue(5.0)
    assert resid.contrast_limits == pytest.approx((0.05, max(top, 0.15)))


def test_side_by_side_grid_and_back(make_napari_viewer, files):
    viewer, widget, layer, _ = _widget(make_napari_viewer, files, synchronous=True)
    truth = viewer.add_labels(np.zeros(layer.data.shape, np.uint8), name="truth")
    widget.show_side_by_side(True)  # no result yet: refused with a message, grid stays off
    assert not viewer.canvas.grid.enabled and "run a model" in widget.status.text()
    widget.run()
    recon, resid, mask = _results(viewer)
    widget.side_button.click()
    assert widget.side_button.isChecked() and viewer.canvas.grid.enabled
    assert [ly.name for ly in viewer.layers if ly.visible] == ["flair", recon.name, resid.name]
    assert viewer.canvas.grid.shape == (1, 3)
    # FLAIR, reconstruction, residual from left to right
    assert [viewer.canvas.grid.position(viewer.layers.index(ly), viewer.layers)
            for ly in (layer, recon, resid)] == [(0, 0), (0, 1), (0, 2)]
    widget.side_button.click()
    assert not viewer.canvas.grid.enabled and mask.visible and truth.visible and not recon.visible
    assert resid.blending == "additive"


def test_dock_fits_a_1280x800_screen(make_napari_viewer, qtbot, files):
    """Everything readable in the dock at 1280 x 800: all six table columns, the CPU warning."""
    from qtpy.QtCore import Qt

    viewer, widget, _, _ = _widget(make_napari_viewer, files, synchronous=True)
    viewer.window._qt_window.resize(1280, 800)
    widget.run()
    qtbot.wait(100)
    table = widget.table
    header = table.horizontalHeader()
    visible = table.viewport().width()
    assert sum(header.sectionSize(c) for c in range(6)) <= visible + 1
    assert all(header.sectionSize(c) >= header.fontMetrics().horizontalAdvance(
        widget.lesions.headerData(c, Qt.Orientation.Horizontal)) for c in range(6))
    label = widget.device_label
    assert label.wordWrap() and label.width() <= widget.width()
    assert label.heightForWidth(label.width()) <= label.height() + 1  # no line cut off


def test_device_line_warns_of_emulated_cpu_bfloat16(make_napari_viewer, files, monkeypatch):
    from napari_tae import inference

    monkeypatch.setattr(inference, "_cpu_has_bfloat16", lambda: False)
    _, widget, _, _ = _widget(make_napari_viewer, files)
    widget.precision_combo.setCurrentText("bfloat16")
    assert "no bfloat16 instructions" in widget.device_label.text()
    assert "AVX-512 BF16" in widget.device_label.text()  # the note's case is kept
    widget.precision_combo.setCurrentText("float32")
    assert "Running on CPU" in widget.device_label.text()
    monkeypatch.setattr(inference, "_cpu_has_bfloat16", lambda: True)
    widget.precision_combo.setCurrentText("bfloat16")
    assert "Running on CPU" in widget.device_label.text()


# ------------------------------------------------------------------------------------- errors
def _mismatched_checkpoint(path, good):
    """A checkpoint whose metadata describes one model and whose tensors belong to another."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), "pt") as f:
        header = f.metadata()
    other = build_model("b_tae", img_size=64, depth=1, embed_dim=48, num_heads=2, patch_size=8)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path), metadata=header)
    return path


def _truncated_checkpoint(path, good):
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header reads fine, the tensors are cut
    return path


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


@pytest.mark.parametrize("make_bad", [_truncated_checkpoint, _mismatched_checkpoint])
def test_browse_validates_the_whole_checkpoint(make_napari_viewer, files, tmp_path, make_bad,
                                               notifications):
    from napari_tae.checkpoint import read_metadata

    bad = make_bad(tmp_path / "bad.safetensors", files["ckpt"])
    read_metadata(bad)  # the metadata alone is fine: only loading the weights finds the fault
    _, widget, _, _ = _widget(make_napari_viewer, files)
    notifications.clear()
    count = widget.model_combo.count()
    assert not widget.load_checkpoint_file(str(bad))
    assert widget.model_combo.count() == count and widget.checkpoint_spec() == str(files["ckpt"])
    assert len(notifications) == 1 and str(bad) in notifications[0].message
    assert "Cannot use checkpoint" in widget.status.text()


@pytest.mark.parametrize("synchronous", [True, False])
@pytest.mark.parametrize("make_bad", [_truncated_checkpoint, _mismatched_checkpoint])
def test_run_with_a_broken_checkpoint_reports_once(make_napari_viewer, qtbot, files, tmp_path,
                                                   synchronous, make_bad, notifications):
    """A checkpoint broken after it was chosen: one status line, one notification, no raise."""
    import shutil

    ckpt = tmp_path / "chosen.safetensors"
    shutil.copy(files["ckpt"], ckpt)
    viewer, widget, _, _ = _widget(make_napari_viewer, files, synchronous=synchronous)
    assert widget.load_checkpoint_file(str(ckpt))
    make_bad(tmp_path / "broken.safetensors", files["ckpt"]).replace(ckpt)
    notifications.clear()
    widget.run()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT)
    qtbot.wait(100)  # anything queued behind the error would arrive now
    assert len(notifications) == 1, [n.message for n in notifications]
    assert "Inference failed" in notifications[0].message and str(ckpt) in notifications[0].message
    assert "Inference failed" in widget.status.text() and _results(viewer) == []
    assert widget.run_button.text() == "Run" and not widget.cancel_button.isEnabled()


def test_errors_outside_napari_run_never_abort(tmp_path, files):
    """A script or an embedded viewer (no ``napari.run()``): a worker's error must not abort."""
    import os
    import subprocess
    import sys

    bad = _truncated_checkpoint(tmp_path / "bad.safetensors", files["ckpt"])
    code = ("import napari\n"
            "from qtpy.QtWidgets import QApplication\n"
            "from napari.utils.notifications import notification_manager\n"
            "from napari_tae.io import load_volume\nfrom napari_tae.plugin._layers import layer_kwargs\n"
            "seen = []\nnotification_manager.notification_ready.connect(seen.append)\n"
            "v = napari.Viewer(show=False)\n"
            f"vol = load_volume({str(files['flair'])!r})\n"
            "v.add_image(vol.data, **layer_kwargs(vol.geometry, 'flair'))\n"
            "from napari_tae.plugin._widget import AnomalyWidget\n"
            "w = AnomalyWidget(v)\n"
            "w.device_combo.setCurrentText('cpu')\n"
            f"w.models.settings.recent_checkpoints = [{str(bad)!r}]\n"
            f"w.models.fill(select={str(bad)!r})\n"
            "w.run()\n"
            "import time\nt0 = time.time()\n"
            "while w.is_running and time.time() - t0 < 60:\n    QApplication.processEvents()\n"
            "for _ in range(50):\n    QApplication.processEvents()\n"
            "print('notifications', len(seen), '|', w.status.text())\n"
            "w.close(); v.close()\n")
    env = {**os.environ, CONFIG_ENV: str(tmp_path / "config")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "notifications 1 |" in proc.stdout and "Inference failed" in proc.stdout, proc.stdout


def test_not_skull_stripped_warning_reaches_the_gui(make_napari_viewer, qtbot, notifications):
    rng = np.random.default_rng(0)
    head = rng.uniform(0.0, 1.0, (12, 32, 32)).astype(np.float32)  # noise around a "head"
    for synchronous in (True, False):
        viewer = make_napari_viewer()
        viewer.add_image(head, name="head")
        widget = AnomalyWidget(viewer, synchronous=synchronous)
        widget.models.select("intensity")
        widget.device_combo.setCurrentText("cpu")
        notifications.clear()
        widget.run()
        qtbot.waitUntil(lambda w=widget: not w.is_running and "head anomaly mask" in
                        [ly.name for ly in w.viewer.layers], timeout=WAIT)
        warned = [n for n in notifications if "skull" in n.message]
        assert len(warned) >= 1 and warned[0].severity == "warning", synchronous
        widget.close()


# ------------------------------------------------------------------------------------- layers
def test_layers_tracked_by_object(make_napari_viewer, qtbot, files):
    viewer, widget, layer, vol = _widget(make_napari_viewer, files, synchronous=True)
    layer.name = "patient flair"
    # the chooser follows the rename and keeps the layer selected
    assert widget.image_combo.currentText() == "patient flair"
    assert widget.image_layer() is layer
    widget.run()
    mask = viewer.layers["patient flair anomaly mask"]
    mask.name = "my lesions"  # renaming the mask does not stop the sliders
    widget.kernel_spin.setValue(1)
    widget.squash_slider.setValue(2.0)
    resid = widget._active.residual
    np.testing.assert_array_equal(mask.data > 0, (resid > 0.02) & widget._active.brain)
    assert not widget.is_updating
    # reordering keeps the selection; a second input with the old name is another layer
    viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))
    other = viewer.add_image(vol.data.copy(), name="flair")
    assert widget.image_layer() is layer
    widget.select_input(other)
    assert widget.image_layer() is other
    widget.select_input(layer)
    # a deleted mask layer is made again by the next slider move; the residual stays cached
    viewer.layers.remove(mask)
    widget.squash_slider.setValue(3.0)
    again = widget.result_layer(widget._active, "anomaly mask")
    assert again is not None and again is not mask and again in viewer.layers
    np.testing.assert_array_equal(again.data > 0, (resid > 0.03) & widget._active.brain)
    # deleting the input forgets its result: the table empties, sliders do nothing
    viewer.layers.remove(layer)
    assert widget._active is None and widget.lesions.rowCount() == 0
    widget.squash_slider.setValue(1.0)


@pytest.mark.parametrize("choice", ["replace", "keep", "cancel"])
def test_rerun_asks_before_replacing_edits(make_napari_viewer, files, monkeypatch, choice):
    from napari_tae.plugin import _widget as widget_module

    viewer, widget, _, _ = _widget(make_napari_viewer, files, synchronous=True)
    widget.run()
    mask = viewer.layers["flair anomaly mask"]
    edited = mask.data.copy()
    edited[0, 0:2, 0:2] = 3
    mask.data = edited
    before = mask.data.copy()
    asked = []
    answer = {"replace": widget_module.REPLACE, "keep": widget_module.KEEP_EDITS,
              "cancel": widget_module.CANCEL}[choice]

    def fake_exec(box):
        asked.append(box.text())
        return answer.value

    monkeypatch.setattr(widget_module.QMessageBox, "exec", fake_exec)
    widget.run()
    assert len(asked) == 1 and "4 voxels painted" in asked[0]
    assert viewer.layers["flair anomaly mask"] is mask
    if choice == "cancel":
        np.testing.assert_array_equal(mask.data, before)
    else:
        assert (mask.data[0, 0:2, 0:2] > 0).all() == (choice == "keep")
        assert widget._active.edits.n_added == (4 if choice == "keep" else 0)
    # without edits, a re-run does not ask
    asked.clear()
    if choice == "replace":
        widget.run()
        assert asked == []


# ------------------------------------------------------------------------------------- napari conventions
def test_progress_in_the_activity_dock_with_cancel(make_napari_viewer, qtbot, files,
                                                   paused_after_first_batch):
    from napari.utils import progress

    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    widget.progress_in_dock = False  # as on a display with OpenGL hardware
    widget.settings.batch_size = 1
    widget.run()
    assert widget.progress_bar.isHidden()
    bars = [bar for bar in progress._all_instances if "flair" in (bar.desc or "")]
    assert len(bars) == 1 and bars[0].total == viewer.layers["flair"].data.shape[0]
    worker = widget._worker
    qtbot.waitUntil(lambda: bars[0].n >= 1, timeout=WAIT)
    with qtbot.waitSignal(worker.finished, timeout=WAIT):
        bars[0].cancel()  # the activity dock's Cancel button
        paused_after_first_batch.set()
    assert not widget.is_running and worker.abort_requested and _results(viewer) == []
    assert "Cancelled" in widget.status.text()
    assert bars[0] not in progress._all_instances  # closed


@pytest.mark.parametrize(("renderer", "software"), [
    ("llvmpipe (LLVM 15.0.6, 256 bits)", True),
    ("softpipe", True),
    ("D3D12 (Microsoft Basic Render Driver)", True),
    ("Apple Software Renderer", True),
    ("Google SwiftShader", True),
    ("NVIDIA GeForce RTX 3080/PCIe/SSE2", False),
    ("Mesa Intel(R) UHD Graphics 620 (KBL GT2)", False),
    ("AMD Radeon Pro 5500M OpenGL Engine", False),
    ("Apple M2", False),
    (None, False),
])
def test_software_renderers_are_told_from_hardware(renderer, software):
    assert is_software_renderer(renderer) is software


def test_progress_in_the_dock_on_a_software_rendered_display(make_napari_viewer, qtbot, files,
                                                             paused_after_first_batch):
    from napari.utils import progress

    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    # asked of napari's own canvas; Xvfb has no GPU, so Mesa draws in software there
    assert widget.renderer == canvas_renderer() and is_software_renderer(widget.renderer)
    assert widget.progress_in_dock and widget.progress_bar.isHidden()
    widget.settings.batch_size = 1
    n_slices = viewer.layers["flair"].data.shape[0]
    widget.run()
    assert not [bar for bar in progress._all_instances if "flair" in (bar.desc or "")]
    assert not widget.progress_bar.isHidden() and widget.progress_bar.maximum() == n_slices
    worker = widget._worker
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=WAIT)
    with qtbot.waitSignal(worker.finished, timeout=WAIT):
        widget.cancel_button.click()
        paused_after_first_batch.set()
    assert not widget.is_running and worker.abort_requested and _results(viewer) == []
    assert widget.progress_bar.isHidden() and "Cancelled" in widget.status.text()
    widget.run()  # a whole run: the bar reaches every slice, then hides
    seen = []
    widget._worker.yielded.connect(lambda value: seen.append(widget.progress_bar.value()))
    _wait_done(qtbot, widget, viewer)
    assert seen and seen[-1] == n_slices and widget.progress_bar.isHidden()


def test_closing_the_viewer_during_a_run(make_napari_viewer, qtbot, files, paused_after_first_batch):
    # napari deletes the dock without a closeEvent: the worker's late progress and result must
    # not reach the deleted Qt widgets (pytest-qt fails the test on an exception in a callback)
    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    widget.settings.batch_size = 1
    widget.run()
    worker = widget._worker
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=WAIT)
    with qtbot.waitSignal(worker.finished, timeout=WAIT):
        viewer.close()
        paused_after_first_batch.set()
    assert worker.abort_requested
    qtbot.wait(1000)  # any callback still queued runs now


def test_preferences_are_napari_plugin_settings(make_napari_viewer, files):
    from napari.settings import get_plugin_settings

    from napari_tae.plugin._preferences import PREFERENCE_FIELDS
    from napari_tae.settings import Settings

    prefs = get_plugin_settings("napari-tae").defaults
    defaults = Settings()
    assert {name: getattr(prefs, name) for name in PREFERENCE_FIELDS} == \
        {name: getattr(defaults, name) for name in PREFERENCE_FIELDS}
    viewer, widget, _, _ = _widget(make_napari_viewer, files, synchronous=True)
    widget.kernel_spin.setValue(9)
    widget.mode_check.setChecked(True)
    widget.close()
    assert (prefs.kernel, prefs.mode, prefs.device) == (9, "3d", "cpu")
    assert load_settings().kernel == 9  # the JSON file too (older napari, the recent files)
    prefs.kernel = 3  # changed in napari's Preferences dialog
    again = AnomalyWidget(viewer)
    assert again.kernel_spin.value() == 3 and again.mode_check.isChecked()
    again.close()


def test_manifest_menu_and_configuration():
    from pathlib import Path

    from npe2 import PluginManifest

    import napari_tae.plugin
    from napari_tae.plugin._preferences import PREFERENCE_FIELDS, SECTION
    from napari_tae.settings import Settings

    manifest = PluginManifest.from_file(Path(napari_tae.plugin.__file__).parent / "napari.yaml")
    item = manifest.contributions.menus["napari/layers/context"][0]
    command = next(c for c in manifest.contributions.commands if c.id == item.command)
    assert command.title == "Find anomalies..." and "image" in str(item.when)
    props = manifest.contributions.configurations[SECTION].properties
    assert set(props) == set(PREFERENCE_FIELDS)
    assert all(props[name].default == getattr(Settings(), name) for name in PREFERENCE_FIELDS)
    # the choices are the shared vocabularies
    from napari_tae.options import DEVICE_CHOICES, PRECISIONS

    assert set(props["device"].enum) == set(DEVICE_CHOICES) and list(props["precision"].enum) == list(PRECISIONS)


def test_layer_context_menu_docks_the_widget(make_napari_viewer, files):
    from napari_tae.plugin._commands import find_anomalies

    viewer = make_napari_viewer()
    first, _ = _add_volume(viewer, files["flair"], "first")
    second, _ = _add_volume(viewer, files["flair"], "second")
    viewer.layers.selection.active = first
    find_anomalies(viewer)
    viewer.layers.selection.active = second
    find_anomalies(viewer)  # the docked widget is reused
    docked = [w for w in viewer.window.dock_widgets.values() if isinstance(w, AnomalyWidget)]
    assert len(docked) == 1 and docked[0].image_layer() is second


def test_score_kernel_and_mode_move_the_squash_to_the_calibration_table(make_napari_viewer, files, tmp_path):
    from napari_tae.postprocess import anomaly_mask
    from napari_tae.scores import anomaly_score

    def value(score, kernel, mode):  # a distinct calibrated value per row
        return {"residual": 2.0, "fused": 60.0, "prior": 4.0}[score] + kernel / 10 + (0.05 if mode == "3d" else 0)

    table = [{"score": s, "kernel": k, "mode": m, "p99": value(s, k, m), "p99.5": value(s, k, m) + 1,
              "p99.9": value(s, k, m) + 2} for s in ("residual", "fused", "prior") for m in ("2d", "3d")
             for k in range(1, 16, 2)]
    model = build_model("b_tae", img_size=64, depth=1, embed_dim=32, num_heads=2, patch_size=8)
    ckpt = save_checkpoint(tmp_path / "scored.safetensors", model, preprocessing={},
                           calibration={"p99": 2.5, "default": 2.5},
                           scores={"default": "fused", "fused": {"weight": 1.0}, "prior": {"threshold": 0.5},
                                   "table": table})
    viewer, widget, _, _ = _widget(make_napari_viewer, files, synchronous=True)
    # an old checkpoint (one calibration, no table): the residual only, its value at any kernel
    assert [widget.score_combo.itemText(i) for i in range(widget.score_combo.count())] == ["residual"]
    widget.kernel_spin.setValue(3)
    assert widget.squash_slider.value() == pytest.approx(3.0)
    widget.kernel_spin.setValue(5)

    assert widget.load_checkpoint_file(str(ckpt))
    assert [widget.score_combo.itemText(i) for i in range(3)] == ["residual", "fused", "prior"]
    assert widget.score_combo.currentText() == "fused"  # the checkpoint's default score
    assert widget.squash_slider.value() == pytest.approx(value("fused", 5, "2d"))
    # the fused score lives on [0, 1 + w]: the slider reaches twice its calibrated values
    assert widget.squash_slider.maximum() == pytest.approx(2 * (value("fused", 15, "3d") + 2))
    # a squash past 100 % is explained where the user points at it
    assert "FLAIR + 1 x residual" in widget.squash_slider.toolTip()
    assert widget.squash_slider.toolTip().endswith("range: 0-200 %")
    widget.score_combo.setCurrentText("residual")
    assert widget.squash_slider.value() == pytest.approx(value("residual", 5, "2d"))
    assert widget.squash_slider.toolTip().endswith("range: 0-100 %")
    assert widget.squash_slider.maximum() == pytest.approx(20.0)  # never below 20 %
    widget.kernel_spin.setValue(7)
    assert widget.squash_slider.value() == pytest.approx(value("residual", 7, "2d"))
    widget.mode_check.setChecked(True)
    assert widget.squash_slider.value() == pytest.approx(value("residual", 7, "3d"))

    widget.score_combo.setCurrentText("prior")
    assert "where the FLAIR is bright" in widget.squash_slider.toolTip()
    widget.run()
    score_layer = viewer.layers["flair score"]
    state = widget._active
    expected = anomaly_score("prior", state.normalised, state.residual, state.brain, threshold=0.5)
    np.testing.assert_array_equal(score_layer.data, expected)
    squash = value("prior", 7, "3d")
    np.testing.assert_array_equal(viewer.layers["flair anomaly mask"].data > 0,
                                  anomaly_mask(expected, kernel=7, mode="3d", squash=squash, brain=state.brain))
    # switching the score after the run shows it and thresholds it at its calibrated value
    widget.score_combo.setCurrentText("fused")
    np.testing.assert_array_equal(score_layer.data, anomaly_score("fused", state.normalised, state.residual,
                                                                  state.brain, weight=1.0))
    assert widget.squash_slider.value() == pytest.approx(value("fused", 7, "3d"))
    assert widget._active.post.score == "fused"


def test_brain_mask_layer_is_editable_and_used_by_the_next_run(make_napari_viewer, files):
    viewer, widget, layer, _ = _widget(make_napari_viewer, files, synchronous=True)
    widget.kernel_spin.setValue(1)
    widget.run()
    brain_layer = viewer.layers["flair brain mask"]
    assert brain_layer.__class__.__name__ == "Labels"
    # an outline in its own colour: the brain is not tinted, the anomaly mask stays the cyan one
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_tae.plugin._layers import ANOMALY_COLOUR, BRAIN_MASK_COLOUR

    assert brain_layer.contour >= 1 and BRAIN_MASK_COLOUR != ANOMALY_COLOUR
    np.testing.assert_allclose(brain_layer.colormap.map(np.array([1]))[0], transform_color(BRAIN_MASK_COLOUR)[0])
    np.testing.assert_array_equal(brain_layer.data > 0, widget._active.brain)
    np.testing.assert_allclose(brain_layer.scale, layer.scale)
    assert brain_layer.metadata[GEOMETRY_KEY] is layer.metadata[GEOMETRY_KEY]  # saved on its grid
    assert widget.mask_combo.currentText() == "flair brain mask"
    assert "brain mask: non-background" in widget.status.text()
    # the user erases the right half of the brain, then re-runs: the run uses the edited mask
    edited = brain_layer.data.copy()
    edited[..., edited.shape[-1] // 2:] = 0
    brain_layer.data = edited
    n_layers = len(viewer.layers)
    widget.run()
    assert len(viewer.layers) == n_layers and viewer.layers["flair brain mask"] is brain_layer
    np.testing.assert_array_equal(widget._active.brain, edited > 0)
    assert not viewer.layers["flair residual"].data[..., edited.shape[-1] // 2:].any()
    assert "brain mask: supplied" in widget.status.text()
    # the chooser's modes are the CLI's --skull-strip: 'never' takes the non-background voxels
    assert [widget.mask_combo.itemData(i) for i in range(3)] == ["auto", "always", "never"]
    widget.mask_combo.setCurrentIndex(2)
    widget.run()
    assert widget._active.run_settings["skull_strip"] == "never"
    assert "brain mask: non-background" in widget.status.text()
    np.testing.assert_array_equal(widget._active.brain, layer.data != layer.data[0, 0, 0])
    # another input does not inherit this input's brain mask
    _add_volume(viewer, files["flair"], name="other")
    widget.image_combo.setCurrentText("other")
    assert widget.mask_combo.currentIndex() == 0
