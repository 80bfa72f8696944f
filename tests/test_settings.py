"""Widget preferences: round trip, corrupt files, environment override."""

import json

import pytest

from napari_tae.settings import (
    CONFIG_ENV,
    MAX_RECENT,
    Settings,
    SettingsWarning,
    config_dir,
    load_settings,
    save_settings,
    settings_path,
)


@pytest.fixture(autouse=True)
def _config(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "cfg"))


def test_env_override(tmp_path):
    assert config_dir() == tmp_path / "cfg"
    assert settings_path().parent == tmp_path / "cfg"


def test_defaults_when_missing():
    assert load_settings() == Settings()


def test_round_trip():
    s = Settings(device="cpu", kernel=7, mode="3d", min_size=0.25, min_size_unit="mL", batch_size=4,
                 precision="bfloat16")
    s.add_recent("/a/one.safetensors")
    s.add_recent("intensity")
    s.add_recent("/a/one.safetensors")  # moves to the front, no duplicate
    path = save_settings(s)
    assert path == settings_path() and path.exists()
    back = load_settings()
    assert back == s
    assert back.last_checkpoint == "/a/one.safetensors"
    assert back.recent_checkpoints == ["/a/one.safetensors", "intensity"]


def test_recent_list_is_bounded():
    s = Settings()
    for i in range(MAX_RECENT + 3):
        s.add_recent(f"/c/{i}.safetensors")
    assert len(s.recent_checkpoints) == MAX_RECENT
    assert s.recent_checkpoints[0] == f"/c/{MAX_RECENT + 2}.safetensors"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"'])
def test_corrupt_file_ignored_with_warning(text):
    settings_path().parent.mkdir(parents=True)
    settings_path().write_text(text)
    with pytest.warns(SettingsWarning, match="corrupt"):
        assert load_settings() == Settings()


def test_bad_values_fall_back_per_field():
    settings_path().parent.mkdir(parents=True)
    raw = {"device": "tpu", "kernel": 4, "mode": "2d", "min_size": -1, "min_size_unit": "mL",
           "recent_checkpoints": ["x", 3, None], "batch_size": True, "precision": "half", "unknown": 1}
    settings_path().write_text(json.dumps(raw))
    s = load_settings()
    assert s.device == "auto" and s.kernel == 5 and s.min_size == 0.0 and s.batch_size == 8
    assert s.precision == "auto"
    assert s.min_size_unit == "mL" and s.recent_checkpoints == ["x"]


def test_save_failure_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the config folder should be
    with pytest.warns(SettingsWarning, match="cannot save"):
        assert save_settings(Settings(), blocker / "sub" / "settings.json") is None
