"""Quality of the model zoo: every registry model trained with one small common budget on one
synthetic dataset and evaluated beside the intensity baseline, with a results table and figures.

Not a unit test, and long: hours on a CPU for the whole zoo (``--device cuda`` on a GPU). One run:

1. data: ``python -m training synth`` (domain-randomised, seeded: healthy train/val volumes, a test
   split taking every anomaly kind in turn, healthy test volumes) into ``OUT/data``, or ``--data``;
2. training: every registry model but ``intensity``, ``python -m training train`` with one budget
   for all (``--img-size``, ``--epochs``, ``--batch-size``, ``--lr``, ``--sched``, ``--seed``; the
   training's default pixel size, no ``--mm-per-px``) into ``OUT/checkpoints/<model>.safetensors``.
   A model whose checkpoint exists is skipped and one with a resume state continued, so the same
   command resumes a killed run. A paper config is changed (``--override``) only where it cannot
   run at ``--img-size``;
3. evaluation: each checkpoint and ``intensity`` (its bundled calibration,
   ``napari_tae/checkpoints/intensity.json``) through ``python -m training evaluate --out-json``,
   with the residual, the fused (FLAIR + w x residual, the bundled default's) and the prior
   score, on the synthetic test split (per anomaly kind, with the healthy test volumes) and on the
   real case ``mslub_patient07`` when present;
4. ``OUT/results.json``, ``OUT/results.md`` (model x split x score, per anomaly kind, commands)
   and small PNGs in ``--figures``: precision-recall curves per split and score, and input /
   reconstruction / residual / mask / ground truth of test slices for every model
   (:func:`napari_tae.inference.segment` with the CLI's defaults).

Run: ``python benchmarks/bench_zoo.py --out zoo_run --device cuda``. ``--quick`` (2 models, 32 px,
1 epoch, tiny volumes, figures in ``OUT/figures``) checks the whole path in minutes on one core.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bench_quality import KERNEL, MODE, REAL

from napari_tae.io import error_line, nifti_stem
from napari_tae.synthetic import KIND_LABELS, KINDS

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "intensity"
SCORES_COMPARED = ("residual", "fused", "prior")
SPLITS = ("synthetic", "real")
REAL_NAME = REAL.name
PANELS = ("input", "reconstruction", "residual", "mask", "ground truth")
FIGURE_BYTES = 200_000
#: Settings that differ between a full run and ``--quick``; the command line overrides either.
FULL = {"models": None, "img_size": 128, "epochs": 20, "n_train": 20, "n_val": 4, "n_test_per_kind": 2,
        "n_test_healthy": 2, "shape": None, "out": Path("zoo_run"), "figures": ROOT / "docs" / "img"}
QUICK = {"models": ["b_tae", "ae_spatial"], "img_size": 32, "epochs": 1, "n_train": 2, "n_val": 1,
         "n_test_per_kind": 1, "n_test_healthy": 1, "shape": [48, 56, 48], "out": Path("zoo_quick"),
         "figures": None}


def zoo_models() -> list[str]:
    """Every registry model with weights to train (all but the intensity baseline)."""
    from napari_tae.models import list_models

    return [name for name in list_models() if name != BASELINE]


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: b_tae and ae_spatial, 32 px, 1 epoch, 2 training volumes, "
                             "48 x 56 x 48 grids, output in zoo_quick/ (figures in zoo_quick/figures)")
    parser.add_argument("--out", type=Path, help="output folder (default zoo_run; zoo_quick with --quick)")
    parser.add_argument("--data", type=Path,
                        help="reuse this dataset of 'python -m training synth' (default: written to OUT/data)")
    parser.add_argument("--figures", type=Path, help="PNG folder (default docs/img; OUT/figures with --quick)")
    parser.add_argument("--models", nargs="+", choices=zoo_models(), help="default: the whole zoo")
    parser.add_argument("--device", default="auto", help="training, evaluation and figures (default auto)")
    budget = parser.add_argument_group("training budget, the same for every model")
    budget.add_argument("--img-size", type=int, help="slice size (default 128; 32 with --quick)")
    budget.add_argument("--epochs", type=int, help="default 20; 1 with --quick")
    budget.add_argument("--batch-size", type=int, default=12)
    budget.add_argument("--lr", type=float, default=1e-4,
                        help="default 1e-4 (the paper's 1e-5 hardly moves a model in a few epochs)")
    budget.add_argument("--sched", choices=("constant", "cosine"), default="constant")
    budget.add_argument("--seed", type=int, default=0, help="training seed")
    budget.add_argument("--override", action="append", default=[], metavar="MODEL:KEY=VALUE",
                        help="config override for one model, allowed only where its paper config "
                             "cannot run at --img-size (repeatable), e.g. h_tae:patch_size=2")
    data = parser.add_argument_group("synthetic dataset (when --data is not given)")
    data.add_argument("--n-train", type=int, help="healthy training volumes (default 20; 2 with --quick)")
    data.add_argument("--n-val", type=int, help="healthy validation volumes (default 4; 1 with --quick)")
    data.add_argument("--n-test-per-kind", type=int,
                      help=f"test volumes per anomaly kind ({', '.join(KINDS)}; default 2; 1 with --quick)")
    data.add_argument("--n-test-healthy", type=int, help="healthy test volumes (default 2; 1 with --quick)")
    data.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                      help="grid shape (default: the generator's realistic 1-1.3 mm grid; 48 56 48 with --quick)")
    data.add_argument("--data-seed", type=int, default=2027, help="seed of the dataset (default 2027)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.figures is None:
        args.figures = args.out / "figures"
    args.models = args.models or zoo_models()
    args.out, args.figures = args.out.absolute(), args.figures.absolute()
    args.data = args.data.absolute() if args.data else None
    return args


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``MODEL:KEY=VALUE`` items as ``{model: {key: value}}`` (values as given, YAML to the trainer)."""
    overrides: dict[str, dict[str, str]] = {}
    for item in items:
        model, _, setting = item.partition(":")
        key, sep, value = setting.partition("=")
        if not (model and key and sep):
            raise ValueError(f"--override {item!r}: expected MODEL:KEY=VALUE")
        overrides.setdefault(model, {})[key.replace("-", "_")] = value
    return overrides


