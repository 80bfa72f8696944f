"""``napari-tae segment`` and ``napari-tae models``: outputs, geometry, batch failures, overwrite.

Called in-process through :func:`napari_tae.cli.main` (fast); one subprocess test checks the
installed console script. The ``intensity`` baseline keeps most tests free of network weights.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_tae.cli import OUTPUT_SUFFIXES, main

SHAPE = (40, 48, 36)


def _write_case(path: Path, seed: int, *, oblique: bool = False) -> Path:
    """A small synthetic FLAIR volume with lesions, optionally in a flipped, oblique, 4D file."""
    from napari_tae.synthetic import add_anomalies, healthy_volume

    data, affine = healthy_volume(seed, shape=SHAPE)
    data, _ = add_anomalies(data, seed, kinds=("ms", "tumour"), affine=affine)
    if oblique:
        # LPS-like storage order, anisotropic voxels and a small rotation: the geometry must
        # survive the reorientation to RAS and back
        data = data[::-1, ::-1]
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
        theta = np.deg2rad(7.0)
        rot = np.eye(4)
        rot[:3, :3] = [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
        affine = rot @ affine @ flip @ np.diag([1.0, 1.0, 1.7, 1.0])
        data = data[..., None]  # 4D with one time point, as scanners often write
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    return {
        "plain": _write_case(folder / "case_a.nii.gz", 1),
        "oblique": _write_case(folder / "case_b.nii", 2, oblique=True),
    }


def _outputs(out_dir: Path, name: str) -> dict[str, Path]:
    return {suffix: out_dir / f"{name}{suffix}" for suffix in OUTPUT_SUFFIXES}


def test_segment_writes_outputs_on_input_grid(cases, tmp_path):
    out_dir = tmp_path / "out"
    status = main(["-q", "segment", str(cases["plain"]), str(cases["oblique"]),
                   "--checkpoint", "intensity", "--out-dir", str(out_dir), "--min-size", "3"])
    assert status == 0
    for key, name in (("plain", "case_a"), ("oblique", "case_b")):
        source = nib.load(cases[key])
        outs = _outputs(out_dir, name)
        assert all(p.is_file() and p.stat().st_size > 0 for p in outs.values()), sorted(out_dir.iterdir())
        for suffix in ("_reconstruction.nii.gz", "_residual.nii.gz", "_score.nii.gz", "_mask.nii.gz"):
            img = nib.load(outs[suffix])
            assert img.shape == source.shape
            np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
            np.testing.assert_allclose(img.header.get_qform(), source.header.get_qform(), atol=1e-5)
            assert int(img.header["sform_code"]) == int(source.header["sform_code"])
            assert int(img.header["qform_code"]) == int(source.header["qform_code"])
        mask = np.asarray(nib.load(outs["_mask.nii.gz"]).dataobj)
        assert mask.dtype.kind in "iu" and set(np.unique(mask)) <= {0, 1}
        residual = np.asarray(nib.load(outs["_residual.nii.gz"]).dataobj)
        assert residual.min() >= 0 and residual.max() <= 1
        with open(outs["_lesions.csv"], newline="") as fh:
            rows = list(csv.DictReader(fh))
        # the mask's connected components (26-connectivity, >= 3 voxels) are the table's rows
        from scipy import ndimage as ndi

        labelled, n = ndi.label(mask.squeeze(), structure=np.ones((3, 3, 3)))
        sizes = np.bincount(labelled.ravel())[1:]
        assert len(rows) == n and n == int((sizes >= 3).sum())
        assert sum(int(r["voxels"]) for r in rows) == int(mask.sum())
        record = json.loads(outs["_provenance.json"].read_text())
        assert record["input"] == str(cases[key].resolve())
        assert record["model"]["name"] == "intensity"
        # the provenance names the score the mask thresholds, and its calibrated threshold
        assert record["settings"]["score"] == "residual"
        assert record["settings"]["squash_source"] == "calibrated"
        assert record["settings"]["min_size"] == 3
        assert record["lesions"] == len(rows)
        assert record["software"]["napari_tae"]


def test_segment_matches_headless_pipeline(cases, tmp_path):
    """Same numbers as napari_tae.inference.segment, the function the plugin calls."""
    from napari_tae.inference import segment
    from napari_tae.io import load_volume
    from napari_tae.models import build_model

    assert main(["-q", "segment", str(cases["oblique"]), "-m", "intensity", "-o", str(tmp_path),
                 "--squash", "20", "--median-kernel", "3"]) == 0
    volume = load_volume(cases["oblique"])
    expected = segment(volume, build_model("intensity"), None, kernel=3, squash=20.0)
    written = load_volume(tmp_path / "case_b_mask.nii.gz").data
    np.testing.assert_array_equal(written > 0, expected.mask)
    residual = load_volume(tmp_path / "case_b_residual.nii.gz").data
    np.testing.assert_allclose(residual, expected.residual, atol=1e-6)


def _logged(capsys, level: str) -> list[str]:
    """The CLI's log lines of one level (printed to stderr, through tqdm)."""
    prefix = f"napari-tae: {level}: "
    return [line[len(prefix):] for line in capsys.readouterr().err.splitlines() if line.startswith(prefix)]


