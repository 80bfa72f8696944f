"""napari dock widget: run a reconstruction model on a FLAIR layer and review its anomalies.

Thin Qt wiring around :mod:`napari_tae.plugin.review` (cached residual, live post-processing, manual
edits, export) and :mod:`napari_tae.settings` (remembered preferences). The network runs in a
napari generator worker that yields per batch; every asynchronous result is tagged with a
generation counter, so a stale result (re-run, cancel, layer removed) is dropped, never shown.
"""

from __future__ import annotations

import html
import os
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
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
    QScrollArea,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from napari_tae.export import ExportError
from napari_tae.io import error_line
from napari_tae.options import DEVICE_CHOICES, PRECISIONS
from napari_tae.plugin._lesion_table import LesionTableModel, lesion_table_view
from napari_tae.plugin._model_chooser import BROWSE, ModelChooser
from napari_tae.plugin._opengl import canvas_renderer, is_software_renderer
from napari_tae.plugin._preferences import load_preferences, save_preferences
from napari_tae.plugin._tasks import start_task
from napari_tae.plugin.review import (
    EditRecord,
    Generation,
    PostSettings,
    ReviewState,
    compute_mask,
    export_results,
    lesion_features,
)

if TYPE_CHECKING:
    import napari

    from napari_tae.scores import ScoreSpec

__all__ = ["AnomalyWidget"]

RESULT_KEY = "napari_tae_result"     # layer.metadata: kind of result layer ("reconstruction", ...)
SOURCE_KEY = "napari_tae_source"     # layer.metadata: name of the input layer it was computed from
#: The re-run dialog's choices for a mask with manual edits (``QMessageBox`` standard buttons).
REPLACE, KEEP_EDITS, CANCEL = (QMessageBox.StandardButton.Discard, QMessageBox.StandardButton.Save,
                               QMessageBox.StandardButton.Cancel)
_KINDS = ("reconstruction", "residual", "anomaly mask")
#: Brush strokes come as many paint events: the volume update waits this long after the last.
PAINT_DEBOUNCE_MS = 150

#: The brain-mask chooser's entries before the Labels layers: the skull-stripping modes of
#: napari_tae.brain (docs/preprocessing.md), as the CLI's --skull-strip.
BRAIN_MASK_MODES = (
    ("(automatic)", "auto"),
    ("(extract: deepbet)", "always"),
    ("(non-background)", "never"),
)

#: characters a layer or model chooser shows before eliding (the dock fits a 1280 x 800 screen)
COMBO_MIN_CHARS = 18
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


def squash_tooltip(spec: ScoreSpec) -> str:
    """What the squash threshold applies to: the fused score's values pass 100 % (docs/scores.md)."""
    if spec.name == "fused":
        what = f"the fused score (FLAIR + {spec.weight:g} x residual)"
    else:
        what = {"residual": "the residual (FLAIR - reconstruction)",
                "prior": "the residual where the FLAIR is bright (prior)"}[spec.name]
    return f"Mask threshold on {what},\nin % of the normalised intensity range: 0-{100 * spec.upper:g} %"


def _is_result(layer) -> bool:
    return RESULT_KEY in getattr(layer, "metadata", {})


class _RunProgress:
    """napari's progress bar of a run (the activity dock), whose Cancel stops the run."""

    def __init__(self, total: int, desc: str, on_cancel) -> None:
        from napari.utils import cancelable_progress

        class _Progress(cancelable_progress):
            def cancel(self) -> None:  # napari's Cancel button: stop the worker right away
                super().cancel()
                on_cancel()

        self.bar = _Progress(total=total, desc=desc)

    def set(self, done: int) -> None:
        self.bar.update(max(done - self.bar.n, 0))

    def close(self) -> None:
        self.bar.close()


class _DockProgress:
    """The run's progress on the dock's own bar, with the dock's Cancel (see ``progress_in_dock``)."""

    def __init__(self, bar: QProgressBar, total: int) -> None:
        self.bar = bar
        bar.setRange(0, total)
        bar.setValue(0)
        bar.show()

    def set(self, done: int) -> None:
        self.bar.setValue(done)

    def close(self) -> None:
        self.bar.hide()