def config_error(name: str, img_size: int, overrides: dict[str, str]) -> str | None:
    """Why model ``name`` (paper config plus ``overrides``) cannot run at ``img_size``, or None.

    Built and run on the meta device: shapes only, no memory or compute.
    """
    import torch
    import yaml

    from napari_tae.models import build_model

    settings = {key: yaml.safe_load(value) for key, value in overrides.items()}
    try:
        with torch.device("meta"):
            build_model(name, **{"img_size": img_size, **settings})(torch.zeros(1, 1, img_size, img_size))
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:
        return error_line(exc)
    return None


def resolve_overrides(models: list[str], img_size: int,
                      given: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The per-model overrides of one common budget: only for models whose paper config cannot run
    at ``img_size``, and such a model must have one it runs with (ValueError listing every problem)."""
    problems = [f"{name}: not among the models trained ({', '.join(models)})" for name in given
                if name not in models]
    for name in models:
        paper_error, extra = config_error(name, img_size, {}), given.get(name, {})
        if paper_error is None and extra:
            problems.append(f"{name}: its paper config runs at {img_size} px; the common budget takes "
                            f"no override ({extra})")
        elif paper_error is not None and not extra:
            problems.append(f"{name}: {paper_error}; give --override {name}:KEY=VALUE")
        elif paper_error is not None and (error := config_error(name, img_size, extra)) is not None:
            problems.append(f"{name} with {extra}: {error}")
    if problems:
        raise ValueError("\n".join(problems))
    return {name: given[name] for name in models if name in given}


# --------------------------------------------------------------------------------------------
# subprocesses


class Runner:
    """Runs the ``python -m training`` commands, each logged to its own file, and keeps them all
    (skipped ones too) so that results.md and commands.sh give the exact commands of the run."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.commands: list[str] = []
        # the subprocesses import this checkout's packages, wherever it is installed from
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    def note(self, text: str) -> None:
        self.commands.append(f"# {text}")
        print(f"  {text}", flush=True)

    def skip(self, cmd: list[str], why: str) -> None:
        self.note(f"skipped ({why}): {shlex.join(cmd)}")

    def __call__(self, cmd: list[str], log_name: str) -> tuple[int, float]:
        """Exit status and wall seconds; on a failure the log's last lines are printed."""
        line = shlex.join(cmd)
        self.commands.append(line)
        print(f"$ {line}", flush=True)
        log = self.logs / f"{log_name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        seconds = time.perf_counter() - t0
        if rc:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"  FAILED (exit {rc}, {seconds:.0f} s); last lines of {log}:", *tail, sep="\n    ")
        else:
            print(f"  done in {seconds:.1f} s (log {log})", flush=True)
        return rc, seconds


