"""Checkpoint tests: round trip, metadata, atomic save, and every refusal (one line, naming the file)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_tae import checkpoint as ckpt
from napari_tae.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    bundled_checkpoints,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    weights_sha256,
)
from napari_tae.models import build_model

PREP = {"upper_percentile": 99.5, "low": 0.0, "high": 1.0, "size": 64}
CALIB = {"p99": 1.5, "p99.5": 2.0, "p99.9": 3.0, "default": 1.5}
TRAIN = {"epochs": 3, "best_epoch": 2, "best_val_loss": 0.0123, "data": "synthetic"}

SMALL = {
    "b_tae": dict(img_size=64, embed_dim=32, depth=1, num_heads=2, patch_size=8),
    "h_tae_s": dict(img_size=64, embed_dim=16, depth=4, num_heads=2, window_size=4),
    "vq_vae": dict(img_size=64, channels=(8, 8, 16, 16), num_codes=16),
    "vae": dict(img_size=64, channels=(8, 8, 16, 16), intermediate_dim=32, latent_dim=16),
    "intensity": dict(img_size=64),
}


def _saved(tmp_path: Path, name: str = "b_tae", **kw) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model(name, **SMALL[name])
    path = save_checkpoint(tmp_path / f"{name}.safetensors", model, preprocessing=PREP, calibration=CALIB,
                           training=TRAIN, **kw)
    return model, path


def _rewrite(src: Path, dst: Path, edit=None, tensors=None) -> Path:
    """Copy a checkpoint, editing its napari-tae metadata dict and/or replacing its tensors."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["napari_tae"])
    if edit is not None:
        edit(meta)
    header["napari_tae"] = json.dumps(meta)
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata=header)
    return dst


def _refused(path: Path, match: str, *, meta_only: bool = False) -> str:
    funcs = [read_metadata] if meta_only else [load_checkpoint]
    for fn in funcs:
        with pytest.raises(CheckpointError, match=match) as info:
            fn(path)
        msg = str(info.value)
        assert msg.startswith(str(path) + ": ") and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------
# round trip
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL))
def test_round_trip_identical_outputs_and_metadata(tmp_path, name):
    model, path = _saved(tmp_path, name)
    model.eval()
    loaded, meta = load_checkpoint(path)
    assert not loaded.training and loaded.model_name == name
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta.format_version == FORMAT_VERSION and meta.model_name == name
    assert meta.config == model.config_dict() and meta.img_size == 64
    assert meta.preprocessing == PREP and meta.calibration == CALIB and meta.training == TRAIN
    assert meta.sha256 == weights_sha256(model.state_dict()) and len(meta.sha256) == 12
    assert read_metadata(path) == meta


def test_sha256_tracks_the_weights():
    a = build_model("b_tae", **SMALL["b_tae"]).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert weights_sha256(a) == weights_sha256(b)
    b["head.bias"][0] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)


def test_save_is_atomic_and_refuses_overwrite(tmp_path):
    model, path = _saved(tmp_path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, model, preprocessing=PREP)
    assert path.read_bytes() == before
    save_checkpoint(path, model, preprocessing=PREP, calibration={"p99": 9.0}, overwrite=True)
    assert read_metadata(path).calibration == {"p99": 9.0}
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temp files left behind


