"""The widget's model chooser: bundled checkpoints, the intensity baseline, recent files, Browse."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from qtpy.QtWidgets import QComboBox, QFileDialog, QWidget

from napari_tae.io import error_line
from napari_tae.settings import Settings

__all__ = ["BROWSE", "ModelChooser"]

BROWSE = "Browse..."


class ModelChooser:
    """Fills ``combo`` and keeps the chosen checkpoint's metadata.

    Args:
        combo: The combo box to fill (the widget lays it out).
        settings: Preferences; a file chosen with Browse joins ``recent_checkpoints``.
        on_error: Called with a one-line message when a checkpoint cannot be used.
        on_change: Called after the selection changed (``meta`` is up to date).
    """

    def __init__(self, combo: QComboBox, settings: Settings, *,
                 on_error: Callable[[str], Any], on_change: Callable[[], Any],
                 save: Callable[[Settings], Any]) -> None:
        self.combo = combo
        self.settings = settings
        self._on_error, self._on_change, self._save = on_error, on_change, save
        self.meta: Any = None  # CheckpointMeta of the selection (None: intensity)
        self.fill(select=settings.last_checkpoint)
        self._last_index = combo.currentIndex()
        self._load_meta()
        combo.activated.connect(self._on_activated)
        combo.currentIndexChanged.connect(self._on_changed)

    @property
    def spec(self) -> str | None:
        """Bundled name, file path or ``"intensity"`` (or :data:`BROWSE` while it is picked)."""
        return self.combo.currentData()

    def fill(self, select: str | None = None) -> None:
        """List the models; select ``select`` when listed, else the default bundled checkpoint."""
        from napari_tae.checkpoint import bundled_checkpoints, default_checkpoint

        combo = self.combo
        combo.blockSignals(True)
        combo.clear()
        for name in sorted(bundled_checkpoints()):
            combo.addItem(f"{name} (bundled)", name)
        combo.addItem("intensity (baseline, no network)", "intensity")
        for path in self.settings.recent_checkpoints:
            if path != "intensity" and os.path.isfile(path) and combo.findData(path) < 0:
                combo.addItem(os.path.basename(path), path)
        combo.addItem(BROWSE, BROWSE)
        index = combo.findData(select) if select else -1
        if index < 0:
            index = combo.findData(default_checkpoint())
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(False)

    def select(self, spec: str) -> None:
        self.combo.setCurrentIndex(self.combo.findData(spec))

    def load_file(self, path: str, parent: QWidget | None = None) -> bool:
        """Load and validate a whole checkpoint file (weights included), then list and select it.

        On failure the one-line reason goes to ``on_error`` and nothing changes.
        """
        from napari_tae.checkpoint import load_checkpoint

        try:
            load_checkpoint(path)  # metadata, model build, tensor shapes and weights checksum
        except Exception as exc:  # noqa: BLE001 (any unreadable file: reported, never a crash)
            self._on_error(f"Cannot use checkpoint: {error_line(exc, path)}")
            return False
        path = os.path.abspath(path)
        self.settings.add_recent(path)
        self._save(self.settings)
        self.fill(select=path)
        self._on_changed()
        return True

    def _on_activated(self, index: int) -> None:
        if self.combo.itemData(index) != BROWSE:
            return
        path, _ = QFileDialog.getOpenFileName(self.combo, "Choose a checkpoint", "",
                                              "Checkpoints (*.safetensors)")
        if not path or not self.load_file(path):
            self.combo.setCurrentIndex(self._last_index)

    def _on_changed(self, *_: Any) -> None:
        spec = self.spec
        if spec == BROWSE:
            return
        self._last_index = self.combo.currentIndex()
        self._load_meta()
        self._on_change()

    def _load_meta(self) -> None:
        spec = self.spec
        self.meta = None
        if spec == "intensity":  # its bundled calibration (metadata without weights)
            from napari_tae.checkpoint import intensity_metadata

            try:
                self.meta = intensity_metadata()
            except Exception as exc:  # noqa: BLE001 (an altered installation: uncalibrated, said so)
                self._on_error(f"Intensity baseline uncalibrated: {error_line(exc)}")
        elif spec not in (BROWSE, None):
            from napari_tae.checkpoint import read_metadata, resolve_checkpoint

            try:
                self.meta = read_metadata(resolve_checkpoint(spec))
            except Exception as exc:  # noqa: BLE001 (a recent file may have changed since)
                self._on_error(f"Cannot use checkpoint: {error_line(exc, spec)}")