def python_m_training(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "training", *map(str, args)]


# --------------------------------------------------------------------------------------------
# 1. data


def synth_command(args: argparse.Namespace, folder: Path) -> list[str]:
    cmd = python_m_training("synth", "--out", folder, "--n-train", args.n_train, "--n-val", args.n_val,
                            "--n-test", args.n_test_per_kind * len(KINDS), "--n-test-healthy",
                            args.n_test_healthy, "--seed", args.data_seed)
    return cmd + (["--shape", *map(str, args.shape)] if args.shape else [])


def dataset(args: argparse.Namespace, run: Runner) -> tuple[Path, dict[str, Any]]:
    """The dataset folder and its manifest: --data as it is, else OUT/data, written when missing and
    reused when it holds the dataset these settings ask for."""
    folder = args.data or args.out / "data"
    manifest_path = folder / "manifest.json"
    cmd = synth_command(args, folder)
    if args.data is not None:
        if not manifest_path.is_file():
            raise SystemExit(f"--data {folder}: no manifest.json, not a dataset of python -m training synth")
        run.note(f"dataset given: --data {folder}")
    elif manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        have = (manifest["seed"], len(manifest["train"]), len(manifest["val"]), len(manifest["test"]),
                len(manifest["test_healthy"]))
        want = (args.data_seed, args.n_train, args.n_val, args.n_test_per_kind * len(KINDS), args.n_test_healthy)
        if have != want:
            raise SystemExit(f"{folder} holds another dataset (seed, train, val, test, healthy test: {have}, "
                             f"asked {want}): use another --out, or --data {folder} to take it as it is")
        run.skip(cmd, "dataset exists")
    elif run(cmd, "synth")[0]:
        raise SystemExit("the synthetic dataset could not be written")
    return folder, json.loads(manifest_path.read_text())


