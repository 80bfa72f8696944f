"""``python -m training synth``: write a synthetic dataset (healthy train/val, anomalous test).

A thin command line over :func:`napari_tae.synthetic.write_dataset`; see its docstring for the
folder layout (``train/``, ``val/``, ``test/{images,labels,kinds,masks,healthy}/``, manifest).
Domain randomisation (``napari_tae.synthetic.DomainRandomisation``, docs/synthetic.md) is on by
default; ``--no-domain-randomisation`` writes the original generator's volumes.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main"]

_logger = logging.getLogger("training.synth")


def build_parser() -> argparse.ArgumentParser:
    from napari_tae.synthetic import KINDS

    parser = argparse.ArgumentParser(prog="python -m training synth",
                                     description="Write a seeded synthetic FLAIR dataset with ground truth.")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    group = parser.add_argument_group("counts")
    group.add_argument("--n-train", type=int, default=20, help="healthy training volumes")
    group.add_argument("--n-val", type=int, default=4, help="healthy validation/calibration volumes")
    group.add_argument("--n-test", type=int, default=10, help="test volumes with anomalies")
    group.add_argument("--n-test-healthy", type=int, default=2,
                       help="healthy test volumes (SSIM and false-positive rate)")
    group = parser.add_argument_group("content")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                       help="grid shape in NIfTI order (default: realistic 1-1.3 mm grid)")
    group.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                       help="voxel size in mm (one value or three)")
    group.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                       help="anomaly kinds, taken in turn by the test cases")
    group.add_argument("--kinds-per-case", type=int, default=1)
    group = parser.add_argument_group(
        "domain randomisation",
        "per-subject random contrast, bias, noise, blur, thick slices, gamma, deformation, brain size "
        "and cortex sharpness around the ranges measured on real FLAIR (docs/synthetic.md)")
    group.add_argument("--domain-randomisation", action=argparse.BooleanOptionalAction, default=True,
                       help="randomise every volume (default: on); --no-domain-randomisation writes the "
                            "original generator's volumes (the bundled checkpoints' training data)")
    group.add_argument("--slice-thickness", type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="thick-slice range in mm (default 2 5)")
    group.add_argument("--thick-slice-probability", type=float, metavar="P",
                       help="fraction of volumes acquired in thick slices (default 0.7)")
    group.add_argument("--thick-grid", action="store_true",
                       help="write thick-slice volumes on their own grid (default: interpolated back onto "
                            "the thin grid, so every volume has --shape)")
    group.add_argument("--ms-lesions", choices=("clinical", "sample"),
                       help="MS-like test lesions: 'clinical' 3-15 mm periventricular, juxtacortical and "
                            "deep; 'sample' the original 3-10 mm model (default: clinical with domain "
                            "randomisation, sample without)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder holding a dataset")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from training.data import configure_logging

    configure_logging()
    if min(args.n_train, args.n_val, args.n_test, args.n_test_healthy) < 0:
        parser.error("volume counts must be >= 0")
    if args.spacing is not None and len(args.spacing) not in (1, 3):
        parser.error(f"--spacing takes one or three values, got {len(args.spacing)}")
    if args.shape is not None and min(args.shape) < 16:
        parser.error(f"--shape must be at least 16 voxels per axis, got {args.shape}")
    spacing = None if args.spacing is None else (args.spacing[0] if len(args.spacing) == 1
                                                 else tuple(args.spacing))
    randomisation_options = (args.slice_thickness, args.thick_slice_probability, args.thick_grid or None)
    if not args.domain_randomisation and any(o is not None for o in randomisation_options):
        parser.error("--slice-thickness, --thick-slice-probability and --thick-grid need domain randomisation")
    if args.slice_thickness is not None and not 0 < args.slice_thickness[0] <= args.slice_thickness[1]:
        parser.error(f"--slice-thickness needs 0 < MIN <= MAX, got {args.slice_thickness}")
    if args.thick_slice_probability is not None and not 0 <= args.thick_slice_probability <= 1:
        parser.error(f"--thick-slice-probability must be in [0, 1], got {args.thick_slice_probability}")
    from napari_tae.synthetic import (
        SAMPLE_MS_LESIONS,
        DomainRandomisation,
        MSLesions,
        write_dataset,
    )

    randomisation = None
    if args.domain_randomisation:
        overrides = {}
        if args.slice_thickness is not None:
            overrides["slice_thickness_mm"] = tuple(args.slice_thickness)
        if args.thick_slice_probability is not None:
            overrides["thick_slice_probability"] = args.thick_slice_probability
        randomisation = DomainRandomisation(thick_grid=args.thick_grid, **overrides)
    ms_lesions = {None: None, "clinical": MSLesions(), "sample": SAMPLE_MS_LESIONS}[args.ms_lesions]
    try:
        paths = write_dataset(args.out, args.n_train, args.n_val, args.n_test, args.seed,
                              shape=tuple(args.shape) if args.shape else None, spacing=spacing,
                              kinds=tuple(args.kinds), kinds_per_case=args.kinds_per_case,
                              n_test_healthy=args.n_test_healthy, overwrite=args.overwrite,
                              randomisation=randomisation, ms_lesions=ms_lesions)
    except (FileExistsError, ValueError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    _logger.info("wrote %d train, %d val, %d test (+%d healthy) volumes; manifest %s",
                 len(paths["train"]), len(paths["val"]), len(paths["test_images"]),
                 len(paths["test_healthy"]), paths["manifest"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