class AnomalyWidget(QWidget):
    """Find anomalies in a FLAIR volume with a transformer autoencoder (Ghorbel et al. 2022).

    Args:
        napari_viewer: The viewer (injected by napari).
        synchronous: Run inference and post-processing on the calling thread (tests, scripts).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, *, synchronous: bool = False) -> None:
        super().__init__()
        _block_triton()  # before anything imports torch, timm or torchvision
        from napari_tae.plugin._layers import SideBySide

        self.viewer = napari_viewer
        self.synchronous = synchronous
        self.settings = load_preferences()
        self._run_gen = Generation()
        self._worker = None
        self._post_worker = None     # the whole-volume update running in the background
        self._volume_pending = False  # settings changed while it ran: one more update follows
        self._progress: _RunProgress | _DockProgress | None = None
        #: The run's progress in the dock rather than in napari's activity dock: on a software-
        #: rendered display napari's animated indicator made a run take twice as long
        #: (napari_tae/plugin/_opengl.py, docs/speed.md section 9).
        self.renderer = canvas_renderer()
        self.progress_in_dock = is_software_renderer(self.renderer)
        self._states: dict[Any, ReviewState] = {}   # by input layer (the object, not its name)
        self._brain_layers: dict[Any, Any] = {}  # input layer -> the editable brain mask of its run
        self._active: ReviewState | None = None
        self._side_by_side = SideBySide(napari_viewer)
        self._closed = False
        self._build_ui()
        # a plain function: PyQt calls no method of an object being destroyed
        self.destroyed.connect(partial(_drop_late_results, self))
        self._post_timer = QTimer(self, singleShot=True)
        self._post_timer.timeout.connect(self._request_volume)
        for emitter, callback in self._viewer_connections():
            emitter.connect(callback)
        self._orient_radiological()
        self._refresh_layers()

    # ----------------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        s = self.settings
        self.image_combo = QComboBox()
        self.mask_combo = QComboBox()
        self.model_combo = QComboBox()
        self.device_combo = QComboBox()
        for combo in (self.image_combo, self.mask_combo, self.model_combo):
            # long layer or checkpoint names are elided: they must not widen the dock past the screen
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(COMBO_MIN_CHARS)
        self.device_combo.addItems(list(DEVICE_CHOICES))
        self.device_combo.setCurrentText(s.device)
        self.precision_combo = QComboBox()  # napari_tae.options.PRECISIONS
        self.precision_combo.addItems(list(PRECISIONS))
        self.precision_combo.setCurrentText(s.precision)
        self.precision_combo.setToolTip("auto: bfloat16 on CUDA, float32 elsewhere; bfloat16 on the CPU is "
                                        "about 2x faster for the transformers where the CPU has bfloat16 "
                                        "instructions (AVX-512 BF16, AMX), far slower where it has not")
        self.device_label = QLabel()
        self.device_label.setWordWrap(True)
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m slices")
        self.progress_bar.setToolTip(f"Shown here, not in napari's activity dock: this display draws in software "
                                     f"({self.renderer}), where napari's animated busy indicator slows a run "
                                     "about twofold")
        self.progress_bar.hide()
        self.status = QLabel()
        self.status.setWordWrap(True)

        self.score_combo = QComboBox()  # filled with the model's scores (napari_tae.scores)
        self.kernel_spin = QSpinBox(minimum=1, maximum=15, singleStep=2, value=s.kernel)
        self.squash_slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.squash_slider.setRange(0.0, 100.0)  # set_squash sets the model's range
        self.squash_slider.setDecimals(2)
        self.squash_slider.setValue(1.0)
        self.reset_button = QPushButton("Reset to calibrated")
        self.min_size_spin = QDoubleSpinBox(minimum=0.0, maximum=1e6, decimals=3, value=s.min_size)
        self.min_unit_combo = QComboBox()
        self.min_unit_combo.addItems(["voxels", "mL"])
        self.min_unit_combo.setCurrentText(s.min_size_unit)
        self.mode_check = QCheckBox("3D median")
        self.mode_check.setChecked(s.mode == "3d")

        self.lesions = LesionTableModel()
        self.table = lesion_table_view(self.lesions)
        self.side_button = QPushButton("Side by side")
        self.side_button.setCheckable(True)
        self.side_button.setToolTip("FLAIR, reconstruction and residual in a napari grid")
        self.export_base = QLineEdit()
        self.export_base.setPlaceholderText("base name (default: <input>_tae)")
        self.export_button = QPushButton("Export...")

        run_box = QGroupBox("Run a model")
        form = QFormLayout(run_box)
        form.addRow("FLAIR image", self.image_combo)
        form.addRow("Brain mask", self.mask_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        form.addRow(self.device_label)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.progress_bar)
        form.addRow(self.status)

        post_box = QGroupBox("Post-processing (live)")
        pform = QFormLayout(post_box)
        pform.addRow("Score", self.score_combo)
        pform.addRow("Median kernel", self.kernel_spin)
        pform.addRow("Squash (%)", self.squash_slider)
        pform.addRow(self.reset_button)
        size_row = QHBoxLayout()
        size_row.addWidget(self.min_size_spin)
        size_row.addWidget(self.min_unit_combo)
        pform.addRow("Min lesion size", size_row)
        pform.addRow(self.mode_check)

        review_box = QGroupBox("Lesions")
        review_box.setToolTip(f"On a result layer: {NEXT_KEY} next lesion, {PREV_KEY} previous")
        rlayout = QVBoxLayout(review_box)
        rlayout.addWidget(self.table)
        rlayout.addWidget(self.side_button)
        export_row = QHBoxLayout()
        export_row.addWidget(self.export_base)
        export_row.addWidget(self.export_button)
        rlayout.addLayout(export_row)

        # settings scroll on a small screen; the splitter gives the table the height left
        controls = QWidget()
        clayout = QVBoxLayout(controls)
        clayout.setContentsMargins(0, 0, 0, 0)
        for box in (run_box, post_box):
            clayout.addWidget(box)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(controls)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(scroll)
        splitter.addWidget(review_box)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        scroll.setMinimumHeight(min(controls.sizeHint().height(), 460))
        # never narrower than the settings (no horizontal scroll bar: the warning wraps instead)
        scroll.setMinimumWidth(controls.minimumSizeHint().width()
                               + scroll.verticalScrollBar().sizeHint().width())
        splitter.setChildrenCollapsible(False)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(splitter)

        self.models = ModelChooser(self.model_combo, self.settings, on_error=self._error,
                                   on_change=self._on_model_selected, save=save_preferences)
        self.device_combo.currentTextChanged.connect(self._on_device_changed)
        self.precision_combo.currentTextChanged.connect(self._show_run_note)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.reset_button.clicked.connect(self.reset_squash)
        # the calibrated squash depends on the score, kernel and mode: changing one moves to it
        self.score_combo.currentIndexChanged.connect(self._on_calibration_key_changed)
        self.kernel_spin.valueChanged.connect(self._on_calibration_key_changed)
        self.squash_slider.valueChanged.connect(self._on_post_changed)
        self.min_size_spin.valueChanged.connect(self._on_post_changed)
        self.min_unit_combo.currentTextChanged.connect(self._on_post_changed)
        self.mode_check.toggled.connect(self._on_calibration_key_changed)
        self.table.clicked.connect(lambda index: self.go_to_lesion(index.row()))
        self.side_button.toggled.connect(self.show_side_by_side)
        self.export_button.clicked.connect(self._export_clicked)
        self._on_device_changed(self.device_combo.currentText())
        self._on_model_selected()

    def _viewer_connections(self) -> list[tuple[Any, Any]]:
        """(event emitter, callback) pairs the widget keeps on the viewer and its layers."""
        events = self.viewer.layers.events
        pairs = [(events.inserted, self._on_layer_inserted),
                 (events.inserted, self._orient_radiological),
                 (events.removed, self._on_layer_removed), (events.moved, self._refresh_layers)]
        return pairs + [(layer.events.name, self._refresh_layers) for layer in self.viewer.layers]

    def _orient_radiological(self, event: Any = None) -> None:
        """Radiological camera once a volume placed in world mm is added (or already there).

        The reader returns layer data only; the view is set here, where layers arrive.
        """
        from napari_tae.plugin._layers import GEOMETRY_KEY, set_radiological_view

        layers = [event.value] if event is not None else list(self.viewer.layers)
        if any(GEOMETRY_KEY in layer.metadata and not _is_result(layer) for layer in layers):
            set_radiological_view(self.viewer)

    def _refresh_layers(self, event: Any = None) -> None:
        """Refill the layer choosers, keeping the selected layers (results are not inputs)."""
        from napari.layers import Image, Labels

        for combo, kind, modes in ((self.image_combo, Image, ()),
                                   (self.mask_combo, Labels, BRAIN_MASK_MODES)):
            current = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            for text, mode in modes:
                combo.addItem(text, mode)
            for layer in self.viewer.layers:
                if isinstance(layer, kind) and not _is_result(layer) and layer.ndim == 3:
                    combo.addItem(layer.name, layer)
            index = combo.findData(current) if current is not None else -1
            if index >= 0:
                combo.setCurrentIndex(index)
            combo.blockSignals(False)
        for layer, state in self._states.items():
            state.source_name = layer.name
        self._on_image_changed()

    def _on_layer_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh_layers)
        self._refresh_layers()

    def select_input(self, layer: Any) -> None:
        """Choose ``layer`` as the FLAIR input (the layer context menu's "Find anomalies...")."""
        index = self.image_combo.findData(layer)
        if index >= 0:
            self.image_combo.setCurrentIndex(index)

    # ----------------------------------------------------------------------------- model
    def checkpoint_spec(self) -> str | None:
        return self.models.spec

    def load_checkpoint_file(self, path: str) -> bool:
        """Validate a whole checkpoint file and select it; on failure show why, change nothing."""
        return self.models.load_file(path)

    def _on_model_selected(self) -> None:
        """The selected model's scores (its default one selected), then its calibrated squash."""
        from napari_tae.scores import available_scores, default_score

        meta = self.models.meta
        self.score_combo.blockSignals(True)
        self.score_combo.clear()
        self.score_combo.addItems(available_scores(meta))
        self.score_combo.setCurrentText(default_score(meta))
        self.score_combo.blockSignals(False)
        self.reset_squash()

    def _state_of_model(self) -> ReviewState | None:
        """The shown result when it comes from the selected model (its score volume is known)."""
        state = self._active
        return state if state is not None and state.checkpoint == str(self.checkpoint_spec()) else None

    def reset_squash(self) -> None:
        """Squash to the model's calibrated value for the score, kernel and mode; without one, a
        per-scan robust value once a result is shown (else the paper's 1 %)."""
        from napari_tae.scores import label_free_squash

        post = self.post_settings()
        state = self._state_of_model()
        try:
            if state is not None:
                squash, _ = state.label_free_squash(post)
            else:
                squash, _ = label_free_squash(self.models.meta, post.score, post.kernel, post.mode)
        except ValueError as exc:
            self._error(str(exc))
            return
        self.set_squash(squash)

    def set_squash(self, squash: float) -> None:
        """Set the squash slider; its range is the score's (:func:`napari_tae.scores.squash_limit`),
        widened so that a larger value is never clamped."""
        from napari_tae.scores import ScoreSpec, score_spec, squash_limit

        try:
            spec = score_spec(self.models.meta, self.post_settings().score)
        except ValueError:
            spec = ScoreSpec()
        top = max(squash_limit(self.models.meta, spec), float(np.ceil(1.5 * squash)))
        if self.squash_slider.maximum() != top:
            self.squash_slider.setRange(0.0, top)
        self.squash_slider.setToolTip(squash_tooltip(spec))
        self.squash_slider.setValue(squash)

    def _on_device_changed(self, device: str) -> None:
        if self._show_run_note():
            self.settings.device = device

    def _show_run_note(self) -> bool:
        """Say in the device line what the chosen device and precision mean here; False when
        the device cannot be used."""
        from napari_tae.inference import precision_note, select_device

        try:
            resolved = select_device(self.device_combo.currentText())
        except Exception as exc:  # noqa: BLE001 - any device problem is shown, never raised in the GUI
            self.device_label.setText(f"<b style='color:orange'>{html.escape(str(exc))}</b>")
            return False
        note = precision_note(self.precision_combo.currentText(), resolved)
        if note:
            self.device_label.setText(f"<b style='color:orange'>{html.escape(note[0].upper() + note[1:])}.</b>")
        elif resolved.type == "cpu":
            self.device_label.setText("<b style='color:orange'>Running on CPU: a volume may take "
                                      "minutes; a GPU is much faster.</b>")
        else:
            self.device_label.setText(f"Using {resolved.type}.")
        return True

    # ----------------------------------------------------------------------------- run
    def image_layer(self):
        layer = self.image_combo.currentData()
        return layer if layer is not None and layer in self.viewer.layers else None

    def _brain(self, layer, shape: tuple[int, ...]) -> tuple[bool, np.ndarray | None, str]:
        """``(fits, brain, skull_strip)``: the chosen brain mask layer as bool (None for a
        skull-stripping mode of napari_tae.brain, or when it doesn't fit) and the mode."""
        chosen = self.mask_combo.currentData()
        if isinstance(chosen, str):
            return True, None, chosen
        if chosen is None or chosen not in self.viewer.layers:
            return True, None, "auto"
        brain = np.asarray(chosen.data) > 0
        if brain.shape != shape:
            self._error(f"Brain mask '{chosen.name}' shape {brain.shape} doesn't match "
                        f"'{layer.name}' {shape}.")
            return False, None, "auto"
        return True, brain, "auto"

    def _edits_to_keep(self, layer) -> tuple[bool, EditRecord | None]:
        """Ask before a re-run replaces a mask with manual edits: (go on, edits to carry over)."""
        state = self._states.get(layer)
        mask = self.result_layer(state, "anomaly mask") if state is not None else None
        if mask is None:
            return True, None
        state.record_edits(mask.data)
        if not state.edits.any:
            return True, None
        box = QMessageBox(QMessageBox.Icon.Question, "Manual edits",
                          f"The mask of '{layer.name}' has manual edits "
                          f"({state.edits.n_added} voxels painted, {state.edits.n_erased} erased). "
                          "Replace them with the new result, or keep them on top of it?",
                          REPLACE | KEEP_EDITS | CANCEL, self)
        box.button(REPLACE).setText("Replace")
        box.button(KEEP_EDITS).setText("Keep edits")
        box.setDefaultButton(KEEP_EDITS)
        choice = QMessageBox.StandardButton(box.exec())
        if choice == CANCEL:
            return False, None
        return True, state.edits if choice == KEEP_EDITS else None

    def run(self) -> None:
        """Start inference on the chosen layer; a run already going is cancelled first."""
        layer = self.image_layer()
        spec = self.checkpoint_spec()
        if layer is None or spec in (None, BROWSE):
            self._error("Choose a 3D FLAIR image layer and a model first.")
            return
        data = np.asarray(layer.data, dtype=np.float32)
        fits, brain, skull_strip = self._brain(layer, data.shape)
        go_on, keep = self._edits_to_keep(layer) if fits else (False, None)
        if not go_on:
            return
        self.cancel(quiet=True)
        tag = self._run_gen.next()
        self.settings.device = self.device_combo.currentText()
        self.settings.precision = self.precision_combo.currentText()
        self.settings.add_recent(spec)
        save_preferences(self.settings)
        from napari_tae.inference import inference_job

        job = partial(inference_job, spec, data, brain=brain, skull_strip=skull_strip,
                      spacing=tuple(float(v) for v in layer.scale), device=self.settings.device,
                      batch_size=self.settings.batch_size, precision=self.settings.precision)
        if self.progress_in_dock:
            self._progress = _DockProgress(self.progress_bar, data.shape[0])
        else:
            self._progress = _RunProgress(data.shape[0], f"Finding anomalies in '{layer.name}'",
                                          self.cancel)
        self._set_running(True, f"Running on '{layer.name}'...")
        self._worker = start_task(
            job, synchronous=self.synchronous, on_yield=partial(self._on_progress, tag),
            on_return=partial(self._on_inference_done, tag, layer, data, spec, keep),
            on_error=partial(self._on_inference_error, tag), on_warning=self._warn,
        )

    def cancel(self, quiet: bool = False) -> None:
        """Stop the running inference after its current batch; its result is discarded."""
        worker, self._worker = self._worker, None
        self._run_gen.invalidate()
        self._close_progress()
        if worker is not None:
            worker.quit()
            if not quiet:
                self._set_running(False, "Cancelled; no result was written.")

    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def _set_running(self, running: bool, text: str = "") -> None:
        self.run_button.setText("Re-run" if running else "Run")
        self.cancel_button.setEnabled(running)
        if text:
            self.status.setText(text)

    def _close_progress(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.close()

    def _on_progress(self, tag: int, value: tuple[int, int]) -> None:
        if self._run_gen.is_current(tag) and self._progress is not None:
            self._progress.set(value[0])

    def _on_inference_error(self, tag: int, exc: BaseException) -> None:
        if self._run_gen.is_current(tag):
            self._worker = None
            self._close_progress()
            self._set_running(False)
            self._error(f"Inference failed: {error_line(exc)}")

    def _on_inference_done(self, tag: int, layer, data: np.ndarray, spec: str,
                           keep: EditRecord | None, value) -> None:
        """Adopt a finished run only if it is still the latest one and its input is unchanged."""
        if not self._run_gen.is_current(tag):
            return  # cancelled or superseded: dropped
        self._worker = None
        self._close_progress()
        self._set_running(False)
        if layer not in self.viewer.layers or np.shape(layer.data) != data.shape:
            self.status.setText(f"'{layer.name}' was removed or changed during the run; "
                                "result discarded.")
            return
        rec, meta, device = value
        from napari_tae.plugin._layers import GEOMETRY_KEY

        state = ReviewState(
            source_name=layer.name, residual=rec.residual, brain=rec.brain,
            spacing=tuple(float(v) for v in layer.scale),
            origin=tuple(float(v) for v in layer.translate),
            geometry=layer.metadata.get(GEOMETRY_KEY),
            checkpoint=str(spec), meta=meta,
            run_settings=rec.settings,
            normalised=rec.normalised,
        )
        if keep is not None:
            state.edits = keep
        old = self._states.get(layer)
        if old is not None:
            old.generation.invalidate()
            state.layers = old.layers  # the same layers show the new result
        from napari_tae.scores import available_scores, calibrated_squash

        if self.post_settings().score not in available_scores(meta):  # the model changed meanwhile
            self._on_model_selected()
        post = self.post_settings()
        labels = state.accept(state.compute(post))
        self._states[layer] = state
        self._active = state
        self._set_result(state, "reconstruction", rec.reconstruction, layer)
        self._set_result(state, "residual", rec.residual, layer)
        self._set_result(state, "score", state.score(post.score), layer)
        self._set_result(state, "anomaly mask", labels, layer)
        self._set_brain_mask(layer, state)
        self._show_lesions(state)
        if calibrated_squash(meta, post.score, post.kernel, post.mode) is None:
            self.reset_squash()  # no calibrated value: the per-scan one, now that the score exists
        self._info(f"Done on {device}: {len(state.lesions)} lesion(s) in '{layer.name}' "
                   f"(brain mask: {rec.brain_method.replace('_', '-')}).")

    def _set_brain_mask(self, source, state: ReviewState) -> None:
        """Show the brain mask the run used as an editable Labels layer and choose it for the
        next run: paint or erase it, then Re-run uses it."""
        from napari_tae.plugin._layers import brain_mask_style

        layer = self._brain_layers.get(source)
        data = np.asarray(state.brain, dtype=np.uint8)
        if layer is not None and layer in self.viewer.layers:
            _replace_data(layer, data)
        else:
            # with the input's geometry: same units on the canvas, saved back on its grid
            kw = _placement(state.geometry, f"{source.name} brain mask", source)
            layer = self._add_outlined_labels(data, brain_mask_style(), kw)
            self._brain_layers[source] = layer
        self.mask_combo.setCurrentIndex(max(self.mask_combo.findData(layer), 0))

    def _add_outlined_labels(self, data: np.ndarray, style: dict[str, Any], kw: dict[str, Any]):
        style = dict(style)
        contour = style.pop("contour")  # not an add_labels keyword
        layer = self.viewer.add_labels(data, **style, **kw)
        layer.contour = contour
        return layer

    # ----------------------------------------------------------------------------- layers
    def result_layer(self, state: ReviewState | None, kind: str):
        """The layer showing ``kind`` of ``state``'s result, if it is still in the viewer."""
        layer = state.layers.get(kind) if state is not None else None
        return layer if layer is not None and layer in self.viewer.layers else None

    def _set_result(self, state: ReviewState, kind: str, data: np.ndarray, source) -> None:
        """Write a result into its layer (one assignment of its data), adding it if needed."""
        from napari_tae.plugin._layers import residual_limits, result_style

        kw = _placement(state.geometry, f"{state.source_name} {kind}", source)
        kw["metadata"] = {**kw["metadata"], RESULT_KEY: kind, SOURCE_KEY: state.source_name}
        layer = self.result_layer(state, kind)
        squash = self.post_settings().squash
        if layer is not None:
            _replace_data(layer, data)
            # placement is set only when it changed: each assignment re-renders the canvas
            if not (np.allclose(layer.scale, kw["scale"])
                    and np.allclose(layer.translate, kw["translate"])):
                layer.scale, layer.translate = kw["scale"], kw["translate"]
            layer.metadata.update(kw["metadata"])
            if kind == "residual":
                layer.contrast_limits = residual_limits(data, squash)
        elif kind == "anomaly mask":
            layer = self._add_outlined_labels(data, result_style(kind, squash=squash, data=data), kw)
            # after brush strokes, relabel and refresh the table (the edits are kept)
            layer.events.paint.connect(lambda _e: self._post_timer.start(PAINT_DEBOUNCE_MS))
        else:
            layer = self.viewer.add_image(data, **result_style(kind, squash=squash, data=data),
                                          **kw)
        if kind == "anomaly mask":
            layer.features = lesion_features(state.lesions)
        if kind not in state.layers or state.layers[kind] is not layer:
            self._bind_keys(layer)
        state.layers[kind] = layer

    def _on_layer_removed(self, event: Any) -> None:
        """Forget the result of a removed input; a removed result layer is made again on demand."""
        layer = event.value
        layer.events.name.disconnect(self._refresh_layers)
        state = self._states.pop(layer, None)
        if state is not None:
            state.generation.invalidate()
            if self._active is state:
                self._active = None
                self._show_lesions(None)
        self._refresh_layers()

    def _on_image_changed(self, *_: Any) -> None:
        """Sliders and table follow the selected input if it has a result."""
        source = self.image_combo.currentData()
        chosen = self.mask_combo.currentData()
        if chosen is not None and chosen in self._brain_layers.values() \
                and self._brain_layers.get(source) is not chosen:
            # another input's brain mask does not fit this one: take this input's, else automatic
            own = self._brain_layers.get(source)
            self.mask_combo.setCurrentIndex(max(self.mask_combo.findData(own), 0) if own else 0)
        state = self._states.get(source)
        if state is not None and state is not self._active:
            self._active = state
            self._show_post(state.post)
            self._show_lesions(state)

    def show_side_by_side(self, on: bool = True) -> None:
        """FLAIR, reconstruction and residual side by side (napari grid), or back to overlay."""
        state = self._active
        layers = [self._input_layer(state)] + [self.result_layer(state, k) for k in _KINDS[:2]]
        if on and all(ly is not None for ly in layers):
            self._side_by_side.show(*layers)
        else:
            self._side_by_side.hide()
            if on:
                self.status.setText("Side by side needs a result: run a model first.")
        self.side_button.blockSignals(True)
        self.side_button.setChecked(self._side_by_side.enabled)
        self.side_button.blockSignals(False)

    def _input_layer(self, state: ReviewState | None):
        return next((layer for layer, st in self._states.items() if st is state), None)

    # ----------------------------------------------------------------------------- post-processing
    def post_settings(self) -> PostSettings:
        kernel = int(self.kernel_spin.value())
        return PostSettings(
            score=self.score_combo.currentText() or "residual",
            kernel=kernel if kernel % 2 else kernel + 1,  # typed even values round up to odd
            squash=float(self.squash_slider.value()),
            mode="3d" if self.mode_check.isChecked() else "2d",
            min_size=float(self.min_size_spin.value()),
            min_size_unit=self.min_unit_combo.currentText(),
        )

    def _show_post(self, post: PostSettings) -> None:
        widgets = (self.kernel_spin, self.squash_slider, self.min_size_spin, self.min_unit_combo,
                   self.mode_check, self.score_combo)
        for w in widgets:
            w.blockSignals(True)
        if self.score_combo.findText(post.score) >= 0:
            self.score_combo.setCurrentText(post.score)
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

    def _on_calibration_key_changed(self, *_: Any) -> None:
        """Score, kernel or mode changed: show that score and move to its calibrated squash."""
        state = self._state_of_model()
        if state is not None and self.result_layer(state, "score") is not None:
            try:
                values = state.score(self.post_settings().score)
            except ValueError as exc:
                self._error(str(exc))
                return
            _replace_data(self.result_layer(state, "score"), values)
        self.reset_squash()  # emits a post update when the value changes
        self._on_post_changed()

    def _on_post_changed(self, *_: Any) -> None:
        """Visible slice now, whole volume after a short debounce."""
        post = self.post_settings()
        st = self.settings  # remembered as the next session's defaults (saved on run and close)
        st.kernel, st.mode, st.min_size, st.min_size_unit = (post.kernel, post.mode, post.min_size,
                                                             post.min_size_unit)
        state = self._active
        if state is None:
            return
        layer = self.result_layer(state, "anomaly mask")
        z = self._current_index(layer) if layer is not None else None
        if z is not None:
            state.record_edits(layer.data, index=z)
            try:
                layer.data[z] = state.preview_slice(z, post, current=layer.data[z])
            except ValueError as exc:  # a score the shown result's model does not offer
                self._error(str(exc))
                return
            # the slice only: the extent is unchanged, the thumbnail follows with the volume
            layer.refresh(thumbnail=False, extent=False, highlight=False)
        state.generation.next()  # a volume update already running is now stale
        if self.synchronous:
            self._request_volume()
        else:  # once the slider's event is handled, so the slice is drawn first
            self._post_timer.start(0)

    def _request_volume(self) -> None:
        """Start the whole-volume update now, or right after the one running (latest wins).

        No debounce delay for a slider: the first step starts at once; steps during a running
        update collapse into one update with the latest settings when it ends.
        """
        if self._post_worker is not None:
            self._volume_pending = True
            return
        self._update_volume()

    def _on_volume_finished(self) -> None:
        self._post_worker = None
        if self._volume_pending and not self._closed:
            self._volume_pending = False
            self._update_volume()

    def _update_volume(self) -> None:
        state = self._active
        if state is None:
            return
        layer = self.result_layer(state, "anomaly mask")
        tag = state.generation.next()
        if layer is not None:
            state.record_edits(layer.data)
        post = self.post_settings()
        try:
            score = state.score(post.score)
        except ValueError as exc:  # a score the shown result's model does not offer
            self._error(str(exc))
            return
        job = partial(compute_mask, state.residual, post, spacing=state.spacing,
                      origin=state.origin, brain=state.brain, edits=state.edits.snapshot(), score=score)
        worker = start_task(
            job, synchronous=self.synchronous, on_return=partial(self._apply_mask, state, tag),
            on_error=lambda exc: self._error(f"Post-processing failed: {error_line(exc)}"),
            on_warning=self._warn,
        )
        if worker is not None:  # kept referenced while it runs
            self._post_worker = worker
            worker.finished.connect(self._on_volume_finished)

    def _apply_mask(self, state: ReviewState, tag: int, result) -> None:
        if not state.generation.is_current(tag):
            return  # settings changed again (or layer gone) while computing: a newer one follows
        source = self._input_layer(state)
        if source is None:
            return
        layer = self.result_layer(state, "anomaly mask")
        if layer is not None:
            state.record_edits(layer.data)
        labels = state.accept(state.finish(result))
        self._set_result(state, "anomaly mask", labels, source)  # remade if it was deleted
        residual = self.result_layer(state, "residual")
        if residual is not None:  # the heat overlay starts at the threshold, its top is kept
            from napari_tae.plugin._layers import follow_threshold

            residual.contrast_limits = follow_threshold(residual.contrast_limits,
                                                        result.post.squash)
        if state is self._active:
            self._show_lesions(state)

    @property
    def is_updating(self) -> bool:
        """Whether a debounced or background whole-volume update is still pending."""
        state = self._active
        if self._post_timer.isActive() or self._post_worker is not None:
            return True
        return state is not None and state.post != self.post_settings()

    # ----------------------------------------------------------------------------- review
    def _show_lesions(self, state: ReviewState | None) -> None:
        self.lesions.set_lesions(state.lesions if state is not None else [])

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
        n = self.lesions.rowCount()
        if n:
            current = self.table.currentIndex().row()
            self.go_to_lesion((current + step) % n if current >= 0 else 0)

    def _bind_keys(self, layer) -> None:
        """Lesion stepping keys on a result layer: active only while that layer is selected."""
        for key, step in ((NEXT_KEY, 1), (PREV_KEY, -1)):
            layer.bind_key(key, lambda _layer, s=step: self._step_lesion(s), overwrite=True)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.cleanup()
        super().closeEvent(event)

    def cleanup(self) -> None:
        """Stop workers, save preferences and disconnect from the viewer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.cancel(quiet=True)
        self._post_timer.stop()
        for state in self._states.values():
            state.generation.invalidate()
        save_preferences(self.settings)
        for emitter, callback in self._viewer_connections():
            emitter.disconnect(callback)

    # ----------------------------------------------------------------------------- export
    def _export_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export folder")
        if folder:
            self.export(folder, ask=True)

    def export(self, folder: str, base: str | None = None, *, ask: bool = False) -> dict | None:
        """Write mask, residual, lesion CSV and provenance JSON; ``ask`` before overwriting."""
        state = self._active
        layer = self.result_layer(state, "anomaly mask")
        if layer is None:
            self._error("Nothing to export: run a model first.")
            return None
        import napari

        base = base or self.export_base.text().strip() or f"{state.source_name}_tae"
        source = self._input_layer(state)
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
        self._info(f"Exported to {folder}: " + ", ".join(p.name for p in paths.values()))
        return paths

    # ----------------------------------------------------------------------------- messages
    def _error(self, message: str) -> None:
        """The one report of a failure: the status line and one napari notification."""
        from napari.utils.notifications import show_error

        self.status.setText(f"<b style='color:red'>{message}</b>")
        show_error(message)

    def _warn(self, message: str, category: type = UserWarning) -> None:
        from napari.utils.notifications import show_warning

        self.status.setText(f"<b style='color:orange'>{message}</b>")
        show_warning(message)

    def _info(self, message: str) -> None:
        from napari.utils.notifications import show_info

        self.status.setText(message)
        show_info(message)


def _drop_late_results(widget: AnomalyWidget) -> None:
    """Closing napari's window deletes the dock without a closeEvent: what a worker still sends
    must find nothing current, its Qt widgets being gone (only Python state is touched here)."""
    widget._closed = True
    widget._run_gen.invalidate()
    for state in widget._states.values():
        state.generation.invalidate()
    worker, widget._worker = widget._worker, None
    if worker is not None:
        worker.quit()


def _placement(geometry: Any, name: str, source: Any) -> dict[str, Any]:
    """``name``, ``scale``, ``translate`` and ``metadata`` of a layer on ``source``'s grid: from
    its geometry when it has one (saved back on that grid), else from the layer itself."""
    from napari_tae.plugin._layers import layer_kwargs

    if geometry is not None:
        return layer_kwargs(geometry, name)
    return {"name": name, "scale": source.scale, "translate": source.translate, "metadata": {}}


def _replace_data(layer, data: np.ndarray) -> None:
    """New data of the same shape and dtype copied into the layer's array, else assigned.

    Copying in place skips what ``layer.data = ...`` redoes (dims, extent, dtype checks, a new
    texture) and keeps napari's Labels undo history valid (it records voxel indices).
    """
    current = layer.data
    if isinstance(current, np.ndarray) and current.shape == data.shape \
            and current.dtype == data.dtype and current.flags.writeable:
        np.copyto(current, data)
        layer.refresh(extent=False)
    else:
        layer.data = data
