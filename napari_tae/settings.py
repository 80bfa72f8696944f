"""Preferences of the napari-tae widget, remembered between napari sessions.

A small JSON file in the user's configuration folder (``platformdirs.user_config_dir``), or in
``$NAPARI_TAE_CONFIG_DIR`` when that is set (tests point it at a temporary folder). A missing or
corrupt file gives the defaults (a corrupt one with a warning), so a broken preference file can never
stop the plugin from opening. No napari or Qt import here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_tae._atomic import write_text_atomic
from napari_tae.options import DEVICE_CHOICES, MEDIAN_MODES, PRECISIONS

__all__ = [
    "CONFIG_ENV",
    "MAX_RECENT",
    "Settings",
    "SettingsWarning",
    "config_dir",
    "load_settings",
    "save_settings",
    "settings_path",
]

CONFIG_ENV = "NAPARI_TAE_CONFIG_DIR"
MAX_RECENT = 8
_FILENAME = "settings.json"
_UNITS = ("voxels", "mL")


class SettingsWarning(UserWarning):
    """The settings file could not be read and was ignored."""


@dataclass
class Settings:
    """Widget preferences; every field has a default so old or partial files still load."""

    last_checkpoint: str | None = None     # a file path, or "intensity" / a bundled name
    recent_checkpoints: list[str] = field(default_factory=list)  # most recent first
    device: str = "auto"
    kernel: int = 5
    mode: str = "2d"
    min_size: float = 0.0
    min_size_unit: str = "voxels"
    batch_size: int = 8
    precision: str = "auto"

    def add_recent(self, checkpoint: str) -> None:
        """Make ``checkpoint`` the last one used and move it to the front of the recent list."""
        self.last_checkpoint = checkpoint
        recent = [c for c in self.recent_checkpoints if c != checkpoint]
        self.recent_checkpoints = [checkpoint, *recent][:MAX_RECENT]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Settings:
        """Build from a JSON dict, dropping unknown keys and values of the wrong kind."""
        s = cls()
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
        if isinstance(raw.get("last_checkpoint"), str):
            s.last_checkpoint = raw["last_checkpoint"]
        recent = raw.get("recent_checkpoints")
        if isinstance(recent, list):
            s.recent_checkpoints = [c for c in recent if isinstance(c, str)][:MAX_RECENT]
        if raw.get("device") in DEVICE_CHOICES:
            s.device = raw["device"]
        kernel = raw.get("kernel")
        if isinstance(kernel, int) and 1 <= kernel <= 15 and kernel % 2 == 1:
            s.kernel = kernel
        if raw.get("mode") in MEDIAN_MODES:
            s.mode = raw["mode"]
        min_size = raw.get("min_size")
        if isinstance(min_size, (int, float)) and not isinstance(min_size, bool) and min_size >= 0:
            s.min_size = float(min_size)
        if raw.get("min_size_unit") in _UNITS:
            s.min_size_unit = raw["min_size_unit"]
        batch = raw.get("batch_size")
        if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
            s.batch_size = batch
        if raw.get("precision") in PRECISIONS:
            s.precision = raw["precision"]
        return s


def config_dir() -> Path:
    """Folder of the settings file: ``$NAPARI_TAE_CONFIG_DIR`` or the platform's user config dir."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override)
    from platformdirs import user_config_dir  # a napari dependency, so always present

    return Path(user_config_dir("napari-tae", appauthor=False))


def settings_path() -> Path:
    return config_dir() / _FILENAME


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read the settings; a missing file gives defaults, a corrupt one defaults plus a warning."""
    p = Path(path) if path is not None else settings_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Settings()
    except OSError as exc:
        warnings.warn(f"{p}: cannot read settings ({exc}); using defaults", SettingsWarning, stacklevel=2)
        return Settings()
    try:
        return Settings.from_dict(json.loads(text))
    except (ValueError, TypeError) as exc:
        warnings.warn(f"{p}: corrupt settings file ignored ({exc})", SettingsWarning, stacklevel=2)
        return Settings()


def save_settings(settings: Settings, path: str | os.PathLike | None = None) -> Path | None:
    """Write the settings atomically; returns the path, or None (with a warning) if it failed.

    Failing to save preferences must not break the widget, hence a warning rather than an error.
    """
    p = Path(path) if path is not None else settings_path()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p, json.dumps(settings.to_dict(), indent=2))
    except OSError as exc:
        warnings.warn(f"{p}: cannot save settings ({exc})", SettingsWarning, stacklevel=2)
        return None
    return p
