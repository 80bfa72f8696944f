"""Benchmark of batch throughput: ``napari-tae segment`` with 1 and 2 (or more) processes.

Times the whole command as a user runs it (interpreter start, model loading in every process,
segmentation, writing), on synthetic volumes, with ``--jobs 1`` (one process, all cores) and
``--jobs N`` (N worker processes, cores / N torch threads each), and prints cases/s per run, the
ratio to one process and whether the masks are identical.

Run: ``python benchmarks/bench_batch.py [--cases 4] [--jobs 1 2] [--checkpoint NAME]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_tae.checkpoint import default_checkpoint
from napari_tae.synthetic import add_anomalies, healthy_volume

ROOT = Path(__file__).resolve().parents[1]


def write_cases(folder: Path, n: int, shape: tuple[int, int, int]) -> None:
    for seed in range(n):
        data, affine = healthy_volume(seed, shape=shape)
        data, _ = add_anomalies(data, seed, kinds=("ms",), affine=affine)
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), folder / f"case{seed:03d}.nii.gz")


def run(inputs: Path, out_dir: Path, checkpoint: str, jobs: int) -> float:
    """Wall seconds of one ``napari-tae segment`` command."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "napari_tae.cli", "-q", "segment", str(inputs), "-m", checkpoint,
               "-o", str(out_dir), "--device", "cpu", "--jobs", str(jobs)]
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - t0


def masks(out_dir: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out_dir.glob("*_mask.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 72, 48), metavar=("X", "Y", "Z"))
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--checkpoint", default=default_checkpoint())
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        write_cases(inputs, args.cases, tuple(args.shape))
        print(f"{args.cases} cases of {tuple(args.shape)} voxels, checkpoint {args.checkpoint}, {cores} cores")
        print(f"{'processes':>9} {'wall s':>8} {'cases/s':>8} {'vs 1':>6}  masks as 1 process")
        reference, base_rate = None, None
        for jobs in args.jobs:
            out_dir = Path(tmp) / f"out_{jobs}"
            seconds = run(inputs, out_dir, args.checkpoint, jobs)
            rate = args.cases / seconds
            found = masks(out_dir)
            if reference is None:
                reference, base_rate = found, rate
            same = found.keys() == reference.keys() and all(np.array_equal(found[k], reference[k]) for k in found)
            print(f"{jobs:>9} {seconds:>8.1f} {rate:>8.3f} {rate / base_rate:>5.2f}x  "
                  f"{'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
