"""Detection quality of the bundled detectors and scores (issue 13 targets), not a unit test.

For the bundled default checkpoint (with its default score, and with each of the three scores),
the other bundled checkpoint and the ``intensity`` baseline: AUROC, AUPRC and [DSC] of the
median-filtered score (kernel 5, 2D: the mask's median), the label-free mask's pooled Dice and the
fraction of healthy brain it flags, on

(a) a fresh synthetic test split (seeded; one volume per anomaly kind plus one healthy volume, at
    the bundled models' training grid), written by :func:`napari_tae.synthetic.write_dataset`;
(b) the real MS case ``../shared/data/real/mslub_patient07`` when present (one case: a check,
    never a tuning set).

Every figure comes from :func:`training.evaluate.evaluate`, the evaluation protocol's one code path.
Targets: the default detector's AUPRC above intensity's on (a) and on (b); its label-free Dice at
least 80 % of its own [DSC]; intensity's label-free mask under 3 % of the real brain.

Run: ``python benchmarks/bench_quality.py [--seed 2026] [--shape 132 156 126]`` (a few minutes on
a 2-core CPU).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from pathlib import Path

from napari_tae.checkpoint import DEFAULT_CHECKPOINT, bundled_checkpoints, load_model
from napari_tae.scores import available_scores, default_score
from napari_tae.synthetic import KINDS, DomainRandomisation, MSLesions, write_dataset
from training.evaluate import EvalInputs, evaluate

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "mslub_patient07"
KERNEL, MODE = 5, "2d"


def synthetic_split(folder: Path, seed: int, shape: tuple[int, int, int] | None,
                    randomised: bool) -> EvalInputs:
    extra = {"randomisation": DomainRandomisation(), "ms_lesions": MSLesions()} if randomised else {}
    paths = write_dataset(folder, 0, 0, len(KINDS), seed, shape=shape, n_test_healthy=1, **extra)
    test = folder / "test"
    images = sorted((test / "images").glob("*.nii.gz"))
    return EvalInputs(images=images, labels=[test / "labels" / p.name for p in images],
                      masks=[test / "masks" / p.name for p in images],
                      kinds=[test / "kinds" / p.name for p in images],
                      healthy=[Path(p) for p in paths["test_healthy"]])


def real_case() -> EvalInputs | None:
    if not (REAL / "FLAIR.nii.gz").is_file():
        return None
    return EvalInputs(images=[REAL / "FLAIR.nii.gz"], labels=[REAL / "lesion_mask.nii.gz"], masks=[None],
                      kinds=[None])


def detectors(default: str = DEFAULT_CHECKPOINT) -> list[tuple[str, str, str | None]]:
    """(row name, checkpoint spec, score): the default (the bundled one, or a candidate file to
    replace it) with each score, the bundled others with theirs."""
    rows = []
    _, meta = load_model(default)
    name = Path(default).stem if default not in bundled_checkpoints() else default
    rows.append((f"{name} (default: {default_score(meta)})", default, None))
    rows += [(f"{name} {s}", default, s) for s in available_scores(meta) if s != default_score(meta)]
    rows += [(other, other, None) for other in sorted(bundled_checkpoints()) if other != default]
    rows.append(("intensity", "intensity", None))
    return rows


def _pct(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{100 * value:.2f} %"


def run(inputs: EvalInputs, title: str, rows: list[tuple[str, str, str | None]],
        precision: str = "auto") -> dict[str, dict]:
    print(f"\n## {title}\n")
    print("| detector | score | AUROC | AUPRC | [DSC] | label-free Dice | threshold | "
          "brain flagged (healthy / lesion-free test) |")
    print("|---|---|---|---|---|---|---|---|")
    results, caches = {}, {}
    for row, spec, score in rows:
        model, meta = load_model(spec)
        res = evaluate(model, meta, inputs, kernel=KERNEL, mode=MODE, score=score, n_bins=20_000,
                       device="cpu", cache=caches.setdefault(spec, {}), precision=precision)
        results[row] = res
        b, d, c = res["brain"], res["dsc_upper_bound"], res["calibrated"]
        squash = (f"{c['squash_percent']:.1f} %" if math.isfinite(c["squash_percent"])
                  else "per scan") + f" ({c['source']})"
        flagged = f"{_pct(c['fpr_healthy'])} / {_pct(c['fpr_test_lesion_free_brain'])}"
        print(f"| {row} | {res['settings']['score']['name']} | {b['auroc']:.3f} | {b['auprc']:.3f} | "
              f"{d['dice']:.3f} | {c['dice_pooled']:.3f} | {squash} | {flagged} |", flush=True)
    kinds = {row: r.get("per_kind") for row, r in results.items() if r.get("per_kind")}
    if kinds:
        names = list(next(iter(kinds.values())))
        print("\nAUPRC per anomaly kind:\n")
        print("| detector | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for row, per in kinds.items():
            print(f"| {row} | " + " | ".join(f"{per[k]['auprc']:.3f}" for k in names) + " |")
    return results


def targets(split: dict[str, dict], real: dict[str, dict] | None, default: str) -> None:
    print("\n## Targets\n")

    def check(text: str, ok: bool) -> None:
        print(f"- [{'x' if ok else ' '}] {text}")

    for name, res in (("synthetic split", split), ("real case", real)):
        if res is None:
            print(f"- real case absent ({REAL}): its targets are not checked")
            continue
        ap, ap_int = res[default]["brain"]["auprc"], res["intensity"]["brain"]["auprc"]
        check(f"{name}: {default} AUPRC {ap:.3f} > intensity {ap_int:.3f}", ap > ap_int)
        dsc, lf = res[default]["dsc_upper_bound"]["dice"], res[default]["calibrated"]["dice_pooled"]
        check(f"{name}: {default} label-free Dice {lf:.3f} >= 80 % of its [DSC] {dsc:.3f} "
              f"({100 * lf / dsc:.0f} %)", lf >= 0.8 * dsc)
    if real is not None:
        flagged = real["intensity"]["per_volume"][0]["flagged_brain_fraction"]
        check(f"real case: intensity's label-free mask flags {_pct(flagged)} of the brain (< 3 %)", flagged < 0.03)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2026, help="seed of the synthetic test split")
    parser.add_argument("--shape", type=int, nargs=3, default=(132, 156, 126), metavar=("X", "Y", "Z"),
                        help="grid of the plain split (the randomised one draws realistic grids)")
    parser.add_argument("--default", default=DEFAULT_CHECKPOINT, metavar="CHECKPOINT",
                        help="the detector the targets are checked for: the bundled default, or a "
                        "candidate file to replace it")
    parser.add_argument("--domain-randomisation", action="store_true",
                        help="a domain-randomised test split (docs/synthetic.md) instead of the plain one")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="the models' arithmetic on the CPU (docs/speed.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = detectors(args.default)
    kind = "domain-randomised" if args.domain_randomisation else "plain"
    with tempfile.TemporaryDirectory() as tmp:
        split = run(synthetic_split(Path(tmp), args.seed, None if args.domain_randomisation else tuple(args.shape),
                                    args.domain_randomisation),
                    f"(a) {kind} synthetic test split, seed {args.seed}, one volume per kind + 1 healthy, "
                    f"{args.precision}", rows, args.precision)
    real_inputs = real_case()
    real = run(real_inputs, f"(b) real case {REAL.name}, {args.precision}", rows,
               args.precision) if real_inputs else None
    targets(split, real, rows[0][0])


if __name__ == "__main__":
    main()
