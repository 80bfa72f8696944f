"""Benchmark of the clinical-input preprocessing (issue 12 target), not a unit test.

Target: brain extraction (deepbet) and N4 bias-field correction together add at most ~15 s to a
CPU run of a typical clinical volume. Uses the first real raw head of
``../shared/data/real/mslub_longitudinal_raw`` when present (a thick-slice clinical FLAIR),
else a synthetic head (``napari_tae.synthetic_head``) on a 1 mm grid.

Run: ``python benchmarks/bench_preprocess.py [--repeats 3] [--threads N]``. Timings are the
median of the repeats (the minimum is shown too, since other processes share the machine); the
first extraction, which loads deepbet's weights, is reported on its own.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from napari_tae.brain import extract_brain, unstripped_reason
from napari_tae.preprocess import PreprocessOptions, bias_correct, prepare_volume

RAW_HEADS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "mslub_longitudinal_raw"
TARGET_S = 15.0


def clinical_volume() -> tuple[str, np.ndarray, tuple[float, float, float]]:
    """(description, napari-order data, spacing) of the volume benchmarked."""
    heads = sorted(RAW_HEADS.glob("*.nii.gz")) if RAW_HEADS.is_dir() else []
    if heads:
        from napari_tae.io import load_volume

        volume = load_volume(heads[0])
        return f"real raw head {heads[0].name}", volume.data, volume.geometry.spacing
    from napari_tae.synthetic import healthy_subject
    from napari_tae.synthetic_head import add_head

    subject = healthy_subject(0, spacing=1.0)
    head = add_head(subject, 0)
    return "synthetic head (1 mm)", head.data.transpose(2, 1, 0), subject.spacing[::-1]


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name, data, spacing = clinical_volume()
    shape = "x".join(str(n) for n in data.shape)
    sp = " x ".join(f"{s:.2f}" for s in spacing)
    print(f"{name}: {shape} voxels (Z, Y, X), {sp} mm, torch threads {torch.get_num_threads()}")
    print(f"looks unstripped: {unstripped_reason(data, spacing)}")

    t0 = time.perf_counter()
    mask = extract_brain(data, spacing)
    first = time.perf_counter() - t0
    bet_times, mask = timed(lambda: extract_brain(data, spacing), args.repeats)
    litres = np.count_nonzero(mask) * float(np.prod(spacing)) / 1e6
    n4_times, _ = timed(lambda: bias_correct(data, mask, spacing), args.repeats)
    options = PreprocessOptions(mm_per_px=1.5, bias_correction=False)
    grid_times, _ = timed(
        lambda: prepare_volume(data, 128, mask=mask, spacing=spacing, options=options), args.repeats
    )

    def row(label: str, times: list[float]) -> float:
        med = statistics.median(times)
        print(f"{label:<42} median {med:6.2f} s   min {min(times):6.2f} s")
        return med

    print(f"{'brain extraction, first call (loads weights)':<42} {first:13.2f} s")
    bet = row(f"brain extraction (deepbet, {litres:.2f} L)", bet_times)
    n4 = row("N4 bias correction (SimpleITK)", n4_times)
    row("normalise + physical slice grid (128 px)", grid_times)
    total = bet + n4
    print(f"extraction + N4: {total:.2f} s = {total / TARGET_S:.2f} x the {TARGET_S:g} s target "
          f"({'met' if total <= TARGET_S else 'NOT met'})")


if __name__ == "__main__":
    main()