def _fused_checkpoint(tmp_path: Path) -> Path:
    """A tiny checkpoint offering the three scores (weights: an untrained model)."""
    import torch

    from napari_tae.checkpoint import save_checkpoint
    from napari_tae.models import build_model

    torch.manual_seed(0)
    model = build_model("b_tae", img_size=32, embed_dim=16, depth=1, num_heads=2, patch_size=8)
    scores = {"default": "residual", "fused": {"weight": 0.5}, "prior": {"threshold": 0.3},
              "table": [{"score": s, "kernel": 5, "mode": "2d", "p99": 40.0, "p99.5": 45.0, "p99.9": 50.0}
                        for s in ("residual", "fused", "prior")]}
    return save_checkpoint(tmp_path / "tiny.safetensors", model, preprocessing={"normalisation": "per_volume",
                           "upper_percentile": 99.5}, calibration={"p99": 40.0, "default": 40.0}, scores=scores)


def test_segment_score_option_writes_the_thresholded_score(cases, tmp_path):
    from napari_tae.inference import segment
    from napari_tae.io import load_volume
    from napari_tae.scores import anomaly_score

    ckpt = _fused_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert main(["-q", "segment", str(cases["plain"]), "-m", str(ckpt), "-o", str(out), "--score", "fused"]) == 0
    score = load_volume(out / "case_a_score.nii.gz").data
    residual = load_volume(out / "case_a_residual.nii.gz").data
    record = json.loads((out / "case_a_provenance.json").read_text())
    assert record["settings"]["score"] == "fused"
    assert record["settings"]["score_params"] == {"name": "fused", "weight": 0.5}
    assert record["settings"]["squash"] == 40.0 and record["outputs"]["score"].endswith("case_a_score.nii.gz")
    # the written score is FLAIR + 0.5 * residual inside the brain, before the median
    from napari_tae.checkpoint import load_checkpoint

    model, meta = load_checkpoint(ckpt)
    expected = segment(load_volume(cases["plain"]), model, meta, score="fused", device="cpu")
    np.testing.assert_allclose(score, expected.score, atol=1e-6)
    np.testing.assert_allclose(score, anomaly_score("fused", expected.normalised, residual, expected.brain,
                                                    weight=0.5), atol=1e-6)
    np.testing.assert_array_equal(load_volume(out / "case_a_mask.nii.gz").data > 0, expected.mask)


def test_segment_precision_bfloat16_on_the_cpu(cases, tmp_path):
    from napari_tae.io import load_volume

    ckpt = _fused_checkpoint(tmp_path)
    runs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        assert main(["-q", "segment", str(cases["plain"]), "-m", str(ckpt), "-o", str(out), "--device", "cpu",
                     "--precision", precision]) == 0
        record = json.loads((out / "case_a_provenance.json").read_text())
        assert record["settings"]["precision"] == precision
        runs[precision] = load_volume(out / "case_a_reconstruction.nii.gz").data
    # bfloat16 keeps 8 bits of mantissa: close to float32 (normalised units), not equal to it
    difference = np.abs(runs["bfloat16"] - runs["float32"])
    assert 0 < difference.max() < 0.05


