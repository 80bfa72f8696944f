"""The widget's preferences: napari's plugin settings where napari has them, else the JSON file.

napari >= 0.9 builds a settings model from the manifest's ``configurations`` contribution
(``napari.yaml``, section ``defaults``), shows it in napari's Preferences dialog and saves it
itself (``get_plugin_settings``). The JSON file of :mod:`napari_tae.settings` stays the store of
what napari has no place for (recent checkpoint files, the last model) and of everything on older
napari. Values the widget remembers are written to both, so either store alone restores them.
"""

from __future__ import annotations

import logging
from typing import Any

from napari_tae.settings import Settings, load_settings, save_settings

__all__ = ["PREFERENCE_FIELDS", "load_preferences", "napari_preferences", "save_preferences"]

_logger = logging.getLogger(__name__)
PLUGIN_NAME = "napari-tae"
SECTION = "defaults"
#: The Settings fields declared in ``napari.yaml`` under ``configurations: defaults``.
PREFERENCE_FIELDS = ("device", "batch_size", "precision", "kernel", "mode", "min_size", "min_size_unit")


def napari_preferences() -> Any:
    """napari's settings model of the ``defaults`` section, or None where napari has none."""
    try:
        from napari.settings import get_plugin_settings
    except ImportError:  # napari < 0.9: no plugin configurations
        return None
    try:
        return getattr(get_plugin_settings(PLUGIN_NAME), SECTION)
    except (KeyError, AttributeError):  # the manifest is not registered (e.g. run from source)
        return None


def load_preferences() -> Settings:
    """The JSON settings with the fields napari's Preferences owns taken from napari."""
    settings = load_settings()
    prefs = napari_preferences()
    if prefs is not None:
        for name in PREFERENCE_FIELDS:
            setattr(settings, name, getattr(prefs, name))
    return settings


def save_preferences(settings: Settings) -> None:
    """Write the JSON file and napari's plugin settings (napari saves its own file)."""
    save_settings(settings)
    prefs = napari_preferences()
    if prefs is None:
        return
    for name in PREFERENCE_FIELDS:
        value = getattr(settings, name)
        if getattr(prefs, name) != value:
            try:
                setattr(prefs, name, value)
            except ValueError as exc:  # pydantic's ValidationError: keep napari's value
                _logger.warning("napari-tae: preference %s=%r not saved: %s", name, value, exc)