def test_save_refuses_bad_arguments(tmp_path):
    model = build_model("b_tae", **SMALL["b_tae"])
    with pytest.raises(ValueError, match=".safetensors"):
        save_checkpoint(tmp_path / "m.pt", model, preprocessing=PREP)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "m.safetensors", model, preprocessing=PREP, training={"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "m.safetensors", model, preprocessing=PREP, calibration={"p99": float("nan")})
    anonymous = type(model)(model.config)  # not built through the registry
    with pytest.raises(ValueError, match="registry name"):
        save_checkpoint(tmp_path / "m.safetensors", anonymous, preprocessing=PREP)
    assert not list(tmp_path.iterdir())


def test_save_unwraps_wrappers(tmp_path):
    model = build_model("b_tae", **SMALL["b_tae"])
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DistributedDataParallel does
    path = save_checkpoint(tmp_path / "w.safetensors", wrapper, preprocessing=PREP)
    assert read_metadata(path).model_name == "b_tae"
    assert set(load_file(str(path))) == set(model.state_dict())


# ----------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------


def test_refuses_random_bytes_and_empty_and_missing(tmp_path):
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(os.urandom(4096))
    _refused(rnd, "not a napari-tae checkpoint")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _refused(empty, "not a napari-tae checkpoint")
    _refused(tmp_path / "missing.safetensors", "no such file")
    _refused(tmp_path, "directory")
    fake = tmp_path / "fake.safetensors"  # plausible length prefix, header not JSON
    fake.write_bytes((16).to_bytes(8, "little") + b"\xff" * 32)
    _refused(fake, "not a safetensors file")


def test_refuses_plain_safetensors_without_our_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(build_model("b_tae", **SMALL["b_tae"]).state_dict(), str(plain))
    _refused(plain, "without napari-tae metadata")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt", "author": "someone"})
    _refused(other, "without napari-tae metadata", meta_only=True)


class _Trap:
    """Unpickling this would create a file: proves nothing is unpickled."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy", "pickle"])
def test_refuses_pickles_without_unpickling(tmp_path, kind):
    sentinel = tmp_path / "unpickled.flag"
    path = tmp_path / f"{kind}.safetensors"  # even with our suffix
    obj = {"state": build_model("b_tae", **SMALL["b_tae"]).state_dict(), "trap": _Trap(str(sentinel))}
    if kind == "torch_zip":
        torch.save(obj, path)
    elif kind == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    msg = _refused(path, "pickle")
    _refused(path, "pickle", meta_only=True)
    assert "never loaded" in msg
    assert not sentinel.exists()


@pytest.mark.parametrize("version, match", [
    (FORMAT_VERSION + 1, "newer than this napari-tae supports"),
    (0, "unsupported checkpoint format version 0"),
    ("1", "invalid checkpoint format version"),
])
def test_refuses_wrong_or_future_format_version(tmp_path, version, match):
    _, path = _saved(tmp_path)
    bad = _rewrite(path, tmp_path / "v.safetensors", lambda m: m.update(format_version=version))
    _refused(bad, match, meta_only=True)
    _refused(bad, match)


def test_refuses_unknown_model(tmp_path):
    _, path = _saved(tmp_path)
    bad = _rewrite(path, tmp_path / "u.safetensors", lambda m: m.update(model_name="gpt_tae"))
    msg = _refused(bad, "unknown model 'gpt_tae'")
    assert "b_tae" in msg  # lists the known ones


def test_refuses_broken_metadata_fields(tmp_path):
    _, path = _saved(tmp_path)
    bad = _rewrite(path, tmp_path / "f.safetensors", lambda m: m.pop("calibration"))
    _refused(bad, "lacks calibration", meta_only=True)
    bad = _rewrite(path, tmp_path / "t.safetensors", lambda m: m.update(config="b_tae"))
    _refused(bad, "'config' should be dict", meta_only=True)
    bad = _rewrite(path, tmp_path / "s.safetensors", lambda m: m.update(img_size=128))
    _refused(bad, "disagrees with config", meta_only=True)
    bad = _rewrite(path, tmp_path / "c.safetensors", lambda m: m["config"].update(patch_size=7))
    _refused(bad, "config does not build model 'b_tae'")
    bad = _rewrite(path, tmp_path / "p.safetensors", lambda m: m["preprocessing"].update(mm_per_px=-1))
    _refused(bad, "invalid preprocessing metadata: mm_per_px", meta_only=True)
    bad = _rewrite(path, tmp_path / "n.safetensors",
                   lambda m: m["preprocessing"].update(bias_correction="maybe"))
    _refused(bad, "invalid preprocessing metadata: Unknown bias_correction", meta_only=True)


def test_refuses_weights_that_do_not_fit_the_config(tmp_path):
    _, path = _saved(tmp_path)
    # config says 2 layers, file holds 1: missing tensors
    deeper = _rewrite(path, tmp_path / "d.safetensors", lambda m: m["config"].update(depth=2))
    msg = _refused(deeper, "weights do not fit the b_tae config")
    assert "missing" in msg
    # config says width 64, tensors are width 32: wrong shapes
    wider = _rewrite(path, tmp_path / "w.safetensors", lambda m: m["config"].update(embed_dim=64))
    assert "wrong shape" in _refused(wider, "weights do not fit")
    # an extra tensor
    tensors = load_file(str(path))
    tensors["extra.weight"] = torch.zeros(2)
    extra = _rewrite(path, tmp_path / "e.safetensors", tensors=tensors)
    assert "unexpected" in _refused(extra, "weights do not fit")


def test_refuses_altered_weights(tmp_path):
    _, path = _saved(tmp_path)
    tensors = load_file(str(path))
    tensors["head.bias"] = tensors["head.bias"] + 1.0
    bad = _rewrite(path, tmp_path / "a.safetensors", tensors=tensors)
    _refused(bad, "differs from the recorded")


def test_refuses_truncated_file(tmp_path):
    _, path = _saved(tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    _refused(cut, "corrupt tensor data|not a safetensors")


# ----------------------------------------------------------------------------------------------
# bundled checkpoints
# ----------------------------------------------------------------------------------------------


def test_bundled_checkpoints(tmp_path, monkeypatch):
    for p in bundled_checkpoints().values():  # whatever ships must load cleanly
        assert p.suffix == ".safetensors"
        read_metadata(p)
    monkeypatch.setattr(ckpt, "BUNDLED_DIR", tmp_path / "absent")
    assert bundled_checkpoints() == {}
    monkeypatch.setattr(ckpt, "BUNDLED_DIR", tmp_path)
    _saved(tmp_path, "vq_vae")
    (tmp_path / "notes.md").write_text("x")
    assert bundled_checkpoints() == {"vq_vae": tmp_path / "vq_vae.safetensors"}


def test_resolve_and_load_by_file_bundled_name_or_intensity(tmp_path):
    from napari_tae.checkpoint import bundled_checkpoints, load_model, resolve_checkpoint

    assert resolve_checkpoint("intensity") is None
    model, meta = load_model("intensity")
    # the baseline has no weights but a bundled calibration (checkpoints/intensity.json)
    assert sum(p.numel() for p in model.parameters()) == 0
    assert meta.model_name == "intensity" and meta.img_size == model.img_size
    assert meta.sha256 == weights_sha256({}) and meta.calibration["default"] > 50
    saved, path = _saved(tmp_path)
    assert resolve_checkpoint(path) == path
    loaded, meta = load_model(str(path))
    assert meta.model_name == "b_tae"
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), saved.eval()(x))
    for name, bundled in bundled_checkpoints().items():
        assert resolve_checkpoint(name) == bundled
    with pytest.raises(CheckpointError, match="no_such_model.*bundled: intensity"):
        resolve_checkpoint("no_such_model")


SCORES_META = {
    "default": "fused",
    "fused": {"weight": 0.75, "auprc": {"0.75": 0.5}},
    "prior": {"threshold": 0.6, "percentile": 90.0},
    "table": [{"score": "fused", "kernel": 5, "mode": "2d", "p99": 80.0, "p99.5": 85.0, "p99.9": 90.0}],
}


def test_scores_metadata_round_trip_and_recalibration_keeps_weights(tmp_path):
    _, path = _saved(tmp_path)
    old = read_metadata(path)
    assert old.scores == {}
    loaded, _ = load_checkpoint(path)
    again = save_checkpoint(tmp_path / "recalibrated.safetensors", loaded, preprocessing=old.preprocessing,
                            calibration=old.calibration, training=old.training, scores=SCORES_META)
    meta = read_metadata(again)
    assert meta.scores == SCORES_META and meta.sha256 == old.sha256
    assert meta.to_dict()["scores"] == SCORES_META


def test_checkpoint_without_scores_field_still_loads(tmp_path):
    # files written before scores existed have no 'scores' key at all
    _, path = _saved(tmp_path)
    old = _rewrite(path, tmp_path / "old.safetensors", lambda m: m.pop("scores"))
    _, meta = load_checkpoint(old)
    assert meta.scores == {} and meta.calibration == CALIB


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(scores=[]), "'scores' should be dict"),
    (lambda m: m.update(scores={"default": "edges"}), "unknown default score 'edges'"),
    (lambda m: m.update(scores={"default": "fused"}), "default score 'fused' has no parameters"),
    (lambda m: m.update(scores={"fused": {"weight": "big"}}), "lacks a numeric 'weight'"),
    (lambda m: m.update(scores={"table": [{"score": "residual", "kernel": 5}]}), "malformed calibration table"),
])
def test_bad_scores_metadata_refused_in_one_line(tmp_path, edit, match):
    _, path = _saved(tmp_path)
    _refused(_rewrite(path, tmp_path / "bad.safetensors", edit), match, meta_only=True)


def test_intensity_metadata_file_checked(tmp_path):
    import dataclasses

    from napari_tae.checkpoint import intensity_metadata, write_metadata_json

    assert intensity_metadata(tmp_path / "absent.json") is None
    meta = intensity_metadata()
    path = write_metadata_json(tmp_path / "intensity.json", meta)
    assert intensity_metadata(path) == meta
    write_metadata_json(path, dataclasses.replace(meta, sha256="0" * 12))
    with pytest.raises(CheckpointError, match="not the intensity baseline"):
        intensity_metadata(path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable intensity metadata"):
        intensity_metadata(path)