def test_segment_unusable_precision_is_one_line_before_any_file(cases, tmp_path, capsys, monkeypatch):
    import torch

    from napari_tae import inference

    monkeypatch.setattr(inference, "select_device", lambda _name: torch.device("mps"))
    out = tmp_path / "out"
    status = main(["segment", str(cases["plain"]), "-m", "intensity", "-o", str(out), "--device", "mps",
                   "--precision", "bfloat16"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "--precision bfloat16: bfloat16 runs on CUDA or the CPU, not on mps" in err
    assert "--device" not in err  # the device is fine: only the option at fault is named
    assert not out.exists() or not list(out.iterdir())


def test_segment_unusable_device_names_only_the_device(cases, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    status = main(["segment", str(cases["plain"]), "-m", "intensity", "-o", str(out), "--device", "cuda"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "--device cuda: Device 'cuda' requested but CUDA is not available" in err
    assert "--precision" not in err
    assert not out.exists() or not list(out.iterdir())


def test_segment_score_not_offered_is_one_line_before_any_file(cases, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(cases["plain"]), "-m", "intensity", "-o", str(out), "--score", "prior"]) == 2
    errors = _logged(capsys, "ERROR")
    assert len(errors) == 1 and "intensity has no calibrated 'prior' score" in errors[0]
    assert not out.exists() or not any(out.iterdir())  # nothing written
    with pytest.raises(SystemExit):
        main(["segment", str(cases["plain"]), "-m", "intensity", "-o", str(out), "--score", "edges"])


def test_batch_with_corrupt_file_in_the_middle(cases, tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(cases["plain"], folder / "a.nii.gz")
    (folder / "b_broken.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    shutil.copy(cases["plain"], folder / "c.nii.gz")
    out_dir = tmp_path / "out"
    status = main(["-q", "segment", str(folder), "-m", "intensity", "-o", str(out_dir)])
    assert status == 1
    assert (out_dir / "a_mask.nii.gz").is_file() and (out_dir / "c_mask.nii.gz").is_file()
    assert not list(out_dir.glob("b_broken*"))
    errors = _logged(capsys, "ERROR")
    assert any("b_broken.nii.gz" in m and "not a NIfTI file" in m for m in errors), errors
    # a missing file counts as one more failure; the status is the number of failures
    status = main(["-q", "segment", str(folder), str(tmp_path / "missing.nii.gz"), "-m", "intensity",
                   "-o", str(tmp_path / "out2")])
    assert status == 2


def test_complete_outputs_skipped_or_refused_before_computing(cases, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    args = ["-q", "segment", str(cases["plain"]), "-m", "intensity", "-o", str(out_dir)]
    assert main(args) == 0
    mask_path = out_dir / "case_a_mask.nii.gz"
    before = mask_path.read_bytes()
    stamp = mask_path.stat().st_mtime_ns

    import napari_tae.inference as inference

    def _fail(*_args, **_kwargs):
        raise AssertionError("segment() must not run when the outputs are complete")

    monkeypatch.setattr(inference, "segment", _fail)
    # same request: skipped (resume); other settings: refused, naming what differs
    assert main(args) == 0
    assert main([*args, "--squash", "30"]) == 1
    assert mask_path.read_bytes() == before and mask_path.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    assert main([*args, "--squash", "30", "--overwrite"]) == 0
    assert json.loads((out_dir / "case_a_provenance.json").read_text())["settings"]["squash"] == 30


def test_never_writes_over_an_input(cases, tmp_path):
    # an input named like another input's output, in the output folder itself
    shutil.copy(cases["plain"], tmp_path / "x.nii.gz")
    shutil.copy(cases["plain"], tmp_path / "x_mask.nii.gz")
    before = (tmp_path / "x_mask.nii.gz").read_bytes()
    status = main(["-q", "segment", str(tmp_path / "x.nii.gz"), str(tmp_path / "x_mask.nii.gz"),
                   "-m", "intensity", "-o", str(tmp_path), "--overwrite"])
    assert status == 1
    assert (tmp_path / "x_mask.nii.gz").read_bytes() == before


def test_user_errors_are_one_line(tmp_path, capsys):
    status = main(["segment", str(tmp_path), "-m", "intensity", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and "holds no NIfTI (.nii, .nii.gz) or DICOM file" in err and err.count("\n") == 1
    (tmp_path / "v.nii.gz").write_bytes(b"")
    status = main(["segment", str(tmp_path), "-m", "no_such_model", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and "no_such_model" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(tmp_path), "-m", "intensity", "-o", "o", "--median-kernel", "4"])
    assert exc.value.code == 2


def test_models_lists_zoo_and_bundled(capsys):
    from napari_tae.checkpoint import bundled_checkpoints, default_checkpoint
    from napari_tae.models import list_models

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    bundled = bundled_checkpoints()
    assert len(bundled) >= 2
    for name in bundled:
        assert name in out
    assert out.count("calibration (squash %): p99=") == len(bundled)
    default_line = [line for line in out.splitlines() if line.strip().endswith("(default)")]
    assert len(default_line) == 1 and default_line[0].split()[0] == default_checkpoint(), default_line


def test_console_script(cases, tmp_path):
    script = Path(sys.executable).with_name("napari-tae")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "napari_tae.cli"]
    done = subprocess.run([*command, "segment", str(cases["plain"]), "-m", "intensity", "-o",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "case_a_provenance.json").is_file()
    assert "1 input(s): 1 segmented, 0 skipped, 0 failed" in done.stderr


def test_brain_mask_file_and_mismatch(cases, tmp_path):
    from napari_tae.io import load_volume, save_volume

    volume = load_volume(cases["plain"])
    # half the brain only: the mask must confine the result
    brain = volume.data > 0
    brain[:, :, : brain.shape[2] // 2] = False
    mask_file = save_volume(brain.astype(np.uint8), volume.geometry, tmp_path / "brain.nii.gz", labels=True)
    out_dir = tmp_path / "out"
    status = main(["-q", "segment", str(cases["plain"]), str(cases["oblique"]), "-m", "intensity",
                   "-o", str(out_dir), "--brain-mask", str(mask_file), "--squash", "30"])
    assert status == 1  # the oblique case has another grid: named, skipped
    written = load_volume(out_dir / "case_a_mask.nii.gz").data > 0
    assert written.any() and not (written & ~brain).any()
    assert json.loads((out_dir / "case_a_provenance.json").read_text())["settings"]["brain_mask"] == "supplied"
    assert not (out_dir / "case_b_mask.nii.gz").exists()


def test_warning_names_the_file_on_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    head = np.zeros((40, 48, 30), np.float32)
    head[5:35, 6:42, 4:26] = 100 + rng.normal(0, 5, (30, 36, 22))
    head += rng.normal(20, 3, head.shape).astype(np.float32)  # noisy background: skull not stripped
    path = tmp_path / "with_skull.nii.gz"
    nib.save(nib.Nifti1Image(head, np.eye(4)), path)
    assert main(["segment", str(path), "-m", "intensity", "-o", str(tmp_path / "out"),
                 "--skull-strip", "never"]) == 0
    warned = _logged(capsys, "WARNING")
    assert any(m.startswith(str(path)) and "skull-stripped" in m for m in warned), warned


def test_skull_strip_writes_the_brain_mask_used(tmp_path):
    """A head on a zero background: auto finds it unstripped, deepbet's mask is written and used."""
    from napari_tae.io import load_volume
    from napari_tae.synthetic import healthy_subject
    from napari_tae.synthetic_head import add_head

    subject = healthy_subject(3, shape=(96, 112, 96))
    head = add_head(subject, 3)
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(head.data, head.affine), path)
    truth = head.brain.transpose(2, 1, 0)  # napari order, as load_volume gives
    out = tmp_path / "auto"
    assert main(["-q", "segment", str(path), "-m", "intensity", "-o", str(out)]) == 0
    brain = load_volume(out / "head_brain.nii.gz").data > 0
    assert 2 * np.count_nonzero(brain & truth) / (brain.sum() + truth.sum()) > 0.9
    mask = load_volume(out / "head_mask.nii.gz").data > 0
    assert not (mask & ~brain).any()
    settings = json.loads((out / "head_provenance.json").read_text())["settings"]
    assert settings["brain_mask"] == "deepbet" and settings["skull_strip"] == "auto"
    # never: the whole head is taken for brain (and the user is warned)
    assert main(["-q", "segment", str(path), "-m", "intensity", "-o", str(tmp_path / "never"),
                 "--skull-strip", "never"]) == 0
    whole = load_volume(tmp_path / "never" / "head_brain.nii.gz").data > 0
    np.testing.assert_array_equal(whole, load_volume(path).data > 0)
