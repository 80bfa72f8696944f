"""napari dock widget: run a reconstruction model on a FLAIR layer and review its anomalies.

Thin Qt wiring around :mod:`napari_tae.plugin.review` (cached residual, live post-processing, manual
edits, export) and :mod:`napari_tae.settings` (remembered preferences). The network runs in a
napari generator worker that yields per batch; every asynchronous result is tagged with a
generation counter, so a stale result (re-run, cancel, layer removed) is dropped, never shown.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from napari_tae.export import ExportError
from napari_tae.plugin.review import (
    Generation,
    PostSettings,
    ReviewState,
    compute_mask,
    export_results,
    lesion_features,
    lesion_rows,
)
from napari_tae.io import error_line
from napari_tae.options import DEVICE_CHOICES
from napari_tae.settings import load_settings, save_settings

if TYPE_CHECKING:
    import napari

__all__ = ["AnomalyWidget"]

RESULT_KEY = "napari_tae_result"     # layer.metadata: kind of result layer ("reconstruction", ...)
SOURCE_KEY = "napari_tae_source"     # layer.metadata: name of the input layer it was computed from
_BROWSE = "Browse..."
#: Squash slider range in percent of the intensity range; widened when a checkpoint calibrates higher.
SQUASH_MAX = 20.0
_TABLE_COLUMNS = ("#", "volume (mL)", "voxels", "max residual", "mean residual", "centroid (z, y, x)")
NEXT_KEY, PREV_KEY = "n", "Shift-N"  # 'p' is napari's paint-mode key on Labels layers


def _block_triton() -> None:
    """Keep triton from loading into a process that already has napari's OpenGL canvas.

    Importing timm/torchvision after the canvas exists pulls in triton, whose bundled LLVM
    crashes the process (segfault) next to Mesa's llvmpipe (seen under Xvfb). Eager inference
    never uses triton, and torch treats a failed ``import triton`` as "not installed".
    Set ``NAPARI_TAE_ALLOW_TRITON=1`` to opt out.
    """
    if os.environ.get("NAPARI_TAE_ALLOW_TRITON") != "1":
        sys.modules.setdefault("triton", None)  # type: ignore[arg-type]


def _is_result(layer) -> bool:
    return RESULT_KEY in getattr(layer, "metadata", {})


class AnomalyWidget(QWidget):
    """Find anomalies in a FLAIR volume with a transformer autoencoder (Ghorbel et al. 2022).

    Args:
        napari_viewer: The viewer (injected by napari).
        synchronous: Run inference and post-processing on the calling thread (tests, debugging).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, synchronous: bool = False) -> None:
        super().__init__()
        _block_triton()  # before anything imports torch, timm or torchvision
        self.viewer = napari_viewer
        self.synchronous = synchronous
        self.settings = load_settings()
        self._run_gen = Generation()
        self._worker = None
        self._post_worker = None
        self._states: dict[str, ReviewState] = {}   # by input layer name
        self._active: ReviewState | None = None
        self._meta = None  # CheckpointMeta of the selected model (None: intensity)
        self._bound_keys: list[str] = []
        self._closed = False
        self._build_ui()
        self._post_timer = QTimer(self, singleShot=True, interval=150)  # debounce volume updates
        self._post_timer.timeout.connect(self._update_volume)
        for ev in ("inserted", "removed", "moved"):
            getattr(self.viewer.layers.events, ev).connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.layers.events.inserted.connect(self._orient_radiological)
        self._orient_radiological()
        self._refresh_layers()
        self._bind_keys()

    # ----------------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        s = self.settings
        self.image_combo = QComboBox()
        self.mask_combo = QComboBox()
        self.model_combo = QComboBox()
        self.device_combo = QComboBox()
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.device_combo.setCurrentText(s.device)
        self.device_label = QLabel()
        self.device_label.setWordWrap(True)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel()
        self.status.setWordWrap(True)

        self.kernel_spin = QSpinBox(minimum=1, maximum=15, singleStep=2, value=s.kernel)
        self.squash_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.squash_slider.setRange(0.0, SQUASH_MAX)
        self.squash_slider.setDecimals(2)
        self.squash_slider.setValue(1.0)
        self.reset_button = QPushButton("Reset to calibrated")
        self.min_size_spin = QDoubleSpinBox(minimum=0.0, maximum=1e6, decimals=3, value=s.min_size)
        self.min_unit_combo = QComboBox()
        self.min_unit_combo.addItems(["voxels", "mL"])
        self.min_unit_combo.setCurrentText(s.min_size_unit)
        self.mode_check = QCheckBox("3D median")
        self.mode_check.setChecked(s.mode == "3d")

        self.table = QTableWidget(0, len(_TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(_TABLE_COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.export_base = QLineEdit()
        self.export_base.setPlaceholderText("base name (default: <input>_tae)")
        self.export_button = QPushButton("Export...")

        run_box = QGroupBox("Run a model")
        form = QFormLayout(run_box)
        form.addRow("FLAIR image", self.image_combo)
        form.addRow("Brain mask", self.mask_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow(self.device_label)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.status)

        post_box = QGroupBox("Post-processing (live)")
        pform = QFormLayout(post_box)
        pform.addRow("Median kernel", self.kernel_spin)
        pform.addRow("Squash (%)", self.squash_slider)
        pform.addRow(self.reset_button)
        size_row = QHBoxLayout()
        size_row.addWidget(self.min_size_spin)
        size_row.addWidget(self.min_unit_combo)
        pform.addRow("Min lesion size", size_row)
        pform.addRow(self.mode_check)

        review_box = QGroupBox(f"Lesions (keys: {NEXT_KEY} next, {PREV_KEY} previous)")
        rlayout = QVBoxLayout(review_box)
        rlayout.addWidget(self.table)
        export_row = QHBoxLayout()
        export_row.addWidget(self.export_base)
        export_row.addWidget(self.export_button)
        rlayout.addLayout(export_row)

        layout = QVBoxLayout(self)
        for box in (run_box, post_box, review_box):
            layout.addWidget(box)

        self._fill_models(select=s.last_checkpoint)
        self._last_model_index = self.model_combo.currentIndex()
        self.model_combo.activated.connect(self._on_model_activated)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.device_combo.currentTextChanged.connect(self._on_device_changed)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.reset_button.clicked.connect(self.reset_squash)
        self.kernel_spin.valueChanged.connect(self._on_post_changed)
        self.squash_slider.valueChanged.connect(self._on_post_changed)
        self.min_size_spin.valueChanged.connect(self._on_post_changed)
        self.min_unit_combo.currentTextChanged.connect(self._on_post_changed)
        self.mode_check.toggled.connect(self._on_post_changed)
        self.table.cellClicked.connect(lambda row, _col: self.go_to_lesion(row))
        self.export_button.clicked.connect(self._export_clicked)
        self._on_device_changed(self.device_combo.currentText())
        self._on_model_changed()

    def _fill_models(self, select: str | None = None) -> None:
        """Bundled checkpoints, the intensity baseline, recent files, then Browse.

        Selects ``select`` when listed, else the default bundled checkpoint.
        """
        from napari_tae.checkpoint import bundled_checkpoints, default_checkpoint

        combo = self.model_combo
        combo.blockSignals(True)
        combo.clear()
        for name, path in sorted(bundled_checkpoints().items()):
            combo.addItem(f"{name} (bundled)", name)
        combo.addItem("intensity (baseline, no network)", "intensity")
        for path in self.settings.recent_checkpoints:
            if path != "intensity" and os.path.isfile(path) and combo.findData(path) < 0:
                combo.addItem(os.path.basename(path), path)
        combo.addItem(_BROWSE, _BROWSE)
        index = combo.findData(select) if select else -1
        if index < 0:
            index = combo.findData(default_checkpoint())
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(False)

    def _orient_radiological(self, event: Any = None) -> None:
        """Radiological camera once a volume placed in world mm is added (or already there).

        The reader returns layer data only; the view is set here, where layers arrive.
        """
        from napari_tae.plugin._layers import GEOMETRY_KEY, set_radiological_view

        layers = [event.value] if event is not None else list(self.viewer.layers)
        if any(GEOMETRY_KEY in layer.metadata and not _is_result(layer) for layer in layers):
            set_radiological_view(self.viewer)

    def _refresh_layers(self, event: Any = None) -> None:
        """Refill the layer choosers (results of this plugin are not offered as inputs)."""
        from napari.layers import Image, Labels

        for combo, kind, blank in ((self.image_combo, Image, None),
                                   (self.mask_combo, Labels, "(automatic)")):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            if blank:
                combo.addItem(blank)
            for layer in self.viewer.layers:
                if isinstance(layer, kind) and not _is_result(layer) and layer.ndim == 3:
                    combo.addItem(layer.name)
            if combo.findText(current) >= 0:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._on_image_changed()

    # ----------------------------------------------------------------------------- model
    def checkpoint_spec(self) -> str:
        return self.model_combo.currentData()

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) != _BROWSE:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "",
                                              "Checkpoints (*.safetensors)")
        if not path or not self.load_checkpoint_file(path):
            self.model_combo.setCurrentIndex(self._last_model_index)

    def load_checkpoint_file(self, path: str) -> bool:
        """Validate a checkpoint file and select it; on failure show why and change nothing."""
        from napari_tae.checkpoint import read_metadata

        try:
            read_metadata(path)
        except Exception as exc:  # any unreadable file: report it, never crash the viewer
            self._error(f"Cannot use checkpoint: {error_line(exc, path)}")
            return False
        path = os.path.abspath(path)
        self.settings.add_recent(path)
        save_settings(self.settings)
        self._fill_models(select=path)
        self._on_model_changed()
        return True

    def _on_model_changed(self, *_: Any) -> None:
        spec = self.checkpoint_spec()
        if spec == _BROWSE:
            return
        self._last_model_index = self.model_combo.currentIndex()
        self._meta = None
        if spec != "intensity":
            from napari_tae.checkpoint import read_metadata, resolve_checkpoint

            try:
                self._meta = read_metadata(resolve_checkpoint(spec))
            except Exception as exc:  # a recent file may have been changed since
                self._error(f"Cannot use checkpoint: {exc}")
        self.reset_squash()

    def reset_squash(self) -> None:
        """Squash back to the checkpoint's calibrated default (1 % without calibration)."""
        from napari_tae.inference import default_squash

        self.set_squash(default_squash(self._meta)[0])

    def set_squash(self, squash: float) -> None:
        """Set the squash slider, widening its range so a value above 20 % is not clamped."""
        top = max(SQUASH_MAX, float(np.ceil(1.5 * squash)))
        if self.squash_slider.maximum() != top:
            self.squash_slider.setRange(0.0, top)
        self.squash_slider.setValue(squash)

    def _on_device_changed(self, device: str) -> None:
        from napari_tae.inference import select_device

        try:
            resolved = select_device(device).type
        except Exception as exc:
            self.device_label.setText(f"<b style='color:orange'>{exc}</b>")
            return
        if resolved == "cpu":
            self.device_label.setText("<b style='color:orange'>Running on CPU: a volume may take "
                                      "minutes; a GPU is much faster.</b>")
        else:
            self.device_label.setText(f"Using {resolved}.")
        self.settings.device = device

    # ----------------------------------------------------------------------------- run
    def image_layer(self):
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def run(self) -> None:
        """Start inference on the chosen layer; a run already going is cancelled first."""
        layer = self.image_layer()
        spec = self.checkpoint_spec()
        if layer is None or spec in (None, _BROWSE):
            self._error("Choose a 3D FLAIR image layer and a model first.")
            return
        data = np.asarray(layer.data, dtype=np.float32)
        brain = None
        mask_name = self.mask_combo.currentText()
        if self.mask_combo.currentIndex() > 0 and mask_name in self.viewer.layers:
            brain = np.asarray(self.viewer.layers[mask_name].data) > 0
            if brain.shape != data.shape:
                self._error(f"Brain mask '{mask_name}' shape {brain.shape} doesn't match "
                            f"'{layer.name}' {data.shape}.")
                return
        self.cancel(quiet=True)
        tag = self._run_gen.next()
        self.settings.device = self.device_combo.currentText()
        self.settings.add_recent(spec)
        save_settings(self.settings)
        from napari_tae.inference import inference_job

        job = partial(inference_job, spec, data, brain=brain, device=self.settings.device,
                      batch_size=self.settings.batch_size)
        on_done = partial(self._on_inference_done, tag, layer, data, spec)
        on_progress = partial(self._on_progress, tag)
        self.progress.setValue(0)
        self._set_running(True, f"Running on '{layer.name}'...")
        if self.synchronous:
            gen = job()
            try:
                while True:
                    on_progress(next(gen))
            except StopIteration as stop:
                on_done(stop.value)
            except Exception as exc:
                self._on_inference_error(tag, exc)
            return
        from napari.qt.threading import create_worker

        worker = create_worker(job, _start_thread=False)
        worker.yielded.connect(on_progress)
        worker.returned.connect(on_done)
        worker.errored.connect(partial(self._on_inference_error, tag))
        self._worker = worker
        worker.start()

    def cancel(self, quiet: bool = False) -> None:
        """Stop the running inference after its current batch; its result is discarded."""
        worker, self._worker = self._worker, None
        self._run_gen.invalidate()
        if worker is not None:
            worker.quit()
            if not quiet:
                self._set_running(False, "Cancelled; no result was written.")
                self.progress.setValue(0)

    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def _set_running(self, running: bool, text: str = "") -> None:
        self.run_button.setText("Re-run" if running else "Run")
        self.cancel_button.setEnabled(running)
        if text:
            self.status.setText(text)

    def _on_progress(self, tag: int, value: tuple[int, int]) -> None:
        if self._run_gen.is_current(tag):
            done, total = value
            self.progress.setMaximum(max(total, 1))
            self.progress.setValue(done)

    def _on_inference_error(self, tag: int, exc: BaseException) -> None:
        if self._run_gen.is_current(tag):
            self._worker = None
            self._set_running(False)
            self._error(f"Inference failed: {exc}")

    def _on_inference_done(self, tag: int, layer, data: np.ndarray, spec: str, value) -> None:
        """Adopt a finished run only if it is still the latest one and its input is unchanged."""
        if not self._run_gen.is_current(tag):
            return  # cancelled or superseded: dropped
        self._worker = None
        self._set_running(False)
        if layer not in self.viewer.layers or np.shape(layer.data) != data.shape:
            self.status.setText(f"'{layer.name}' was removed or changed during the run; "
                                "result discarded.")
            return
        rec, meta, device = value
        from napari_tae.plugin._layers import GEOMETRY_KEY

        geometry = layer.metadata.get(GEOMETRY_KEY)
        state = ReviewState(
            source_name=layer.name, residual=rec.residual, brain=rec.brain,
            spacing=tuple(float(v) for v in layer.scale),
            origin=tuple(float(v) for v in layer.translate), geometry=geometry,
            checkpoint=str(spec), meta=meta, device=device,
            norm=rec.norm.to_dict() if hasattr(rec.norm, "to_dict") else {},
        )
        old = self._states.get(layer.name)
        post = self.post_settings()
        result = state.compute(post)
        labels = state.accept(result)
        if old is not None:
            old.generation.invalidate()
        self._states[layer.name] = state
        self._active = state
        self._set_result(state, "reconstruction", rec.reconstruction, layer)
        self._set_result(state, "residual", rec.residual, layer)
        self._set_result(state, "anomaly mask", labels, layer)
        self._show_lesions(state)
        self.progress.setValue(self.progress.maximum())
        self.status.setText(f"Done on {device}: {len(state.lesions)} lesion(s) in '{layer.name}'.")

    # ----------------------------------------------------------------------------- layers
    def result_layer(self, state: ReviewState, kind: str):
        name = f"{state.source_name} {kind}"
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if layer.metadata.get(RESULT_KEY) == kind:
                return layer
        return None

    def _set_result(self, state: ReviewState, kind: str, data: np.ndarray, source) -> None:
        """Write a result into its layer, replacing the data of an existing one."""
        name = f"{state.source_name} {kind}"
        metadata = {RESULT_KEY: kind, SOURCE_KEY: state.source_name}
        if state.geometry is not None:
            from napari_tae.plugin._layers import layer_kwargs

            kw = layer_kwargs(state.geometry, name)
            kw["metadata"] = {**kw["metadata"], **metadata}
        else:
            kw = {"name": name, "scale": source.scale, "translate": source.translate,
                  "metadata": metadata}
        layer = self.result_layer(state, kind)
        if layer is not None:
            layer.data = data
            layer.scale, layer.translate = kw["scale"], kw["translate"]
            layer.metadata.update(kw["metadata"])
        elif kind == "anomaly mask":
            layer = self.viewer.add_labels(data, opacity=0.6, **kw)
            # after brush strokes, relabel and refresh the table (the edits are kept)
            layer.events.paint.connect(lambda _e: self._post_timer.start())
        else:
            hi = float(np.percentile(data, 99.9)) if data.size else 1.0
            cmap = "inferno" if kind == "residual" else "gray"
            layer = self.viewer.add_image(data, colormap=cmap, contrast_limits=(0.0, max(hi, 1e-3)),
                                          visible=kind == "residual", **kw)
        if kind == "residual":
            layer.contrast_limits = (0.0, max(float(np.percentile(data, 99.9)), 1e-3))
        if kind == "anomaly mask":
            layer.features = lesion_features(state.lesions)

    def _on_layer_removed(self, event: Any) -> None:
        """Forget the result of a removed input; drop pending updates of a removed mask."""
        layer = event.value
        source = layer.metadata.get(SOURCE_KEY) if _is_result(layer) else layer.name
        state = self._states.get(source)
        if state is None:
            return
        state.generation.invalidate()
        if not _is_result(layer):
            del self._states[source]
            if self._active is state:
                self._active = None
                self._show_lesions(None)

    def _on_image_changed(self, *_: Any) -> None:
        """Sliders and table follow the selected input if it has a result."""
        state = self._states.get(self.image_combo.currentText())
        if state is not None and state is not self._active:
            self._active = state
            self._show_post(state.post)
            self._show_lesions(state)

    # ----------------------------------------------------------------------------- post-processing
    def post_settings(self) -> PostSettings:
        kernel = int(self.kernel_spin.value())
        return PostSettings(
            kernel=kernel if kernel % 2 else kernel + 1,  # typed even values round up to odd
            squash=float(self.squash_slider.value()),
            mode="3d" if self.mode_check.isChecked() else "2d",
            min_size=float(self.min_size_spin.value()),
            min_size_unit=self.min_unit_combo.currentText(),
        )

    def _show_post(self, post: PostSettings) -> None:
        widgets = (self.kernel_spin, self.squash_slider, self.min_size_spin, self.min_unit_combo,
                   self.mode_check)
        for w in widgets:
            w.blockSignals(True)
        self.kernel_spin.setValue(post.kernel)
        self.set_squash(post.squash)
        self.min_size_spin.setValue(post.min_size)
        self.min_unit_combo.setCurrentText(post.min_size_unit)
        self.mode_check.setChecked(post.mode == "3d")
        for w in widgets:
            w.blockSignals(False)

    def _current_index(self, layer) -> int | None:
        if layer.ndim != 3:
            return None
        z = int(round(float(layer.world_to_data(self.viewer.dims.point)[0])))
        return z if 0 <= z < layer.data.shape[0] else None

    def _on_post_changed(self, *_: Any) -> None:
        """Visible slice now, whole volume after a short debounce."""
        post = self.post_settings()
        st = self.settings  # remembered as the next session's defaults (saved on run/update/close)
        st.kernel, st.mode, st.min_size, st.min_size_unit = (post.kernel, post.mode, post.min_size,
                                                             post.min_size_unit)
        state = self._active
        layer = self.result_layer(state, "anomaly mask") if state is not None else None
        if layer is None:
            return
        z = self._current_index(layer)
        if z is not None:
            state.record_edits(layer.data, index=z)
            layer.data[z] = state.preview_slice(z, post)
            layer.refresh()
        state.generation.next()  # a volume update already running is now stale
        if self.synchronous:
            self._update_volume()
        else:
            self._post_timer.start()

    def _update_volume(self) -> None:
        state = self._active
        layer = self.result_layer(state, "anomaly mask") if state is not None else None
        if layer is None:
            return
        tag = state.generation.next()
        state.record_edits(layer.data)
        job = partial(compute_mask, state.residual, self.post_settings(), spacing=state.spacing,
                      origin=state.origin, brain=state.brain, edits=state.edits.snapshot())
        done = partial(self._apply_mask, state, tag)
        if self.synchronous:
            done(job())
            return
        from napari.qt.threading import create_worker

        worker = create_worker(job, _start_thread=False)
        worker.returned.connect(done)
        worker.errored.connect(lambda exc: self._error(f"Post-processing failed: {exc}"))
        self._post_worker = worker  # keep a reference while it runs
        worker.start()

    def _apply_mask(self, state: ReviewState, tag: int, result) -> None:
        if not state.generation.is_current(tag):
            return  # settings changed again (or layer gone) while computing: a newer one follows
        layer = self.result_layer(state, "anomaly mask")
        if layer is None:
            return
        state.record_edits(layer.data)
        layer.data = state.accept(state.finish(result))
        layer.features = lesion_features(state.lesions)
        if state is self._active:
            self._show_lesions(state)
        save_settings(self.settings)

    @property
    def is_updating(self) -> bool:
        """Whether a debounced or background whole-volume update is still pending."""
        state = self._active
        if self._post_timer.isActive():
            return True
        return state is not None and state.post != self.post_settings()

    # ----------------------------------------------------------------------------- review
    def _show_lesions(self, state: ReviewState | None) -> None:
        rows = lesion_rows(state.lesions if state is not None else [])
        self.table.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for col, text in enumerate(cells):
                self.table.setItem(row, col, QTableWidgetItem(text))

    def go_to_lesion(self, row: int) -> None:
        """Move the viewer to a lesion's centroid (slice and camera centre)."""
        state = self._active
        if state is None or not 0 <= row < len(state.lesions):
            return
        centre = state.lesions[row]["centroid_mm"]
        offset = self.viewer.dims.ndim - len(centre)  # viewer may hold extra leading dims
        for axis in self.viewer.dims.not_displayed:
            if axis >= offset:
                self.viewer.dims.set_point(axis, centre[axis - offset])
        from napari_tae.plugin._layers import viewer_camera

        viewer_camera(self.viewer).center = tuple(centre[a - offset] for a in
                                                  self.viewer.dims.displayed if a >= offset)
        self.table.selectRow(row)

    def _step_lesion(self, step: int) -> None:
        n = self.table.rowCount()
        if n:
            current = self.table.currentRow()
            self.go_to_lesion((current + step) % n if current >= 0 else 0)

    def _bind_keys(self) -> None:
        for key, step in ((NEXT_KEY, 1), (PREV_KEY, -1)):
            try:
                self.viewer.bind_key(key, lambda _v, s=step: self._step_lesion(s))
            except ValueError:  # the user or another plugin owns it: leave theirs alone
                continue
            self._bound_keys.append(key)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.cleanup()
        super().closeEvent(event)

    def cleanup(self) -> None:
        """Unbind keys, stop workers and disconnect from the viewer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.cancel(quiet=True)
        self._post_timer.stop()
        for state in self._states.values():
            state.generation.invalidate()
        for key in self._bound_keys:
            self.viewer.bind_key(key, None)
        self._bound_keys = []
        save_settings(self.settings)
        for ev in ("inserted", "removed", "moved"):
            getattr(self.viewer.layers.events, ev).disconnect(self._refresh_layers)
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        self.viewer.layers.events.inserted.disconnect(self._orient_radiological)

    # ----------------------------------------------------------------------------- export
    def _export_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export folder")
        if folder:
            self.export(folder, ask=True)

    def export(self, folder: str, base: str | None = None, *, ask: bool = False) -> dict | None:
        """Write mask, residual, lesion CSV and provenance JSON; ``ask`` before overwriting."""
        state = self._active
        layer = self.result_layer(state, "anomaly mask") if state is not None else None
        if layer is None:
            self._error("Nothing to export: run a model first.")
            return None
        import napari

        base = base or self.export_base.text().strip() or f"{state.source_name}_tae"
        source = self.viewer.layers[state.source_name] if state.source_name in self.viewer.layers \
            else None
        input_file = getattr(state.geometry, "source_path", None) or (
            str(source.source.path) if source is not None and source.source.path else None)
        state.record_edits(layer.data)
        from napari_tae.plugin._layers import DICOM_KEY

        kw = dict(mask=layer.data, state=state, input_file=input_file,
                  extra={"napari_version": napari.__version__},
                  dicom_series=source.metadata.get(DICOM_KEY) if source is not None else None)
        try:
            paths = export_results(folder, base, **kw)
        except ExportError as exc:
            if not (ask and "exists" in str(exc)) or QMessageBox.question(
                    self, "Overwrite?", f"{exc}\nOverwrite the existing export files?") \
                    != QMessageBox.StandardButton.Yes:
                self._error(str(exc))
                return None
            try:
                paths = export_results(folder, base, overwrite=True, **kw)
            except (ExportError, OSError, ValueError) as exc2:
                self._error(str(exc2))
                return None
        except (OSError, ValueError) as exc:
            self._error(str(exc))
            return None
        self.status.setText(f"Exported to {folder}: " + ", ".join(p.name for p in paths.values()))
        return paths

    # ----------------------------------------------------------------------------- messages
    def _error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(f"<b style='color:red'>{message}</b>")
        show_error(message)
