"""``python -m training evaluate``: score a checkpoint (or the intensity baseline) on labelled volumes.

Protocol of docs/evaluation.md (after Ghorbel et al. 2022, https://arxiv.org/abs/2207.02059, and
Baur et al. 2021): every volume goes through the shared pipeline (per-volume normalisation as the
checkpoint records it, :func:`napari_tae.inference.reconstruct`, residual, exact median filter)
and the anomaly score is accumulated into fixed-bin histograms
(:class:`training.metrics.BinnedScores`), volume by volume, so memory does not grow with the
number of test voxels. Reported: pooled AUROC/AUPRC within the brain, [DSC] (best global
threshold: an upper bound, it uses the labels) with per-volume Dice at that threshold, Dice at the
checkpoint's calibrated label-free threshold (per scan without one, see docs/scores.md) with its
false-positive rate on healthy volumes, SSIM of reconstructions, and the paper-compatible variants
(all-pixel AUROC/AUPRC, per-slice smoothed Dice at the paper's S_1%), and the pooled
precision-recall curve (at most :data:`PR_CURVE_POINTS` points) for plots. The score is the residual,
or the fused / prior score of :mod:`napari_tae.scores` (``--score``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_tae._atomic import write_text_atomic
from napari_tae.export import jsonable
from napari_tae.io import error_line, nifti_stem
from napari_tae.options import MEDIAN_MODES, PRECISIONS, check_median_kernel
from napari_tae.scores import SCORES, ScoreSpec, label_free_squash, score_spec
from training.data import InputError, configure_logging, pair_by_name, resolve_volumes
from training.metrics import (
    BinnedScores,
    dice_at_threshold,
    false_positive_counts,
    mean_std,
    slice_dice_smoothed,
    ssim_slices,
)

__all__ = ["build_parser", "main", "evaluate", "EvalInputs", "format_markdown"]

_logger = logging.getLogger("training.evaluate")

PAPER_SQUASH = 1.0  # the paper's S_1%: residual > 1 % of the intensity range
PR_CURVE_POINTS = 400  # the pooled precision-recall curve in the JSON, thinned for plots


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training evaluate",
        description="Evaluate anomaly segmentation on labelled FLAIR volumes (AUROC, AUPRC, [DSC], ...).")
    group = parser.add_argument_group("model (one of)")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="FILE", help="trained .safetensors checkpoint")
    which.add_argument("--model", help="parameter-free baseline, e.g. 'intensity' (normalised FLAIR as score)")
    group = parser.add_argument_group("data (paired by file name)")
    group.add_argument("--images", nargs="+", required=True, metavar="GLOB", help="test FLAIR volumes")
    group.add_argument("--labels", nargs="+", required=True, metavar="GLOB", help="lesion masks")
    group.add_argument("--masks", nargs="+", metavar="GLOB", help="brain masks (default: non-background)")
    group.add_argument("--kinds", nargs="+", metavar="GLOB",
                       help="per-voxel anomaly-type maps (synthetic test/kinds) for per-type results")
    group.add_argument("--healthy", nargs="+", metavar="GLOB",
                       help="healthy volumes: SSIM and the calibrated threshold's false-positive rate")
    group = parser.add_argument_group("pipeline")
    group.add_argument("--median-kernel", type=int, default=5, help="odd median window, 1 = off (default 5)")
    group.add_argument("--median-mode", choices=MEDIAN_MODES, default="2d")
    group.add_argument("--score", choices=SCORES, help="anomaly score (default: the checkpoint's)")
    group.add_argument("--squash", type=float,
                       help="label-free threshold in percent (default: the checkpoint's calibrated one, "
                       "else a robust per-scan one)")
    group.add_argument("--bins", type=int, default=100_000, help="score histogram bins on [0, 1]")
    group.add_argument("--device", default="auto")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="the model's arithmetic (default auto: bfloat16 on CUDA, float32 elsewhere)")
    group = parser.add_argument_group("output")
    group.add_argument("--out-json", metavar="FILE")
    group.add_argument("--out-md", metavar="FILE")
    return parser


@dataclass
class EvalInputs:
    images: list[Path]
    labels: list[Path]
    masks: list[Path | None]
    kinds: list[Path | None]
    healthy: list[Path] = field(default_factory=list)


def check_inputs(args: argparse.Namespace) -> EvalInputs:
    """Resolve and pair every input before any computation (InputError on the first problem)."""
    try:
        check_median_kernel(args.median_kernel)
    except ValueError as exc:
        raise InputError(f"--median-kernel: {exc}") from None
    if args.squash is not None and not (math.isfinite(args.squash) and args.squash >= 0):
        raise InputError(f"--squash must be a finite percentage >= 0, got {args.squash}")
    if args.bins < 10:
        raise InputError(f"--bins must be >= 10, got {args.bins}")
    images = resolve_volumes(args.images, "--images")
    labels = pair_by_name(images, resolve_volumes(args.labels, "--labels"), "--labels")
    masks: list[Path | None] = [None] * len(images)
    kinds: list[Path | None] = [None] * len(images)
    if args.masks:
        masks = pair_by_name(images, resolve_volumes(args.masks, "--masks"), "--masks")
    if args.kinds:
        kinds = pair_by_name(images, resolve_volumes(args.kinds, "--kinds"), "--kinds")
    healthy = resolve_volumes(args.healthy, "--healthy") if args.healthy else []
    for out in (args.out_json, args.out_md):
        if out and Path(out).is_dir():
            raise InputError(f"{out}: is a folder, expected an output file")
    return EvalInputs(images, labels, masks, kinds, healthy)


def load_model(args: argparse.Namespace):
    """(model, meta, name): the checkpoint's model, or a parameter-free baseline (the intensity
    baseline with its bundled calibration)."""
    if args.checkpoint:
        from napari_tae.checkpoint import CheckpointError, load_checkpoint

        if not Path(args.checkpoint).is_file():
            raise InputError(f"--checkpoint {args.checkpoint}: no such file")
        try:
            model, meta = load_checkpoint(args.checkpoint)
        except (CheckpointError, OSError) as exc:
            raise InputError(error_line(exc)) from None
        return model, meta, meta.model_name
    from napari_tae.models import build_model, list_models

    if args.model not in list_models():
        raise InputError(f"--model {args.model}: unknown; known models: {', '.join(list_models())}")
    if args.model == "intensity":
        from napari_tae.checkpoint import load_model as load_named

        model, meta = load_named("intensity")
        return model, meta, args.model
    model = build_model(args.model)
    if any(True for _ in model.parameters()):
        raise InputError(f"--model {args.model}: has trainable weights; evaluate a trained one "
                         "with --checkpoint (only parameter-free baselines such as 'intensity' run bare)")
    return model, None, args.model


def _load(path: Path, shape: tuple[int, ...] | None = None, what: str = "volume"):
    """The :class:`napari_tae.io.Volume` at ``path`` (its voxel size matters to the pipeline)."""
    from napari_tae.io import VolumeError, load_mask, load_volume

    try:
        # a label map may be empty (a lesion-free case); an image may not be constant
        volume = load_volume(path) if what == "volume" else load_mask(path)
    except VolumeError as exc:
        raise InputError(str(exc)) from None
    if shape is not None and volume.data.shape != shape:
        raise InputError(f"{path}: {what} shape {volume.data.shape} does not match its volume's {shape}")
    return volume


class _Scorer:
    """The shared pipeline for one model: volume -> (median-filtered score, raw score, reconstruction).

    ``cache`` (a dict, optional) keeps reconstructions by path, so that several scores of one model
    are evaluated with one forward pass per volume; pass a fresh dict per model.
    """

    def __init__(self, model, meta, *, kernel: int, mode: str, device: str, batch_size: int,
                 spec: ScoreSpec, cache: dict | None = None, precision: str = "auto"):
        self.model, self.meta, self.spec, self.cache, self.precision = model, meta, spec, cache, precision
        self.kernel, self.mode, self.device, self.batch_size = kernel, mode, device, batch_size

    def __call__(self, image, supplied_brain: np.ndarray | None, path: Path):
        from napari_tae.inference import reconstruct
        from napari_tae.postprocess import median_filtered

        rec = self.cache.get(path) if self.cache is not None else None
        if rec is None:
            try:  # the brain mask and normalisation refuse volumes they cannot handle
                rec = reconstruct(self.model, image.data, brain=supplied_brain, meta=self.meta,
                                  spacing=image.geometry.spacing, device=self.device,
                                  batch_size=self.batch_size, precision=self.precision)
            except ValueError as exc:
                raise InputError(f"{path}: {exc}") from None
            if self.cache is not None:
                self.cache[path] = rec
        raw = self.spec.compute(rec.normalised, rec.residual, rec.brain)
        return median_filtered(raw, self.kernel, self.mode), raw, rec

    def squash(self, fixed: float | None, raw: np.ndarray, brain: np.ndarray) -> tuple[float, str]:
        """The label-free threshold for this volume, as ``inference.segment`` picks it."""
        if fixed is not None:
            return float(fixed), "command line"
        return label_free_squash(self.meta, self.spec.name, self.kernel, self.mode, raw, brain)


def _summary(values) -> dict[str, float]:
    mean, std, n = mean_std(values)
    return {"mean": mean, "std": std, "n": n}


def evaluate(model, meta, inputs: EvalInputs, *, kernel: int = 5, mode: str = "2d",
             squash: float | None = None, n_bins: int = 100_000, device: str = "auto",
             batch_size: int = 8, score: str | None = None, cache: dict | None = None,
             precision: str = "auto") -> dict[str, Any]:
    """Run the protocol volume by volume; returns the results as a JSON-ready dict.

    ``score``: the checkpoint's default when None; ``cache``: see :class:`_Scorer`; ``precision``:
    :func:`napari_tae.inference.resolve_precision`.
    """
    try:
        spec = score_spec(meta, score)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    score_volume = _Scorer(model, meta, kernel=kernel, mode=mode, device=device, batch_size=batch_size,
                           spec=spec, cache=cache, precision=precision)
    t0 = time.perf_counter()

    brain_acc = BinnedScores(n_bins, spec.upper)
    all_acc = BinnedScores(n_bins, spec.upper)
    kind_acc: dict[int, BinnedScores] = {}
    per_volume: list[dict[str, Any]] = []
    # per-volume histograms (int32) give each volume's Dice at the global [DSC] threshold found at
    # the end without keeping any voxel: memory grows with volumes, not voxels
    volume_hists: list[tuple[np.ndarray, np.ndarray]] = []
    slice_dice_paper: list[np.ndarray] = []
    lesion_free_ssim: list[np.ndarray] = []
    fp_test = [0, 0]
    overlap = [0, 0]  # pooled label-free Dice: 2 TP and |prediction| + |truth| over all volumes
    squashes: list[tuple[float, str]] = []
    labels_outside_brain = 0
    for i, (img, lab, msk, knd) in enumerate(zip(inputs.images, inputs.labels, inputs.masks, inputs.kinds)):
        image = _load(img)
        data = image.data
        label = _load(lab, data.shape, "label").data > 0
        supplied = _load(msk, data.shape, "brain mask").data if msk is not None else None
        score, raw, rec = score_volume(image, supplied, img)
        brain = np.asarray(rec.brain, bool)
        volume_squash, squash_source = score_volume.squash(squash, raw, brain)
        squashes.append((volume_squash, squash_source))
        threshold = volume_squash / 100.0
        labels_outside_brain += int(np.count_nonzero(label & ~brain))
        vol_acc = BinnedScores(n_bins, spec.upper).update(score, label, brain)
        brain_acc += vol_acc
        all_acc.update(score, label)
        volume_hists.append((vol_acc.pos.astype(np.int32), vol_acc.neg.astype(np.int32)))
        lesion_in_brain = label & brain
        fp_test = [a + b for a, b in zip(fp_test, false_positive_counts(score, threshold, brain & ~label))]
        flagged, brain_voxels = false_positive_counts(score, threshold, brain)
        hits, lesion_voxels = false_positive_counts(score, threshold, lesion_in_brain)
        overlap = [overlap[0] + 2 * hits, overlap[1] + flagged + lesion_voxels]
        slice_dice_paper.append(slice_dice_smoothed((score > PAPER_SQUASH / 100.0) & brain, label))
        lesion_free = ~label.reshape(label.shape[0], -1).any(1) & brain.reshape(brain.shape[0], -1).any(1)
        if lesion_free.any():
            lesion_free_ssim.append(ssim_slices(rec.normalised[lesion_free], rec.reconstruction[lesion_free]))
        if knd is not None:
            kind_map = np.rint(_load(knd, data.shape, "kinds map").data).astype(np.int64)
            for k in np.unique(kind_map[kind_map > 0]):
                acc = kind_acc.setdefault(int(k), BinnedScores(n_bins, spec.upper))
                acc.update(score, kind_map == k, brain & ((kind_map == k) | ~label))
        per_volume.append({
            "name": nifti_stem(img), "lesion_voxels": int(np.count_nonzero(lesion_in_brain)),
            "auroc": vol_acc.auroc(), "auprc": vol_acc.average_precision(),
            "dice_calibrated": dice_at_threshold(score, label, threshold, brain),
            "squash_percent": volume_squash, "flagged_brain_fraction": flagged / max(brain_voxels, 1),
        })
        _logger.info("[%d/%d] %s: AUPRC %.4f, Dice@%.2f%% %.4f", i + 1, len(inputs.images), img.name,
                     per_volume[-1]["auprc"], volume_squash, per_volume[-1]["dice_calibrated"])
        del data, label, score, raw, rec

    best_dice, best_threshold = brain_acc.best_dice()
    pr_precision, pr_recall = brain_acc.precision_recall_curve(max_points=PR_CURVE_POINTS)
    if math.isfinite(best_threshold):
        k = int(np.nanargmax(brain_acc.dice_curve()))  # the [DSC] threshold: bins >= k are predicted
        for entry, (pos, neg) in zip(per_volume, volume_hists):
            tp, fp, p = int(pos[k:].sum()), int(neg[k:].sum()), int(pos.sum())
            entry["dice_at_dsc_threshold"] = 2 * tp / (tp + fp + p) if tp + fp + p else float("nan")
    else:
        for entry in per_volume:
            entry["dice_at_dsc_threshold"] = float("nan")

    healthy_ssim: list[np.ndarray] = []
    fp_healthy = [0, 0]
    for path in inputs.healthy:
        image = _load(path)
        data = image.data
        score, raw, rec = score_volume(image, None, path)
        brain = np.asarray(rec.brain, bool)
        volume_squash, squash_source = score_volume.squash(squash, raw, brain)
        squashes.append((volume_squash, squash_source))
        fp_healthy = [a + b for a, b in zip(fp_healthy, false_positive_counts(score, volume_squash / 100.0, brain))]
        healthy_ssim.append(ssim_slices(rec.normalised, rec.reconstruction))
        del data, score, raw, rec

    # one threshold for all volumes when calibrated (or given); per-scan ones vary
    values = {v for v, _ in squashes}
    squash_percent = values.pop() if len(values) == 1 else float("nan")
    squash_source = squashes[0][1] if squashes else "none"

    def _pooled_mean(chunks: list[np.ndarray]) -> float:
        values = np.concatenate(chunks) if chunks else np.zeros(0)
        return float(values.mean()) if values.size else float("nan")

    results: dict[str, Any] = {
        "n_volumes": len(inputs.images), "n_healthy_volumes": len(inputs.healthy),
        "brain": {
            "auroc": brain_acc.auroc(), "auprc": brain_acc.average_precision(),
            "positives": brain_acc.n_pos, "negatives": brain_acc.n_neg,
            "labels_outside_brain": labels_outside_brain,
            "pr_curve": {"precision": pr_precision, "recall": pr_recall},
        },
        "dsc_upper_bound": {
            "dice": best_dice, "threshold_percent": best_threshold * 100.0,
            "per_volume_dice": _summary(v["dice_at_dsc_threshold"] for v in per_volume),
            "note": "best global threshold chosen with the test labels: an upper bound",
        },
        "calibrated": {
            "squash_percent": squash_percent, "source": squash_source,
            "per_volume_dice": _summary(v["dice_calibrated"] for v in per_volume),
            "dice_pooled": overlap[0] / overlap[1] if overlap[1] else float("nan"),
            "fpr_healthy": fp_healthy[0] / fp_healthy[1] if fp_healthy[1] else float("nan"),
            "fpr_test_lesion_free_brain": fp_test[0] / fp_test[1] if fp_test[1] else float("nan"),
        },
        "ssim": {
            "healthy_volumes": _pooled_mean(healthy_ssim),
            "test_lesion_free_slices": _pooled_mean(lesion_free_ssim),
        },
        "paper_compatible": {
            "auroc_all_pixels": all_acc.auroc(), "auprc_all_pixels": all_acc.average_precision(),
            "slice_dice_smoothed_s1": _pooled_mean(slice_dice_paper),
        },
        "per_volume": per_volume,
        "settings": {"median_kernel": kernel, "median_mode": mode, "bins": n_bins,
                     "score": spec.to_dict(), "score_filter": "median, as the mask",
                     "grid": "native voxels", "precision": precision},
        "seconds": time.perf_counter() - t0,
    }
    if kind_acc:
        from napari_tae.synthetic import KIND_LABELS

        names = {v: k for k, v in KIND_LABELS.items()}
        results["per_kind"] = {
            names.get(k, str(k)): {"auroc": acc.auroc(), "auprc": acc.average_precision(),
                                   "dsc_upper_bound": acc.best_dice()[0], "positives": acc.n_pos}
            for k, acc in sorted(kind_acc.items())}
    return results


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _pm(summary: dict[str, float]) -> str:
    return f"{_fmt(summary['mean'])} ± {_fmt(summary['std'])} (n={summary['n']})"


def format_markdown(results: dict[str, Any], title: str) -> str:
    """One Markdown table of the headline numbers, then per-type results when present."""
    b, d, c = results["brain"], results["dsc_upper_bound"], results["calibrated"]
    s, p = results["ssim"], results["paper_compatible"]
    rows = [
        ("AUROC (brain voxels, pooled)", _fmt(b["auroc"])),
        ("AUPRC (brain voxels, pooled)", _fmt(b["auprc"])),
        (f"[DSC] upper bound (threshold {_fmt(d['threshold_percent'], 2)} %)", _fmt(d["dice"])),
        ("Dice per volume at [DSC] threshold", _pm(d["per_volume_dice"])),
        (f"Dice pooled at the label-free threshold ({c['source']})", _fmt(c["dice_pooled"])),
        (f"Dice per volume at calibrated {_fmt(c['squash_percent'], 2)} % ({c['source']})",
         _pm(c["per_volume_dice"])),
        ("FPR of that threshold, healthy volumes", _fmt(c["fpr_healthy"])),
        ("FPR of that threshold, lesion-free test brain", _fmt(c["fpr_test_lesion_free_brain"])),
        ("SSIM, healthy volumes", _fmt(s["healthy_volumes"])),
        ("SSIM, lesion-free test slices", _fmt(s["test_lesion_free_slices"])),
        ("paper: AUROC all pixels", _fmt(p["auroc_all_pixels"])),
        ("paper: AUPRC all pixels", _fmt(p["auprc_all_pixels"])),
        ("paper: per-slice smoothed Dice at S_1%", _fmt(p["slice_dice_smoothed_s1"])),
    ]
    lines = [f"## {title}", "",
             (f"{results['n_volumes']} test volume(s), {results['n_healthy_volumes']} healthy; "
              f"median kernel {results['settings']['median_kernel']} ({results['settings']['median_mode']}); "
              f"score {results['settings']['score']['name']}."),
             "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if results.get("per_kind"):
        lines += ["", "| anomaly type | AUROC | AUPRC | [DSC] | voxels |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['auroc'])} | {_fmt(v['auprc'])} | {_fmt(v['dsc_upper_bound'])} | "
                  f"{v['positives']} |" for k, v in results["per_kind"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        inputs = check_inputs(args)
        model, meta, name = load_model(args)
        from napari_tae.inference import resolve_run_options

        try:  # before the first volume
            device, _ = resolve_run_options(args.device, args.precision)
        except ValueError as exc:
            raise InputError(error_line(exc)) from None
        results = evaluate(model, meta, inputs, kernel=args.median_kernel, mode=args.median_mode,
                           squash=args.squash, n_bins=args.bins, device=device,
                           batch_size=args.batch_size, score=args.score, precision=args.precision)
    except InputError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    results = {"model": name, "checkpoint": args.checkpoint, **results}
    title = f"{name}" + (f" ({Path(args.checkpoint).name})" if args.checkpoint else "")
    markdown = format_markdown(results, title)
    for out, text in ((args.out_json, json.dumps(jsonable(results), indent=1) + "\n"),
                      (args.out_md, markdown)):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, text)
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
