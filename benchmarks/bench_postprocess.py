"""Benchmark of live post-processing (issue 5 targets), not a unit test.

Targets on the 2-core CPU, for a 240 x 240 x 155 volume at kernel 5:
whole volume re-post-processed < 150 ms, visible slice < 10 ms, and >= 10x faster than
``scipy.ndimage.median_filter`` per slice plus threshold, measured in the same run.

Run: ``python benchmarks/bench_postprocess.py [--repeats 15]``. Timings are the median of the
repeats (the minimum is shown too, since other processes share the machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from napari_tae.postprocess import anomaly_mask, lesion_table, slice_mask

SHAPE = (155, 240, 240)  # (Z, Y, X): BraTS-like 240 x 240 x 155


def synthetic_residual(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy residual inside an ellipsoidal brain, with a few bright lesions."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    brain = ((zz - 77) / 70) ** 2 + ((yy - 120) / 100) ** 2 + ((xx - 120) / 85) ** 2 < 1
    r = np.abs(rng.normal(0, 0.012, SHAPE)).astype(np.float32)
    for _ in range(12):
        c = [rng.integers(40, s - 40) for s in SHAPE]
        rad = rng.uniform(2, 10)
        blob = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < rad**2
        r[blob] += rng.uniform(0.05, 0.4)
    r[~brain] = 0
    return r, brain


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) wall time in ms over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--squash", type=float, default=1.0)
    args = parser.parse_args()

    r, brain = synthetic_residual()
    t, k, z = args.squash / 100, 5, SHAPE[0] // 2
    print(f"volume {SHAPE} (Z, Y, X), kernel {k}, squash {args.squash} %, repeats {args.repeats}")

    def scipy_volume() -> np.ndarray:
        return np.stack([ndi.median_filter(r[i], size=k) > t for i in range(SHAPE[0])]) & brain

    ref = scipy_volume()
    fast = anomaly_mask(r, kernel=k, squash=args.squash, brain=brain)
    assert np.array_equal(fast, ref), "fast mask differs from the scipy reference"
    print(f"mask voxels {int(fast.sum())} of {int(brain.sum())} brain voxels; equal to scipy: True")

    vol_fast = timed(lambda: anomaly_mask(r, kernel=k, squash=args.squash, brain=brain), args.repeats)
    sl_fast = timed(
        lambda: slice_mask(r, kernel=k, squash=args.squash, index=z, brain=brain), args.repeats * 10
    )
    sl_scipy = timed(lambda: (ndi.median_filter(r[z], size=k) > t) & brain[z], args.repeats * 3)
    vol_scipy = timed(scipy_volume, max(2, args.repeats // 5))

    rows = [
        ("whole volume, fast (2d, k=5)", vol_fast, 150.0),
        ("visible slice, fast (2d, k=5)", sl_fast, 10.0),
        ("one slice, scipy median + threshold", sl_scipy, None),
        ("whole volume, scipy per slice + threshold", vol_scipy, None),
    ]
    print(f"\n{'':45s} {'median ms':>10s} {'min ms':>9s}  target")
    for name, (med, mn), target in rows:
        verdict = "" if target is None else f"< {target:g} ms: {'PASS' if med < target else 'FAIL'}"
        print(f"{name:45s} {med:10.2f} {mn:9.2f}  {verdict}")
    ratio_vol = vol_scipy[0] / vol_fast[0]
    ratio_sl = sl_scipy[0] / sl_fast[0]
    print(f"\nspeed-up whole volume vs scipy per slice: {ratio_vol:6.1f}x  (>= 10x: "
          f"{'PASS' if ratio_vol >= 10 else 'FAIL'})")
    print(f"speed-up one slice vs scipy one slice:    {ratio_sl:6.1f}x  (>= 10x: "
          f"{'PASS' if ratio_sl >= 10 else 'FAIL'})")

    print("\nother settings, whole volume (median ms):")
    for kernel in (1, 3, 5, 7, 11, 15):
        med2, _ = timed(lambda k=kernel: anomaly_mask(r, kernel=k, squash=args.squash), args.repeats)
        med3, _ = timed(
            lambda k=kernel: anomaly_mask(r, kernel=k, squash=args.squash, mode="3d"), args.repeats
        )
        print(f"  kernel {kernel:2d}: 2d {med2:8.2f}   3d {med3:8.2f}")
    med, _ = timed(
        lambda: anomaly_mask(r, kernel=k, squash=args.squash, brain=brain, min_size=7), args.repeats
    )
    print(f"  kernel 5 + brain + min_size 7 (26-connectivity): {med:8.2f}")
    sl3, _ = timed(
        lambda: slice_mask(r, kernel=k, squash=args.squash, mode="3d", index=z), args.repeats * 10
    )
    print(f"  visible slice, 3d k=5: {sl3:8.2f}")
    med, _ = timed(lambda: lesion_table(fast, r, (1.0, 1.0, 1.0)), args.repeats)
    print(f"  lesion_table on the k=5 mask: {med:8.2f}")


if __name__ == "__main__":
    main()
