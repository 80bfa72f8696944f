"""``python -m training calibrate``: score parameters and label-free thresholds of a detector.

The calibration step of training (:func:`calibrate_detector`, run by ``python -m training train``
on its healthy validation volumes), also runnable alone to recalibrate a checkpoint (a re-save of
its metadata; the weights and their sha256 are unchanged) or to write the ``intensity`` baseline's
metadata. See docs/scores.md:

1. the prior's threshold candidates: percentiles of healthy normalised brain intensity;
2. synthetic anomalous validation volumes: each healthy validation volume with MS-like lesions or
   a tumour-like mass (in turn) inserted by :func:`napari_tae.synthetic.add_anomalies` (seeded),
   never a real label;
3. the fused score's weight ``w`` and the prior's percentile: the candidates' best pooled AUPRC of
   the median-filtered score on those volumes (:class:`training.metrics.BinnedScores`);
4. the calibration table of every score on the healthy volumes, per median kernel and mode
   (:func:`napari_tae.scores.calibration_table`);
5. each score's label-free threshold: the table percentile (99, 99.5 or 99.9) whose threshold gives
   the best pooled Dice on the synthetic anomalous volumes.

A parameter-free model (the intensity baseline) gets the residual's table and threshold only: its
residual is the FLAIR itself, so the fused and prior scores would rank voxels the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from training.data import InputError, configure_logging, resolve_volumes

__all__ = ["ANOMALY_KINDS", "build_parser", "calibrate_detector", "main"]

_logger = logging.getLogger("training.calibrate")

#: Lesion kinds of the synthetic anomalous validation volumes: the hyper-intense FLAIR lesions the
#: scores are meant for (dark and deformation anomalies are not hyper-intense).
ANOMALY_KINDS = ("ms", "tumour")


def _reconstruct(model, data: np.ndarray, spacing, preprocessing: dict[str, Any], device, batch_size: int,
                 brain: np.ndarray | None = None):
    from napari_tae.inference import reconstruct

    # the plugin's path: brain extraction, normalisation and pixel size as the checkpoint records them
    return reconstruct(model, data, brain=brain, meta=SimpleNamespace(preprocessing=preprocessing),
                       spacing=spacing, skull_strip=preprocessing.get("skull_strip", "auto"), device=device,
                       batch_size=batch_size)


def _select(candidates: dict[Any, Any], anomalous: list[tuple[Any, np.ndarray]], kernel: int, mode: str,
            n_bins: int) -> tuple[Any, dict[str, float]]:
    """The candidate ScoreSpec with the best pooled AUPRC of its median-filtered score."""
    from napari_tae.postprocess import median_filtered
    from training.metrics import BinnedScores

    auprc = {}
    for key, spec in candidates.items():
        acc = BinnedScores(n_bins, spec.upper)
        for rec, label in anomalous:
            score = median_filtered(spec.compute(rec.normalised, rec.residual, rec.brain), kernel, mode)
            acc.update(score, label, rec.brain)
        auprc[f"{key:g}"] = acc.average_precision()
    best = max(candidates, key=lambda k: (np.nan_to_num(auprc[f"{k:g}"], nan=-1.0), -k))
    return best, auprc


def _select_percentile(spec, rows: list[dict[str, Any]], anomalous: list[tuple[Any, np.ndarray]], kernel: int,
                       mode: str) -> tuple[float, dict[str, float]]:
    """The table percentile whose threshold (this kernel and mode) gives the best pooled Dice of
    the label-free mask on the anomalous volumes; ties go to the lower percentile."""
    from napari_tae.postprocess import CALIBRATION_PERCENTILES, median_filtered
    from training.metrics import false_positive_counts

    row = next(r for r in rows if r["score"] == spec.name and r["kernel"] == kernel and r["mode"] == mode)
    filtered = [(median_filtered(spec.compute(rec.normalised, rec.residual, rec.brain), kernel, mode), label,
                 np.asarray(rec.brain, bool)) for rec, label in anomalous]
    dice = {}
    for p in CALIBRATION_PERCENTILES:
        threshold = row[f"p{p:g}"] / 100.0
        # pooled over the volumes, as evaluate's label-free Dice: 2 TP / (|prediction| + |truth|)
        hits = flagged = truth = 0
        for score, label, brain in filtered:
            hit, lesion = false_positive_counts(score, threshold, label & brain)
            hits += hit
            truth += lesion
            flagged += false_positive_counts(score, threshold, brain)[0]
        dice[f"p{p:g}"] = 2 * hits / (flagged + truth) if flagged + truth else float("nan")
    best = max(CALIBRATION_PERCENTILES, key=lambda p: (np.nan_to_num(dice[f"p{p:g}"], nan=-1.0), -p))
    return float(best), dice


def calibrate_detector(
    model,
    healthy: list[Path],
    *,
    preprocessing: dict[str, Any],
    lesion_masks: list[Path | None] | None = None,
    default_score: str = "residual",
    calibration_kernel: int = 5,
    calibration_mode: str = "2d",
    seed: int = 0,
    device="cpu",
    batch_size: int = 8,
    n_bins: int = 20_000,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``(calibration, scores)`` metadata of a model from healthy volumes.

    Args:
        model: The trained model (or the intensity baseline).
        healthy: Healthy volumes (the validation split).
        preprocessing: The checkpoint's preprocessing record (normalisation settings).
        lesion_masks: Voxels to leave out of the healthy brains, per volume (or None).
        default_score: The score the checkpoint offers first.
        calibration_kernel, calibration_mode: The median of the legacy single ``calibration``
            (the residual's row of the table), and of the selection of ``w`` and the percentile.
        seed: Seed of the synthetic anomalies.
        device, batch_size: Inference settings.
        n_bins: Histogram bins of the AUPRC used for the selection.

    Returns:
        The residual's ``{"p99", "p99.5", "p99.9", "default"}`` for ``CheckpointMeta.calibration``
        and the ``CheckpointMeta.scores`` record.
    """
    from napari_tae.io import load_mask, load_volume
    from napari_tae.postprocess import calibrate
    from napari_tae.scores import (
        FUSED_WEIGHTS,
        PRIOR_PERCENTILES,
        SCORES,
        ScoreSpec,
        calibration_table,
    )
    from napari_tae.synthetic import add_anomalies

    if default_score not in SCORES:
        raise InputError(f"unknown default score {default_score!r}; choose one of {', '.join(SCORES)}")
    parameter_free = not any(True for _ in model.parameters())
    if parameter_free and default_score != "residual":
        raise InputError("a parameter-free model offers the residual score only")
    lesion_masks = lesion_masks or [None] * len(healthy)
    healthy_rec, anomalous = [], []
    for i, (path, lesion_path) in enumerate(zip(healthy, lesion_masks)):
        volume = load_volume(path)
        spacing = tuple(volume.geometry.spacing)
        rec = _reconstruct(model, volume.data, spacing, preprocessing, device, batch_size)
        brain = np.asarray(rec.brain, bool)
        if lesion_path is not None:
            brain = brain & ~(load_mask(lesion_path).data > 0)
        healthy_rec.append((rec.normalised, rec.residual, brain))
        # one kind per volume, in turn: a patient has MS lesions or a tumour, and the lesion load
        # sets the best threshold
        data, labels = add_anomalies(np.where(rec.brain, volume.data, 0), seed + i,
                                     (ANOMALY_KINDS[i % len(ANOMALY_KINDS)],), brain=rec.brain, spacing=spacing)
        # the healthy volume's brain: its anomalies lie inside it, and it is not extracted twice
        anomalous.append((_reconstruct(model, data, spacing, preprocessing, device, batch_size, rec.brain),
                          labels > 0))
        _logger.info("calibration volume %d/%d: %s", i + 1, len(healthy), path.name)

    specs = [ScoreSpec("residual")]
    scores: dict[str, Any] = {"default": default_score}
    validation = (f"{len(anomalous)} synthetic anomalous validation volume(s) (one of "
                  f"{', '.join(ANOMALY_KINDS)} inserted in turn, seed {seed})")
    if not parameter_free:
        kernel, mode = calibration_kernel, calibration_mode
        note = f"AUPRC of the median-filtered score (kernel {kernel}, {mode}) on {validation}"
        weight, auprc = _select({w: ScoreSpec("fused", weight=w) for w in FUSED_WEIGHTS}, anomalous,
                                kernel, mode, n_bins)
        scores["fused"] = {"weight": float(weight), "chosen_by": note, "auprc": auprc}
        intensity = np.concatenate([x[b] for x, _, b in healthy_rec])
        levels = dict(zip(PRIOR_PERCENTILES, np.percentile(intensity, PRIOR_PERCENTILES)))
        percentile, auprc = _select({p: ScoreSpec("prior", threshold=float(t)) for p, t in levels.items()},
                                    anomalous, kernel, mode, n_bins)
        scores["prior"] = {"threshold": float(levels[percentile]), "percentile": float(percentile),
                           "chosen_by": note + "; threshold: that percentile of healthy normalised brain "
                                               "intensity", "auprc": auprc}
        specs += [ScoreSpec("fused", weight=float(weight)), ScoreSpec("prior", threshold=float(levels[percentile]))]
        _logger.info("fused weight %g, prior at the %g-th percentile (%.3f)", weight, percentile, levels[percentile])
    scores["table"] = calibration_table(specs, healthy_rec)
    chosen = {spec.name: _select_percentile(spec, scores["table"], anomalous, calibration_kernel, calibration_mode)
              for spec in specs}
    scores["percentiles"] = {name: p for name, (p, _) in chosen.items()}
    scores["percentiles_chosen_by"] = {
        "note": f"pooled Dice of the label-free mask (kernel {calibration_kernel}, {calibration_mode}) on {validation}",
        "dice": {name: dice for name, (_, dice) in chosen.items()}}
    scores["calibration_volumes"] = len(healthy)
    calibration = calibrate([r for _, r, _ in healthy_rec], [b for _, _, b in healthy_rec],
                            kernel=calibration_kernel, mode=calibration_mode)
    calibration["default"] = calibration[f"p{scores['percentiles']['residual']:g}"]
    return calibration, scores


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from napari_tae.scores import SCORES

    parser = argparse.ArgumentParser(
        prog="python -m training calibrate",
        description="Recalibrate a checkpoint (scores and label-free thresholds, weights unchanged) or "
                    "write the intensity baseline's metadata, from healthy volumes.")
    parser.add_argument("--checkpoint", required=True, metavar="FILE_OR_NAME",
                        help="a .safetensors checkpoint, a bundled name, or 'intensity'")
    parser.add_argument("--healthy", nargs="+", required=True, metavar="GLOB", help="healthy FLAIR volumes")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the recalibrated .safetensors (or, for intensity, the .json metadata)")
    parser.add_argument("--default-score", choices=SCORES, default="residual")
    parser.add_argument("--calib-kernel", type=int, default=5)
    parser.add_argument("--calib-mode", choices=("2d", "3d"), default="2d")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic anomalies")
    parser.add_argument("--note", metavar="TEXT", help="stored as training['calibration_note']")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    from napari_tae.checkpoint import (
        FORMAT_VERSION,
        CheckpointError,
        CheckpointMeta,
        load_model,
        save_checkpoint,
        weights_sha256,
        write_metadata_json,
    )

    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise InputError(f"{out}: exists; pass --overwrite to replace it")
        healthy = resolve_volumes(args.healthy, "--healthy")
        try:
            model, meta = load_model(args.checkpoint)
        except (CheckpointError, OSError) as exc:
            raise InputError(str(exc).splitlines()[0]) from None
        if meta is None:  # the intensity baseline without its metadata file: the training defaults
            from napari_tae.preprocess import PreprocessOptions

            preprocessing = {"normalisation": "per_volume", **PreprocessOptions().to_dict(),
                             "img_size": int(model.img_size), "slice_axis": "axial"}
            training = {"data": "no training: the normalised FLAIR is the anomaly score"}
        else:
            preprocessing, training = meta.preprocessing, dict(meta.training)
        calibration, scores = calibrate_detector(
            model, healthy, preprocessing=preprocessing, default_score=args.default_score,
            calibration_kernel=args.calib_kernel, calibration_mode=args.calib_mode, seed=args.seed,
            device=args.device, batch_size=args.batch_size)
    except InputError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    training.update({"calibration_kernel": args.calib_kernel, "calibration_mode": args.calib_mode,
                     "calibration_command": "python -m training calibrate " + " ".join(argv or sys.argv[1:])})
    if args.note:
        training["calibration_note"] = args.note
    if any(True for _ in model.parameters()):
        if out.suffix != ".safetensors":
            parser.exit(2, f"{parser.prog}: error: {out}: a checkpoint must be written as .safetensors\n")
        save_checkpoint(out, model, preprocessing=preprocessing, calibration=calibration, training=training,
                        scores=scores, overwrite=True)
    else:
        if out.suffix != ".json":
            parser.exit(2, f"{parser.prog}: error: {out}: a weightless model's metadata is written as .json\n")
        write_metadata_json(out, CheckpointMeta(
            format_version=FORMAT_VERSION, model_name=model.model_name, config=model.config_dict(),
            img_size=int(model.img_size), preprocessing=preprocessing, calibration=calibration,
            training=training, sha256=weights_sha256({}), scores=scores))
    _logger.info("wrote %s (residual p99 %.2f %%, default score %s)", out, calibration["p99"], scores["default"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
