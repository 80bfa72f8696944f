"""The dock widget in a real viewer (run under ``xvfb-run -a``): run, live sliders, review, export."""

import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("qtpy")

from napari_tae.plugin._widget import NEXT_KEY, AnomalyWidget  # noqa: E402
from napari_tae.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from napari_tae.inference import segment  # noqa: E402
from napari_tae.io import load_volume  # noqa: E402
from napari_tae.plugin._layers import GEOMETRY_KEY, layer_kwargs  # noqa: E402
from napari_tae.models import build_model  # noqa: E402
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
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config"))


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


def test_run_layers_progress_and_headless_match(make_napari_viewer, qtbot, files):
    viewer, widget, layer, vol = _widget(make_napari_viewer, files)
    assert widget.squash_slider.value() == pytest.approx(3.0)  # calibrated default
    assert "CPU" in widget.device_label.text()
    seen = []
    widget.run()
    widget._worker.yielded.connect(seen.append)
    _wait_done(qtbot, widget, viewer)
    assert seen and seen[-1][0] == seen[-1][1] == vol.data.shape[0]
    assert widget.progress.value() == widget.progress.maximum()
    recon, resid, mask = _results(viewer)
    for out in (recon, resid, mask):
        assert out.data.shape == layer.data.shape
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
        assert out.metadata[GEOMETRY_KEY] is layer.metadata[GEOMETRY_KEY]
    assert mask.__class__.__name__ == "Labels" and resid.colormap.name == "inferno"

    model, meta = load_checkpoint(files["ckpt"])
    ref = segment(vol, model, meta, kernel=widget.post_settings().kernel, device="cpu")
    np.testing.assert_allclose(resid.data, ref.residual, atol=1e-5)
    np.testing.assert_array_equal(mask.data > 0, ref.mask)
    assert widget.table.rowCount() == len(ref.lesions)
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
    assert len([ly for ly in viewer.layers if ly.name.startswith("flair ")]) == 3
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
    stamp = paths["mask"].stat().st_mtime_ns
    assert widget.export(str(out), "case") is None          # refuses to overwrite
    assert "exists" in widget.status.text() and paths["mask"].stat().st_mtime_ns == stamp


def test_review_navigation_and_settings(make_napari_viewer, qtbot, files):
    viewer, widget, layer, _ = _widget(make_napari_viewer, files, synchronous=True)
    widget.kernel_spin.setValue(7)
    widget.squash_slider.setValue(0.5)
    widget.run()
    lesions = widget._active.lesions
    assert lesions
    widget.go_to_lesion(0)
    z_mm = lesions[0]["centroid_mm"][0]
    assert viewer.dims.point[0] == pytest.approx(z_mm, abs=layer.scale[0])
    assert widget.table.currentRow() == 0
    assert NEXT_KEY in widget._bound_keys
    widget.close()
    assert widget._bound_keys == []

    s = load_settings()
    assert s.device == "cpu" and s.kernel == 7 and s.last_checkpoint == str(files["ckpt"])
    again = AnomalyWidget(viewer)
    assert again.checkpoint_spec() == str(files["ckpt"])
    assert again.kernel_spin.value() == 7 and again.device_combo.currentText() == "cpu"
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


def test_paint_refreshes_table(make_napari_viewer, qtbot, files):
    viewer, widget, _, _ = _widget(make_napari_viewer, files)
    widget.run()
    _wait_done(qtbot, widget, viewer)
    mask = viewer.layers["flair anomaly mask"]
    n = widget.table.rowCount()
    mask.selected_label = 5
    mask.brush_size = 1
    mask.paint((0, 0, 0), 5)  # the brush API, as a user stroke does (emits the paint event)
    qtbot.waitUntil(lambda: widget.table.rowCount() == n + 1, timeout=WAIT)
    assert mask.data[0, 0, 0] > 0 and widget._active.edits.n_added >= 1


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
