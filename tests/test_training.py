"""End-to-end tests of ``python -m training {synth,train,evaluate}`` on tiny synthetic data (CPU).

One small dataset and one trained model are shared by the module; every run is in-process through
the same ``main`` functions the command line uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training import train as train_mod
from training.__main__ import main as cli
from training.data import InputError, pair_by_name, split_by_volume

# A small spatial CNN AE (3 stride-2 stages, 8 x 8 x 16 bottleneck at 64 px) reconstructs healthy
# anatomy within a few epochs on CPU.
MODEL = ["--model", "ae_spatial", "--img-size", "64", "--set", "channels=[32, 64, 64]"]
EPOCHS = 12
# 3.6 mm per pixel: the scale this tiny model learns the anatomy at within 12 epochs (at the
# default 3 mm, 192 mm / 64 px, it needs more); N4 is checked on its own in test_brain.py
OPTIM = ["--epochs", str(EPOCHS), "--batch-size", "4", "--lr", "2e-3", "--seed", "0", "--deterministic",
         "--min-brain-fraction", "0.3", "--log-interval", "5", "--mm-per-px", "3.6",
         "--bias-correction", "none"]
# shorter runs for resume/NaN checks: fewer epochs, only the largest slices
SHORT = ["--epochs", "3", "--min-brain-fraction", "0.8"]


SHAPE = (64, 76, 64)  # about 3 mm voxels


def _write_gm_level_lesions(seed: int, image: Path, label: Path, where: str, n: int = 4,
                            radius: float = 2.5) -> None:
    """Balls at grey-matter intensity in white matter (``where="wm"``) or the ventricles ("csf").

    A FLAIR threshold cannot tell them from the (many) normal grey-matter voxels, so they are
    found only by a model that knows what belongs where: an untrained model scores like the
    intensity baseline (its output is near-constant, and the median filter removes its noise).
    """
    import nibabel as nib
    from scipy import ndimage as ndi

    from napari_tae.synthetic import healthy_subject

    sub = healthy_subject(seed, shape=SHAPE)
    data, lesion = sub.data.copy(), np.zeros(sub.data.shape, bool)
    gm_level = float(np.median(data[sub.gm > 0.8]))
    if where == "wm":
        depth = ndi.distance_transform_edt(sub.wm > 0.5)
        candidates = np.argwhere(depth >= min(radius + 1, depth.max()))
    else:  # deep CSF = ventricles (sulcal CSF lies near the surface)
        depth = ndi.distance_transform_edt(sub.brain > 0, sampling=sub.spacing)
        candidates = np.argwhere((sub.csf > 0.5) & (depth > 15.0))
    rng = np.random.default_rng(seed)
    grid = np.indices(data.shape)
    for c in candidates[rng.choice(len(candidates), min(n, len(candidates)), replace=False)]:
        lesion |= ((grid - c[:, None, None, None]) ** 2).sum(0) <= radius ** 2
    lesion &= sub.brain > 0
    data[lesion] = gm_level * (1 + 0.02 * rng.standard_normal(int(lesion.sum())))
    nib.save(nib.Nifti1Image(data.astype(np.float32), sub.affine), image)
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), sub.affine), label)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    rc = cli(["synth", "--out", str(out), "--n-train", "3", "--n-val", "1", "--n-test", "2",
              "--n-test-healthy", "1", "--shape", *map(str, SHAPE), "--kinds", "tumour", "ms"])
    assert rc == 0
    gm = out / "gm_level"
    (gm / "images").mkdir(parents=True)
    (gm / "labels").mkdir()
    for seed in (100, 102):
        _write_gm_level_lesions(seed, gm / "images" / f"gm_{seed}.nii.gz",
                                gm / "labels" / f"gm_{seed}.nii.gz", "wm")
    return out


def _train_argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(dataset / "train"), "--val-data", str(dataset / "val"),
            *MODEL, *OPTIM, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "model.safetensors"
    assert cli(_train_argv(dataset, out, "--data-note", "synthetic volumes only")) == 0
    return out


def _evaluate(dataset: Path, checkpoint: Path, out_json: Path, *extra: str) -> dict:
    rc = cli(["evaluate", "--checkpoint", str(checkpoint),
              "--images", str(dataset / "gm_level" / "images" / "*.nii.gz"),
              "--labels", str(dataset / "gm_level" / "labels"),
              "--healthy", str(dataset / "test" / "healthy"), "--out-json", str(out_json), *extra])
    assert rc == 0
    return json.loads(out_json.read_text())


def test_threshold_percentile_by_pooled_dice_by_hand():
    from types import SimpleNamespace

    from napari_tae.scores import ScoreSpec
    from training.calibrate import _select_percentile

    # kernel 1: no median. 8 brain voxels: scores 0.1..0.8, lesion = the top two
    x = np.zeros((1, 2, 4), np.float32)
    r = np.arange(1, 9, dtype=np.float32).reshape(1, 2, 4) / 10
    brain = np.ones_like(r, bool)
    label = r > 0.65
    rec = SimpleNamespace(normalised=x, residual=r, brain=brain)
    rows = [{"score": "residual", "kernel": 1, "mode": "2d", "p99": 45.0, "p99.5": 65.0, "p99.9": 75.0}]
    best, dice = _select_percentile(ScoreSpec(), rows, [(rec, label)], 1, "2d")
    # p99: 4 flagged, 2 hits -> 4 / 6; p99.5: exactly the lesion -> 1; p99.9: 1 flagged -> 2 / 3
    assert dice == pytest.approx({"p99": 4 / 6, "p99.5": 1.0, "p99.9": 2 / 3}) and best == 99.5
    # ties go to the lower percentile
    rows[0]["p99.9"] = 65.0
    assert _select_percentile(ScoreSpec(), rows, [(rec, label)], 1, "2d")[0] == 99.5


def test_calibration_volumes_carry_one_lesion_kind_each_in_turn(dataset: Path, monkeypatch):
    import napari_tae.synthetic as synthetic
    from napari_tae.models import build_model
    from training.calibrate import ANOMALY_KINDS, calibrate_detector

    asked = []
    original = synthetic.add_anomalies

    def recording(volume, seed, kinds, **kwargs):
        asked.append(tuple(kinds))
        return original(volume, seed, kinds, **kwargs)

    monkeypatch.setattr(synthetic, "add_anomalies", recording)
    healthy = sorted((dataset / "train").glob("*.nii.gz"))[:3]
    _, scores = calibrate_detector(build_model("intensity"), healthy,
                                   preprocessing={"normalisation": "per_volume", "upper_percentile": 99.5})
    assert asked == [(ANOMALY_KINDS[i % 2],) for i in range(3)]
    assert set(scores["percentiles"]) == {"residual"} and "in turn" in scores["percentiles_chosen_by"]["note"]


def test_train_writes_calibrated_checkpoint(trained: Path):
    from napari_tae.checkpoint import load_checkpoint

    model, meta = load_checkpoint(trained)
    assert meta.model_name == "ae_spatial" and meta.img_size == 64 and meta.config["channels"] == [32, 64, 64]
    assert set(meta.calibration) >= {"p99", "p99.5", "p99.9", "default"}
    assert 0 < meta.calibration["p99"] <= meta.calibration["p99.5"] <= meta.calibration["p99.9"] < 100
    # the scores: w and the prior's percentile picked among the candidates, their AUPRC stored,
    # a calibration row per score, kernel and mode (the residual's row is the calibration), and
    # each score's threshold percentile, the one with the best Dice on the anomalous volumes
    from napari_tae.scores import (
        FUSED_WEIGHTS,
        PRIOR_PERCENTILES,
        TABLE_KERNELS,
        TABLE_MODES,
        calibrated_squash,
    )

    scores = meta.scores
    assert scores["default"] == "residual"
    assert scores["fused"]["weight"] in FUSED_WEIGHTS and len(scores["fused"]["auprc"]) == len(FUSED_WEIGHTS)
    assert scores["prior"]["percentile"] in PRIOR_PERCENTILES and 0 < scores["prior"]["threshold"] < 1
    best = max(scores["fused"]["auprc"].values())
    assert scores["fused"]["auprc"][f"{scores['fused']['weight']:g}"] == best
    assert len(scores["table"]) == 3 * len(TABLE_KERNELS) * len(TABLE_MODES)
    chosen = scores["percentiles"]
    assert set(chosen) == {"residual", "fused", "prior"}
    for name, percentile in chosen.items():
        dice = scores["percentiles_chosen_by"]["dice"][name]
        assert set(dice) == {"p99", "p99.5", "p99.9"} and dice[f"p{percentile:g}"] == max(dice.values())
    key = f"p{chosen['residual']:g}"
    assert meta.calibration["default"] == meta.calibration[key]
    assert calibrated_squash(meta, "residual", 5, "2d") == pytest.approx(meta.calibration[key])
    # per-volume normalisation: the settings are stored, not one volume's window
    assert meta.preprocessing["normalisation"] == "per_volume"
    assert meta.preprocessing["upper_percentile"] == 99.5 and "low" not in meta.preprocessing
    assert meta.training["epochs"] == EPOCHS and 1 <= meta.training["best_epoch"] <= EPOCHS
    assert meta.training["train_volumes"] == 3 and meta.training["val_volumes"] == 1
    assert meta.training["data"] == "synthetic volumes only"
    log_dir = trained.with_name("model_train")
    rows = (log_dir / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == EPOCHS + 1
    assert (log_dir / "args.yaml").is_file()
    assert train_mod.resume_path_for(trained).is_file()
    # the shipped weights are the best validation epoch's
    losses = [float(r.split(",")[rows[0].split(",").index("val_loss")]) for r in rows[1:]]
    assert meta.training["best_val_loss"] == pytest.approx(min(losses))
    assert meta.training["best_epoch"] == int(np.argmin(losses)) + 1


def test_trained_beats_untrained(dataset: Path, trained: Path, tmp_path: Path):
    from napari_tae.checkpoint import read_metadata, save_checkpoint
    from napari_tae.models import build_model

    meta = read_metadata(trained)
    torch.manual_seed(1)
    untrained = tmp_path / "untrained.safetensors"
    save_checkpoint(untrained, build_model(meta.model_name, **meta.config), preprocessing=meta.preprocessing)
    res_t = _evaluate(dataset, trained, tmp_path / "trained.json", "--out-md", str(tmp_path / "t.md"))
    res_u = _evaluate(dataset, untrained, tmp_path / "untrained.json")
    assert res_t["brain"]["auprc"] > 2 * res_u["brain"]["auprc"], (res_t["brain"], res_u["brain"])
    assert res_t["brain"]["auroc"] > res_u["brain"]["auroc"], (res_t["brain"], res_u["brain"])
    assert res_t["ssim"]["healthy_volumes"] > res_u["ssim"]["healthy_volumes"]
    # report structure: upper bound labelled, calibrated threshold from the checkpoint
    assert res_t["calibrated"]["source"] == "calibrated"
    assert res_t["calibrated"]["squash_percent"] == pytest.approx(meta.calibration["default"])
    assert res_u["calibrated"]["source"] == "per-scan robust"  # no calibration stored
    assert "upper bound" in res_t["dsc_upper_bound"]["note"]
    assert 0 <= res_t["calibrated"]["fpr_healthy"] <= 1
    assert len(res_t["per_volume"]) == 2
    assert "| AUPRC (brain voxels, pooled) |" in (tmp_path / "t.md").read_text()


def test_evaluate_matches_sklearn_on_intensity(dataset: Path, tmp_path: Path):
    """The streaming numbers equal exact ones computed from all voxels at once."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from napari_tae.io import load_volume
    from napari_tae.postprocess import median_filtered
    from napari_tae.preprocess import prepare_volume

    out = tmp_path / "int.json"
    rc = cli(["evaluate", "--model", "intensity", "--images", str(dataset / "test" / "images"),
              "--labels", str(dataset / "test" / "labels"), "--masks", str(dataset / "test" / "masks"),
              "--out-json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    scores, labels = [], []
    for case in sorted((dataset / "test" / "images").iterdir()):
        data = load_volume(case).data
        brain = load_volume(dataset / "test" / "masks" / case.name).data > 0
        label = load_volume(dataset / "test" / "labels" / case.name).data > 0
        prepared = prepare_volume(data, size=256, mask=brain)
        score = median_filtered(prepared.normalised, 5)  # intensity model: residual = normalised FLAIR
        scores.append(score[brain])
        labels.append(label[brain])
    s, y = np.concatenate(scores), np.concatenate(labels)
    assert res["brain"]["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert res["brain"]["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-3)
    # the curve for plots: from everything predicted (precision = prevalence) to the (1, 0) end
    curve = res["brain"]["pr_curve"]
    assert 2 < len(curve["recall"]) == len(curve["precision"]) <= 400
    assert (curve["recall"][0], curve["recall"][-1], curve["precision"][-1]) == (1.0, 0.0, 1.0)
    assert curve["precision"][0] == pytest.approx(y.mean(), abs=1e-12)


def test_resume_gives_uninterrupted_result(dataset: Path, tmp_path: Path, monkeypatch):
    reference, out = tmp_path / "reference.safetensors", tmp_path / "resumed.safetensors"
    assert cli(_train_argv(dataset, reference, *SHORT)) == 0
    real = train_mod.train_one_epoch

    def interrupted(*args, epoch: int, **kwargs):
        if epoch == 1:  # after epoch 1's state was saved
            raise KeyboardInterrupt
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", interrupted)
    assert cli(_train_argv(dataset, out, *SHORT)) == 130
    assert not out.exists() and train_mod.resume_path_for(out).is_file()
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    assert cli(_train_argv(dataset, out, *SHORT, "--resume")) == 0

    a, b = load_file(str(reference)), load_file(str(out))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from napari_tae.checkpoint import read_metadata

    assert read_metadata(out).calibration == read_metadata(reference).calibration
    rows = (tmp_path / "resumed_train" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4


def test_resume_extends_a_run_but_refuses_another_noise(dataset: Path, tmp_path: Path, capsys):
    from napari_tae.checkpoint import read_metadata

    out = tmp_path / "dae.safetensors"
    assert cli(_train_argv(dataset, out, *SHORT, "--input-noise", "0.2")) == 0
    more = [*SHORT, "--epochs", "4", "--input-noise", "0.2", "--resume", "--overwrite"]
    with pytest.raises(SystemExit) as exc:
        cli(_train_argv(dataset, out, *more, "--noise-blobs", "0.3"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "state was trained with input noise" in err and "blobs" in err, err
    assert read_metadata(out).training["epochs"] == 3  # the refused run wrote nothing
    assert cli(_train_argv(dataset, out, *more)) == 0
    assert read_metadata(out).training["epochs"] == 4


def test_nan_loss_stops_clearly(dataset: Path, tmp_path: Path, caplog):
    out = tmp_path / "nan.safetensors"
    argv = _train_argv(dataset, out, *SHORT)
    argv[argv.index("--lr") + 1] = "inf"
    argv[argv.index("--log-interval") + 1] = "1"
    with caplog.at_level(logging.ERROR, logger="training.train"):
        assert cli(argv) == 1
    assert "training loss became nan" in caplog.text and "lower --lr" in caplog.text
    assert not out.exists()


# ------------------------------------------------------------------------------- bad input


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a NIfTI file")
    return path


@pytest.mark.parametrize("case", ["empty_folder", "glob_nothing", "unreadable", "one_volume",
                                  "out_exists", "unknown_model", "bad_set", "resume_missing",
                                  "negative_noise", "zero_noise_res", "negative_blobs"])
def test_train_bad_input_exits_2_with_one_line(case: str, dataset: Path, tmp_path: Path, capsys):
    out = tmp_path / "m.safetensors"
    data = [str(dataset / "train")]
    extra: list[str] = []
    model = MODEL
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data, expect = [str(tmp_path / "empty")], "folder holds no NIfTI"
    elif case == "glob_nothing":
        data, expect = [str(tmp_path / "nowhere" / "*.nii.gz")], "no such file"
    elif case == "unreadable":
        bad = tmp_path / "vols"
        bad.mkdir()
        for p in sorted((dataset / "train").iterdir())[:2]:
            (bad / p.name).symlink_to(p)
        _garbage(bad / "broken.nii.gz")
        data, expect = [str(bad)], "broken.nii.gz"
    elif case == "one_volume":
        data, expect = [str(sorted((dataset / "train").iterdir())[0])], "too few volumes"
    elif case == "out_exists":
        out.write_bytes(b"")
        expect = "exists; pass --overwrite"
    elif case == "unknown_model":
        model, expect = ["--model", "no_such_model"], "unknown"
    elif case == "bad_set":
        extra, expect = ["--set", "no_such_option=3"], "no_such_option"
    elif case == "negative_noise":
        extra, expect = ["--input-noise", "-0.1"], "--input-noise must be"
    elif case == "negative_blobs":
        extra, expect = ["--noise-blobs", "-0.3"], "--noise-blobs must be"
    elif case == "zero_noise_res":
        extra, expect = ["--input-noise", "0.2", "--noise-res", "0"], "--noise-res must be >= 1"
    else:
        extra, expect = ["--resume"], "no such resume state"
    argv = ["train", "--data", *data, *model, *OPTIM, "--out", str(out), *extra]
    if case == "one_volume":
        argv += ["--val-fraction", "0.5"]
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m training train: error:") and expect in err[0], err
    if case != "out_exists":
        assert not out.exists()


def test_evaluate_mismatched_names_exit_2(dataset: Path, tmp_path: Path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    first = sorted((dataset / "test" / "labels").iterdir())[0]
    (labels / first.name).symlink_to(first)
    (labels / "stranger.nii.gz").symlink_to(first)
    with pytest.raises(SystemExit) as exc:
        cli(["evaluate", "--model", "intensity", "--images", str(dataset / "test" / "images"),
             "--labels", str(labels)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "case_001" in err and "stranger.nii.gz" in err and len(err.splitlines()) == 1


def test_evaluate_refuses_trainable_model_without_checkpoint(dataset: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["evaluate", "--model", "ae_spatial", "--images", str(dataset / "test" / "images"),
             "--labels", str(dataset / "test" / "labels")])
    assert exc.value.code == 2 and "--checkpoint" in capsys.readouterr().err


def test_evaluate_unusable_precision_is_one_line_before_any_volume(dataset: Path, capsys, monkeypatch):
    from napari_tae import inference

    monkeypatch.setattr(inference, "select_device", lambda _name: torch.device("mps"))
    with pytest.raises(SystemExit) as exc:
        cli(["evaluate", "--model", "intensity", "--images", str(dataset / "test" / "images"),
             "--labels", str(dataset / "test" / "labels"), "--precision", "bfloat16"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "--precision bfloat16: bfloat16 runs on CUDA or the CPU, not on mps" in err


# ------------------------------------------------------------------------------- units


def test_pair_by_name_role_words_and_errors(tmp_path: Path):
    imgs = [tmp_path / "sub1_flair.nii.gz", tmp_path / "sub2_flair.nii.gz"]
    labs = [tmp_path / "sub2_seg.nii.gz", tmp_path / "sub1_seg.nii.gz"]
    assert pair_by_name(imgs, labs) == [labs[1], labs[0]]
    with pytest.raises(InputError, match="sub2_flair"):
        pair_by_name(imgs, labs[1:])
    assert pair_by_name(imgs, labs[1:], allow_missing=True) == [labs[1], None]


def test_split_is_by_volume_and_seeded():
    paths = [Path(f"v{i}.nii.gz") for i in range(10)]
    train, val = split_by_volume(paths, 0.2, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(paths)
    assert split_by_volume(paths, 0.2, seed=3) == (train, val)
    with pytest.raises(InputError, match="too few volumes"):
        split_by_volume(paths[:1], 0.2, seed=0)


def test_amp_is_a_no_op_off_cuda():
    ctx, scaler = train_mod.amp_setup(torch.device("cpu"), "auto")
    assert scaler is None
    with ctx:
        assert not torch.is_autocast_enabled("cpu")


def test_lesion_slices_are_excluded(dataset: Path, tmp_path: Path):
    from training.data import load_slices

    images = sorted((dataset / "test" / "images").iterdir())
    labels = sorted((dataset / "test" / "labels").iterdir())
    full = load_slices(images, 64, min_brain_fraction=0.3)
    kept = load_slices(images, 64, min_brain_fraction=0.3, lesion_masks=labels)
    excluded = sum(v.excluded_lesion for v in kept.volumes)
    assert excluded > 0 and len(kept) == len(full) - excluded
    assert kept.slices.dtype == torch.float16 and float(kept.slices.max()) <= 1.0


def test_empty_lesion_mask_excludes_nothing(dataset: Path, tmp_path: Path):
    import nibabel as nib

    from training.data import load_slices

    image = sorted((dataset / "test" / "images").iterdir())[0]
    img = nib.load(image)
    empty = tmp_path / image.name
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), empty)
    kept = load_slices([image], 64, min_brain_fraction=0.3, lesion_masks=[empty])
    assert sum(v.excluded_lesion for v in kept.volumes) == 0
    assert len(kept) == len(load_slices([image], 64, min_brain_fraction=0.3))


# ------------------------------------------------------------------------------- denoising


def test_coarse_noise_is_smooth_brain_only_and_of_the_asked_std():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 64, 64)
    x[:, :, 8:56, 8:56] = 0.5  # "brain"
    noise = train_mod.coarse_noise(x, 0.2, 16) - x
    assert torch.all(noise[x == 0] == 0)
    inside = noise[:, :, 8:56, 8:56]
    # bilinear upsampling of unit-variance cells keeps most of the variance (not 0.2 / 4)
    assert 0.12 < inside.std().item() < 0.2
    # coarse: neighbouring pixels are strongly correlated, pixels a noise cell apart much less
    a = inside[..., :-1].flatten()
    near = torch.corrcoef(torch.stack([a, inside[..., 1:].flatten()]))[0, 1].item()
    far = torch.corrcoef(torch.stack([inside[..., :-8].flatten(), inside[..., 8:].flatten()]))[0, 1].item()
    assert near > 0.9 and far < 0.3, (near, far)


def test_noise_blobs_are_sharp_edged_brain_only_pieces_on_top_of_the_same_smooth_noise():
    x = torch.zeros(64, 1, 64, 64)
    x[:, :, 8:56, 8:56] = 0.5
    smooth = train_mod.coarse_noise(x, 0.2, 16, torch.Generator().manual_seed(0)) - x
    # blob_std 0 is the smooth noise alone, draw for draw
    no_blobs = train_mod.coarse_noise(x, 0.2, 16, torch.Generator().manual_seed(0), blob_std=0.0)
    assert torch.equal(no_blobs - x, smooth)
    # no noise at all: the slice itself, and the generator untouched (plain autoencoder runs)
    generator = torch.Generator().manual_seed(0)
    assert train_mod.coarse_noise(x, 0.0, 16, generator, blob_std=0.0) is x
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    blobs = train_mod.coarse_noise(x, 0.2, 16, torch.Generator().manual_seed(0), blob_std=0.4) - x - smooth
    assert torch.all(blobs[x == 0] == 0)
    # a field bilinearly upsampled from unit-variance cells exceeds 1.2 on a few per cent of pixels
    covered = (blobs != 0).float()[:, :, 8:56, 8:56].mean().item()
    assert 0.01 < covered < 0.1, covered
    # sharp: a blob's edge jumps by far more than the smooth noise between neighbouring pixels
    def max_jump(field):
        return field[:, :, 8:56, 9:56].sub(field[:, :, 8:56, 8:55]).abs().max().item()
    assert max_jump(blobs) > 3 * max_jump(smooth), (max_jump(blobs), max_jump(smooth))
    assert 0.1 < blobs[blobs != 0].abs().mean().item() < 0.4


class _Identity(torch.nn.Module):
    """Returns its input: the loss is then exactly how far the input is from the clean slice."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale

    def forward_train(self, x):
        return self(x), {}


@pytest.mark.parametrize("std, blobs", [(0.0, 0.0), (0.2, 0.0), (0.0, 0.4)])
def test_denoising_loss_compares_with_the_clean_slice(std: float, blobs: float):
    from training.data import SliceDataset

    slices = torch.zeros(8, 32, 32, dtype=torch.float16)
    slices[:, 4:28, 4:28] = 0.5
    model = _Identity()
    torch.manual_seed(0)
    noise = train_mod.NoiseConfig(std, 8, blobs)
    runtime = train_mod.Runtime.single("cpu")
    metrics = train_mod.train_one_epoch(
        train_mod._TrainForward(model), SliceDataset(slices), optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        batch_size=4, epoch=0, runtime=runtime, noise=noise)
    val = [train_mod.validate(model, SliceDataset(slices), batch_size=4, runtime=runtime, noise=noise,
                              seed=seed)["val_loss"]
           for seed in (0, 0, 1)]
    if std == blobs == 0:
        assert metrics["train_loss"] == 0.0 and val == [0.0, 0.0, 0.0]
        return
    # mean |noise| over the image: brain fraction 0.56 x E|N(0, ~0.16)| ~ 0.07; blobs alone cover
    # a few per cent of the brain with offsets of ~0.2: ~0.005
    low, high = (0.03, 0.12) if std else (0.0005, 0.03)
    assert low < metrics["train_loss"] < high, metrics
    # validation denoises the same seeded draw every epoch (comparable across epochs)
    assert low < val[0] < high and val[0] == val[1] != val[2], val


def test_cosine_schedule_by_hand():
    lrs = [train_mod.epoch_lr(1e-3, e, 4, "cosine") for e in range(4)]
    # 0.5 * (1 + cos(pi * e / 4)) = 1, 0.854, 0.5, 0.146
    assert lrs == pytest.approx([1e-3, 0.853553e-3, 0.5e-3, 0.146447e-3], rel=1e-5)
    assert [train_mod.epoch_lr(1e-3, e, 4) for e in range(4)] == [1e-3] * 4


@pytest.mark.parametrize("blobs", [0.0, 0.3])
def test_denoising_and_schedule_are_used_and_recorded(blobs: float, dataset: Path, tmp_path: Path):
    import csv

    from napari_tae.checkpoint import read_metadata

    out = tmp_path / "dae.safetensors"
    assert cli(_train_argv(dataset, out, *SHORT, "--input-noise", "0.2", "--noise-res", "8",
                           "--sched", "cosine", "--noise-blobs", str(blobs))) == 0
    training = read_metadata(out).training
    expected = {"kind": "coarse_gaussian", "std": 0.2, "res": 8}
    if blobs:
        expected["blobs"] = {"std": blobs, "level": train_mod.BLOB_LEVEL,
                             "offset_res": train_mod.BLOB_OFFSET_RES}
    assert training["input_noise"] == expected
    assert training["lr_schedule"] == "cosine"
    with open(tmp_path / "dae_train" / "metrics.csv") as fh:
        lrs = [float(row["lr"]) for row in csv.DictReader(fh)]
    assert lrs == pytest.approx([train_mod.epoch_lr(2e-3, e, 3, "cosine") for e in range(3)])