def case_kinds(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Anomaly kinds of each test case, by volume name (as evaluate's per-volume entries name them)."""
    return {nifti_stem(Path(case["image"])): list(case["anomaly_kinds"]) for case in manifest["test"]}


# --------------------------------------------------------------------------------------------
# 2. training


def train_command(name: str, args: argparse.Namespace, data: Path, checkpoint: Path,
                  overrides: dict[str, str], resume: bool) -> list[str]:
    cmd = python_m_training(
        "train", "--data", data / "train", "--val-data", data / "val", "--model", name,
        "--img-size", args.img_size, "--epochs", args.epochs, "--batch-size", args.batch_size,
        "--lr", args.lr, "--sched", args.sched, "--seed", args.seed, "--device", args.device,
        "--data-note", "synthetic volumes only (benchmarks/bench_zoo.py)", "--out", checkpoint)
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + (["--resume"] if resume else [])


def budget_mismatch(meta, args: argparse.Namespace) -> list[str]:
    """How an existing checkpoint's training differs from this run's budget (empty: it matches)."""
    training = meta.training or {}
    have = {"img_size": meta.img_size, "epochs": training.get("epochs"), "batch_size": training.get("batch_size"),
            "lr": training.get("lr"), "sched": training.get("lr_schedule"), "seed": training.get("seed")}
    return [f"{key} {value} (asked {getattr(args, key)})" for key, value in have.items()
            if value != getattr(args, key)]


def train_all(args: argparse.Namespace, data: Path, overrides: dict[str, dict[str, str]],
              run: Runner) -> dict[str, dict[str, Any]]:
    """Train (or reuse) every model; per model: status, wall time, parameters, training summary."""
    from napari_tae.checkpoint import load_checkpoint, read_metadata
    from napari_tae.models import count_parameters
    from training.train import resume_path_for

    folder = args.out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    # a checkpoint of another budget would break the comparison: refuse before training anything
    stale = [f"{path}: {', '.join(mismatch)}" for path in (folder / f"{n}.safetensors" for n in args.models)
             if path.is_file() and (mismatch := budget_mismatch(read_metadata(path), args))]
    if stale:
        raise SystemExit("checkpoints trained with another budget (remove them or use another --out):\n  "
                         + "\n  ".join(stale))
    records: dict[str, dict[str, Any]] = {}
    for name in args.models:
        checkpoint = folder / f"{name}.safetensors"
        sidecar = folder / f"{name}.bench.json"  # this script's record of the run that wrote it
        resume = resume_path_for(checkpoint).is_file()
        cmd = train_command(name, args, data, checkpoint, overrides.get(name, {}), resume)
        record = {"checkpoint": checkpoint, "overrides": overrides.get(name, {})}
        if checkpoint.is_file():
            run.skip(cmd, "checkpoint exists")
            record.update(json.loads(sidecar.read_text()) if sidecar.is_file() else {"seconds": None},
                          status="reused")
        else:
            rc, seconds = run(cmd, f"train_{name}")
            if rc:
                records[name] = {**record, "status": "failed", "log": args.out / "logs" / f"train_{name}.log"}
                continue
            record.update(seconds=seconds, resumed=resume, status="trained")
            sidecar.write_text(json.dumps({"seconds": seconds, "resumed": resume}) + "\n")
        model, meta = load_checkpoint(checkpoint)
        training = meta.training or {}
        record.update(parameters=count_parameters(model), config=meta.config, epochs=training.get("epochs"),
                      best_epoch=training.get("best_epoch"), best_val_loss=training.get("best_val_loss"),
                      train_slices=training.get("train_slices"))
        records[name] = record
    return records


# --------------------------------------------------------------------------------------------
# 3. evaluation


@dataclass
class Detector:
    name: str
    checkpoint: Path | None  # None: the intensity baseline
    scores: tuple[str, ...]

    @property
    def spec(self) -> str:
        """What :func:`napari_tae.checkpoint.load_model` takes."""
        return BASELINE if self.checkpoint is None else str(self.checkpoint)

    @property
    def source_file(self) -> Path:
        """The file whose change makes an evaluation stale (the intensity baseline's calibration)."""
        from napari_tae.checkpoint import INTENSITY_METADATA

        return INTENSITY_METADATA if self.checkpoint is None else self.checkpoint


def detectors(training: dict[str, dict[str, Any]]) -> list[Detector]:
    """The trained models and the intensity baseline, each with the compared scores it offers."""
    from napari_tae.checkpoint import intensity_metadata, read_metadata
    from napari_tae.scores import available_scores

    found = []
    for name, checkpoint in [*((n, r["checkpoint"]) for n, r in training.items() if r["status"] != "failed"),
                             (BASELINE, None)]:
        offered = available_scores(intensity_metadata() if checkpoint is None else read_metadata(checkpoint))
        missing = [s for s in SCORES_COMPARED if s not in offered]
        if missing:  # the baseline's: its residual is the FLAIR itself, which fused and prior would rank alike
            print(f"  {name}: no {', '.join(missing)} score (offers {', '.join(offered)})")
        found.append(Detector(name, checkpoint, tuple(s for s in SCORES_COMPARED if s in offered)))
    return found


def split_arguments(data: Path, out: Path) -> dict[str, list[str]]:
    """evaluate's data options per split; the real case is linked under one name for its pairing."""
    test = data / "test"
    synthetic = ["--images", test / "images", "--labels", test / "labels", "--masks", test / "masks",
                 "--kinds", test / "kinds"]
    if (test / "healthy").is_dir() and any((test / "healthy").glob("*.nii*")):
        synthetic += ["--healthy", test / "healthy"]
    splits = {"synthetic": [str(a) for a in synthetic]}
    image, label = REAL / "FLAIR.nii.gz", REAL / "lesion_mask.nii.gz"
    if not (image.is_file() and label.is_file()):
        print(f"real case skipped: {image} or {label} absent")
        return splits
    for kind, source in (("images", image), ("labels", label)):
        link = out / "real" / kind / f"{REAL_NAME}.nii.gz"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(source)
    splits["real"] = ["--images", str(out / "real" / "images"), "--labels", str(out / "real" / "labels")]
    return splits


def evaluate_command(detector: Detector, split_args: list[str], score: str, device: str,
                     out_json: Path) -> list[str]:
    which = ["--model", BASELINE] if detector.checkpoint is None else ["--checkpoint", detector.checkpoint]
    return python_m_training("evaluate", *which, *split_args, "--score", score, "--median-kernel", KERNEL,
                             "--median-mode", MODE, "--device", device, "--out-json", out_json)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def summarise(result: dict[str, Any], kinds_of_case: dict[str, list[str]]) -> dict[str, Any]:
    """The figures compared from one evaluate JSON: overall, and per anomaly kind (the label-free
    Dice of a kind: mean over the test volumes holding that kind only)."""
    from training.metrics import mean_std

    brain, dsc, calibrated, ssim = (result[k] for k in ("brain", "dsc_upper_bound", "calibrated", "ssim"))
    voxels = brain["positives"] + brain["negatives"]
    overall = {
        "auroc": _number(brain["auroc"]), "auprc": _number(brain["auprc"]), "dsc": _number(dsc["dice"]),
        "label_free_dice": _number(calibrated["dice_pooled"]),
        "squash_percent": _number(calibrated["squash_percent"]), "squash_source": calibrated["source"],
        "fpr_healthy": _number(calibrated["fpr_healthy"]),
        "fpr_lesion_free_brain": _number(calibrated["fpr_test_lesion_free_brain"]),
        "ssim_healthy": _number(ssim["healthy_volumes"]),
        "prevalence": brain["positives"] / voxels if voxels else float("nan"),
    }
    per_kind = {}
    for kind, entry in (result.get("per_kind") or {}).items():
        dices = [_number(v["dice_calibrated"]) for v in result["per_volume"] if kinds_of_case.get(v["name"]) == [kind]]
        per_kind[kind] = {"auroc": _number(entry["auroc"]), "auprc": _number(entry["auprc"]),
                          "dsc": _number(entry["dsc_upper_bound"]), "label_free_dice": mean_std(dices)[0],
                          "volumes": len(dices)}
    paper = result["paper_compatible"]
    paper_variants = {"auroc_all_pixels": _number(paper["auroc_all_pixels"]),
                      "auprc_all_pixels": _number(paper["auprc_all_pixels"]),
                      "slice_dice_smoothed_s1": _number(paper["slice_dice_smoothed_s1"])}
    return {"overall": overall, "per_kind": per_kind, "paper": paper_variants, "pr_curve": brain.get("pr_curve")}


def evaluate_all(args: argparse.Namespace, found: list[Detector], splits: dict[str, list[str]],
                 manifest_path: Path, kinds_of_case: dict[str, list[str]], run: Runner) -> list[dict[str, Any]]:
    """Every detector x split x score; an evaluation newer than its detector and data is reused."""
    folder = args.out / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    evaluations = []
    for detector in found:
        for split, split_args in splits.items():
            data_file = manifest_path if split == "synthetic" else REAL / "FLAIR.nii.gz"
            for score in detector.scores:
                out_json = folder / f"{detector.name}_{split}_{score}.json"
                cmd = evaluate_command(detector, split_args, score, args.device, out_json)
                newest_input = max(detector.source_file.stat().st_mtime, data_file.stat().st_mtime)
                if out_json.is_file() and out_json.stat().st_mtime > newest_input:
                    run.skip(cmd, "evaluation exists")
                elif run(cmd, f"eval_{detector.name}_{split}_{score}")[0]:
                    evaluations.append({"model": detector.name, "split": split, "score": score, "status": "failed"})
                    continue
                result = json.loads(out_json.read_text())
                evaluations.append({"model": detector.name, "split": split, "score": score, "status": "done",
                                    "json": out_json, "seconds": result.get("seconds"),
                                    **summarise(result, kinds_of_case if split == "synthetic" else {})})
    return evaluations


# --------------------------------------------------------------------------------------------
# 4. tables


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f} %"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.0f} s"


def format_tables(results: dict[str, Any]) -> str:
    """results.md: training, quality per split (model x score), per anomaly kind, commands."""
    s = results["settings"]
    lines = ["# Model zoo on synthetic data", "",
             (f"One budget for every model: {s['img_size']} px, {s['epochs']} epoch{'s' * (s['epochs'] != 1)}, "
              f"batch {s['batch_size']}, lr {s['lr']:g} ({s['sched']}), seed {s['seed']}; the training's "
              f"default pixel size. Dataset "
              f"{s['data']} (seed {s['data_seed']}). Median kernel {s['kernel']} ({s['mode']}); "
              "[DSC] is an upper bound (its threshold uses the labels), the label-free Dice uses the "
              "calibrated threshold."), "",
             "## Training", "",
             "| model | parameters | overrides | wall time | epochs (best) | best val loss | status |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["training"].items():
        overrides = ", ".join(f"{k}={v}" for k, v in r.get("overrides", {}).items()) or "-"
        params = f"{r['parameters'] / 1e6:.2f} M" if r.get("parameters") is not None else "n/a"
        epochs = f"{r['epochs']} ({r['best_epoch']})" if r.get("epochs") is not None else "n/a"
        lines.append(f"| {name} | {params} | {overrides} | {_seconds(r.get('seconds'))} | {epochs} | "
                     f"{_fmt(r.get('best_val_loss'), 5)} | {r['status']} |")
    done = [e for e in results["evaluations"] if e["status"] == "done"]
    for split in SPLITS:
        rows = [e for e in done if e["split"] == split]
        if not rows:
            continue
        lines += ["", f"## {split} ({'synthetic test split' if split == 'synthetic' else REAL_NAME})", "",
                  ("| model | score | AUROC | AUPRC | [DSC] | label-free Dice | threshold | FPR healthy | "
                   "FPR lesion-free test brain | SSIM healthy |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for e in rows:
            o = e["overall"]
            threshold = (f"{o['squash_percent']:.1f} % ({o['squash_source']})" if math.isfinite(o["squash_percent"])
                         else "per scan")
            lines.append(f"| {e['model']} | {e['score']} | {_fmt(o['auroc'])} | {_fmt(o['auprc'])} | "
                         f"{_fmt(o['dsc'])} | {_fmt(o['label_free_dice'])} | {threshold} | "
                         f"{_percent(o['fpr_healthy'])} | {_percent(o['fpr_lesion_free_brain'])} | "
                         f"{_fmt(o['ssim_healthy'])} |")
    lines += ["", ("## The paper's metric variants (all pixels, background included; per-slice smoothed "
                   "Dice at the paper's 1 % squash), to set beside its Table 2"), "",
              "| model | score | split | AUROC all pixels | AUPRC all pixels | slice Dice at S_1% |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {e['model']} | {e['score']} | {e['split']} | {_fmt(e['paper']['auroc_all_pixels'])} | "
              f"{_fmt(e['paper']['auprc_all_pixels'])} | {_fmt(e['paper']['slice_dice_smoothed_s1'])} |"
              for e in done if e.get("paper")]
    kind_rows = [e for e in done if e["per_kind"]]
    metrics = (("auprc", "AUPRC"), ("auroc", "AUROC"), ("dsc", "[DSC]"),
               ("label_free_dice", "label-free Dice (mean per volume)"))
    for key, title in metrics if kind_rows else ():
        kinds = [k for k in KINDS if any(k in e["per_kind"] for e in kind_rows)]
        lines += ["", f"## Per anomaly kind (synthetic): {title}", "",
                  "| model | score | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        lines += [f"| {e['model']} | {e['score']} | " + " | ".join(
            _fmt(e["per_kind"][k][key]) if k in e["per_kind"] else "n/a" for k in kinds) + " |" for e in kind_rows]
    failed = [f"{e['model']} {e['split']} {e['score']}" for e in results["evaluations"] if e["status"] != "done"]
    if failed:
        lines += ["", "Failed evaluations: " + "; ".join(failed) + " (logs in the output folder)."]
    lines += ["", "## Commands", "", "```", *results["commands"], "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# 4. figures


def save_png(fig, path: Path) -> int:
    """Save as a 128-colour palette PNG at the highest of a few resolutions under
    :data:`FIGURE_BYTES`; returns the size. Grey levels, one colour map and a few line colours
    survive the palette, which takes a ten-row slice figure of the real case at 100 dpi from about
    520 to 180 kB."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    for dpi in (100, 80, 64, 50):
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        image = Image.open(buffer).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        image.save(path, optimize=True)
        size = path.stat().st_size
        if size < FIGURE_BYTES:
            break
    else:
        print(f"  warning: {path} is {size / 1e3:.0f} kB even at {dpi} dpi")
    return size


def plot_pr_curves(evaluations: list[dict[str, Any]], split: str, score: str, path: Path) -> int | None:
    """Precision-recall curves of every model with ``score`` and the baseline, on one split."""
    import matplotlib.pyplot as plt

    rows = [e for e in evaluations if e["status"] == "done" and e["split"] == split and e.get("pr_curve")
            and (e["score"] == score or (e["model"] == BASELINE and e["score"] == "residual"))]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.2), layout="constrained")
    colours = iter(plt.get_cmap("tab10").colors)
    for e in rows:
        baseline = e["model"] == BASELINE
        curve = e["pr_curve"]
        ax.plot(curve["recall"], curve["precision"], drawstyle="steps-post", lw=1.6 if baseline else 1.2,
                color="black" if baseline else next(colours), ls="--" if baseline else "-",
                label=f"{e['model']}{' (FLAIR)' if baseline else ''}  AP {e['overall']['auprc']:.3f}")
    prevalence = rows[0]["overall"]["prevalence"]
    ax.axhline(prevalence, color="grey", lw=0.8, ls=":", label=f"chance {prevalence:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{'synthetic test split' if split == 'synthetic' else REAL_NAME}: {score} score")
    ax.legend(fontsize=7, loc="upper right")
    size = save_png(fig, path)
    plt.close(fig)
    return size


@dataclass
class FigureCase:
    """Test slices shown for every model: the volume, its brain mask (None: found as the CLI
    finds it), its labels, the axial slices and a title."""

    name: str
    title: str
    image: Path
    brain: Path | None
    label: Path
    slices: list[int]


def lesion_slices(counts: np.ndarray, n: int, min_gap: int = 1) -> list[int]:
    """Up to ``n`` slices with the most lesion voxels (``counts`` per slice), at least ``min_gap``
    slices apart, most first; slices without lesion are never chosen."""
    chosen: list[int] = []
    for z in np.argsort(-np.asarray(counts), kind="stable"):
        if len(chosen) == n or counts[z] == 0:
            break
        if all(abs(int(z) - c) >= min_gap for c in chosen):
            chosen.append(int(z))
    return chosen


def figure_cases(data: Path, manifest: dict[str, Any], splits: dict[str, list[str]]) -> list[FigureCase]:
    """Synthetic: the slice of the first test case of each kind with most of that kind; real: the
    two slices with most lesion, at least 15 mm apart."""
    from napari_tae.io import load_mask

    cases = []
    for kind in KINDS:
        case = next((c for c in manifest["test"] if c["anomaly_kinds"] == [kind]), None)
        if case is None:
            continue
        kinds = load_mask(data / case["kinds"]).data
        counts = (kinds == KIND_LABELS[kind]).reshape(kinds.shape[0], -1).sum(1)
        cases.append(FigureCase(f"synthetic_{kind}", f"synthetic {nifti_stem(Path(case['image']))}: {kind}",
                                data / case["image"], data / case["mask"], data / case["label"],
                                lesion_slices(counts, 1)))
    if "real" in splits:
        label = load_mask(REAL / "lesion_mask.nii.gz")
        counts = (label.data > 0).reshape(label.data.shape[0], -1).sum(1)
        gap = max(1, round(15.0 / label.geometry.spacing[0]))
        cases.append(FigureCase("real", REAL_NAME, REAL / "FLAIR.nii.gz", None, REAL / "lesion_mask.nii.gz",
                                lesion_slices(counts, 2, gap)))
    return [c for c in cases if c.slices]


def _radiological(a: np.ndarray) -> np.ndarray:
    # (A, R) axial slice: anterior up, the patient's right on the left
    return np.flipud(a[:, ::-1])


def slice_panels(found: list[Detector], cases: list[FigureCase], device: str) -> dict[tuple[str, int], list]:
    """Per (case, slice), one row per detector: its name, the 5 panels, the brain, the slice's Dice."""
    from napari_tae.checkpoint import load_model
    from napari_tae.inference import segment
    from napari_tae.io import load_mask, load_volume
    from training.metrics import dice

    panels: dict[tuple[str, int], list] = {}
    volumes = {c.name: (load_volume(c.image), load_mask(c.label).data > 0,
                        None if c.brain is None else load_mask(c.brain).data > 0) for c in cases}
    for detector in found:
        model, meta = load_model(detector.spec)
        for case in cases:
            volume, label, brain = volumes[case.name]
            # the CLI's post-processing: its defaults (median, calibrated squash, the checkpoint's score)
            result = segment(volume, model, meta, kernel=KERNEL, mode=MODE, brain=brain, device=device)
            for z in case.slices:
                images = (result.normalised[z], result.reconstruction[z], result.residual[z], result.mask[z], label[z])
                panels.setdefault((case.name, z), []).append(
                    (detector.name, images, result.brain[z], dice(result.mask[z], label[z])))
        del model
    return panels


def plot_slices(rows: list, title: str, path: Path) -> int:
    """One row per detector: input / reconstruction / residual / mask / ground truth, cropped to the brain."""
    import matplotlib.pyplot as plt

    brain = np.any([row[2] for row in rows], axis=0)
    ys, xs = np.nonzero(brain) if brain.any() else np.nonzero(np.ones_like(brain))
    crop = (slice(max(ys.min() - 3, 0), ys.max() + 4), slice(max(xs.min() - 3, 0), xs.max() + 4))
    residual_max = max(0.05, max(float(np.percentile(row[1][2][row[2]], 99.5)) if row[2].any() else 0.0
                                 for row in rows))
    fig, axes = plt.subplots(len(rows), len(PANELS), figsize=(1.25 * len(PANELS), 1.25 * len(rows) + 0.35),
                             squeeze=False, layout="constrained")
    for r, (name, images, _, slice_dice) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r, c]
            shown = _radiological(np.asarray(image, np.float32)[crop])
            if PANELS[c] == "residual":
                ax.imshow(shown, cmap="inferno", vmin=0, vmax=residual_max)
            else:
                ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(PANELS[c], fontsize=7)
            if PANELS[c] == "mask":
                # on a dark box: a mask pixel under the caption would hide its digits
                ax.text(0.03, 0.03, f"Dice {_fmt(slice_dice, 2)}", color="yellow", fontsize=6,
                        transform=ax.transAxes,
                        bbox={"facecolor": "black", "edgecolor": "none", "pad": 1.0})
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"{title} (residual 0-{residual_max:.2f})", fontsize=8)
    size = save_png(fig, path)
    plt.close(fig)
    return size


def draw_figures(args: argparse.Namespace, evaluations: list[dict[str, Any]], found: list[Detector],
                 cases: list[FigureCase]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for split in SPLITS:
        for score in SCORES_COMPARED:
            path = args.figures / f"zoo_pr_{split}_{score}.png"
            if (size := plot_pr_curves(evaluations, split, score, path)) is not None:
                written.append(f"{path} ({size / 1e3:.0f} kB)")
    panels = slice_panels(found, cases, args.device)
    for case in cases:
        for rank, z in enumerate(case.slices, 1):
            # named by rank, not slice index: a rerun on other data replaces the same files
            path = args.figures / (f"zoo_slices_{case.name}.png" if len(case.slices) == 1
                                   else f"zoo_slices_{case.name}_{rank}.png")
            size = plot_slices(panels[case.name, z], f"{case.title}, slice {z}", path)
            written.append(f"{path} ({size / 1e3:.0f} kB)")
    return written


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:  # before hours of training, not after
        raise SystemExit("the figures need matplotlib: pip install matplotlib (or pip install -e '.[test]')")
    try:
        overrides = resolve_overrides(args.models, args.img_size, parse_overrides(args.override))
    except ValueError as exc:
        raise SystemExit(f"overrides: {exc}") from None
    for name, settings in overrides.items():
        print(f"override (paper config cannot run at {args.img_size} px): {name} {settings}")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    run = Runner(args.out / "logs")

    print(f"== 1. data in {args.data or args.out / 'data'}")
    data, manifest = dataset(args, run)
    print(f"== 2. training {len(args.models)} models into {args.out / 'checkpoints'}")
    training = train_all(args, data, overrides, run)
    print("== 3. evaluation")
    found = detectors(training)
    splits = split_arguments(data, args.out)
    evaluations = evaluate_all(args, found, splits, data / "manifest.json", case_kinds(manifest), run)
    print(f"== 4. figures into {args.figures}")
    figures = draw_figures(args, evaluations, found, figure_cases(data, manifest, splits))

    settings = {key: getattr(args, key) for key in ("img_size", "epochs", "batch_size", "lr", "sched", "seed",
                                                     "device", "data_seed", "quick", "models")}
    results = {"settings": {**settings, "data": data, "kernel": KERNEL, "mode": MODE, "overrides": overrides},
               "training": training, "evaluations": evaluations, "figures": figures, "commands": run.commands,
               "seconds": time.perf_counter() - t0}
    from napari_tae.export import jsonable

    (args.out / "results.json").write_text(json.dumps(jsonable(results), indent=1) + "\n")
    markdown = format_tables(results)
    (args.out / "results.md").write_text(markdown)
    (args.out / "commands.sh").write_text("\n".join(run.commands) + "\n")
    print("\n" + markdown)
    print("figures:", *figures, sep="\n  ")
    print(f"results: {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'commands.sh'}")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    failed = [n for n, r in training.items() if r["status"] == "failed"]
    failed += [f"{e['model']} {e['split']} {e['score']}" for e in evaluations if e["status"] != "done"]
    if failed:
        print("FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
