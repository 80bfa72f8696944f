"""Measure FLAIR intensity statistics on the real scans and on synthetic subjects (docs/synthetic.md).

Prints one row of :class:`napari_tae.synthetic.FlairStatistics` per volume: the five real FLAIR
scans of ``../shared/data/real`` (the skull-stripped MS case with its own mask; the four raw heads
with a rough brain mask, see :func:`rough_brain_mask`), then synthetic subjects with and without
domain randomisation, measured by the same function. The generator's default ranges
(``napari_tae.synthetic.DomainRandomisation``) come from the real rows.

Run: ``python benchmarks/real_flair_stats.py [--data DIR] [--synthetic N]``.
"""

from __future__ import annotations

import argparse
from dataclasses import astuple, fields
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image

from napari_tae import synthetic as syn

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def rough_brain_mask(data: np.ndarray, spacing) -> np.ndarray:
    """Brain of a raw FLAIR head (slice axis last): Otsu, in-plane opening, largest component.

    The scalp is a thin bright ring separated from the brain by the dark skull: a 6 mm in-plane
    erosion cuts it off, the largest 3-D component is the brain, and the dilation back (within the
    Otsu foreground) restores its border. The deep CSF (over 15 mm inside each slice's convex
    hull) is added and holes are filled per slice; a final 2-voxel erosion keeps the partial-volume
    border with the skull out. Rough (sulcal CSF is partly lost), which is all that intensity
    statistics need.
    """
    foreground = data > threshold_otsu(data[::2, ::2, :])
    radius = 6.0
    half = [int(np.ceil(radius / s)) for s in spacing[:2]]
    grid = np.ogrid[-half[0]: half[0] + 1, -half[1]: half[1] + 1]
    disc = (np.hypot(grid[0] * spacing[0], grid[1] * spacing[1]) <= radius)[..., None]
    core = ndi.binary_erosion(foreground, disc)
    labels, n = ndi.label(core)
    if n == 0:
        raise ValueError("no brain found")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    brain = ndi.binary_dilation(labels == np.argmax(sizes), disc) & foreground
    # the dark ventricles open onto the interhemispheric fissure in many slices, so hole filling
    # misses them: add what lies over 15 mm inside each slice's convex hull
    for k in range(brain.shape[2]):
        if brain[..., k].any():
            hull = convex_hull_image(brain[..., k])
            brain[..., k] |= ndi.distance_transform_edt(hull, sampling=spacing[:2]) > 15.0
    brain = np.stack([ndi.binary_fill_holes(brain[..., k]) for k in range(brain.shape[2])], -1)
    return ndi.binary_erosion(brain, iterations=2)


def real_volumes(root: Path):
    """(name, data, brain, spacing) of each real scan, slice axis last (as stored)."""
    case = root / "mslub_patient07" / "FLAIR.nii.gz"
    if case.is_file():
        img = nib.load(case)
        data = np.asarray(img.dataobj, np.float32)
        yield case.parent.name, data, data > 0, np.array(img.header.get_zooms()[:3], float)
    for path in sorted((root / "mslub_longitudinal_raw").glob("*.nii.gz")):
        img = nib.load(path)
        data = np.asarray(img.dataobj, np.float32)
        spacing = np.array(img.header.get_zooms()[:3], float)
        yield path.name.split("_FLAIR")[0], data, rough_brain_mask(data, spacing), spacing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the real scans")
    parser.add_argument("--synthetic", type=int, default=6, help="synthetic subjects per setting")
    parser.add_argument("--shape", type=int, nargs=3, default=(132, 156, 126), help="synthetic grid")
    args = parser.parse_args(argv)
    names = [f.name for f in fields(syn.FlairStatistics)]
    print(f"{'volume':24s}" + "".join(f"{n:>10s}" for n in names))

    def row(name: str, stats: syn.FlairStatistics) -> np.ndarray:
        values = np.array(astuple(stats))
        print(f"{name:24s}" + "".join(f"{v:10.3f}" for v in values))
        return values

    real = [row(name, syn.flair_statistics(d, b, s)) for name, d, b, s in real_volumes(args.data)]
    if real:
        real = np.array(real)
        print(f"{'real min':24s}" + "".join(f"{v:10.3f}" for v in real.min(0)))
        print(f"{'real max':24s}" + "".join(f"{v:10.3f}" for v in real.max(0)))
    for label, randomisation in (("synthetic", None), ("randomised", syn.DomainRandomisation())):
        for seed in range(args.synthetic):
            sub = syn.healthy_subject(seed, shape=tuple(args.shape), randomisation=randomisation)
            row(f"{label} {seed}", syn.flair_statistics(sub.data, sub.brain, sub.spacing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
