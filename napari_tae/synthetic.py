"""Seeded synthetic FLAIR-like brain volumes with ground-truth anomalies.

Healthy brains are built offline from the MNI152 2009c template and its grey/white-matter
probability maps bundled in the nilearn wheel (read with nibabel, never fetched): tissue maps are
warped with a random affine and a smooth deformation, resampled onto a jittered voxel grid and
given a FLAIR contrast (CSF suppressed, grey matter brighter than white matter), a slice-profile
blur, a texture field, a bias field and Rician noise. The volume is skull-stripped (zero outside
the template's brain mask).

Anomalies (see ``KIND_LABELS``) follow the mix recommended for benchmarking unsupervised anomaly
segmentation in Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in
Brain MR Images", BrainLes 2022 (arXiv:2207.02059) and the project's evaluation protocol: small
ovoid MS-like white-matter lesions, tumour-like masses (oedema, heterogeneous core, optional
necrosis, mass effect), hypointense regions, local deformations and a patch from another subject.

Array convention: every array is in NIfTI voxel order ``(i, j, k)`` of an RAS+ affine (i = left to
right, j = posterior to anterior, k = inferior to superior), so ``nib.Nifti1Image(data, affine)``
is the volume as written on disk. napari order (Z, Y, X) is ``data.transpose(2, 1, 0)`` with
``scale = spacing[::-1]``.

Plain numpy/scipy/nibabel: no torch, no napari, nothing computed at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from napari_tae._atomic import write_text_atomic
from napari_tae.preprocess import fit_normalisation, normalise

__all__ = [
    "KINDS",
    "KIND_LABELS",
    "REAL_FLAIR_RANGES",
    "SAMPLE_MS_LESIONS",
    "DomainRandomisation",
    "FlairStatistics",
    "MSLesions",
    "Subject",
    "add_anomalies",
    "flair_statistics",
    "healthy_subject",
    "healthy_volume",
    "sample_case",
    "template_paths",
    "thick_slices",
    "write_dataset",
]

KINDS: tuple[str, ...] = ("ms", "tumour", "dark", "deformation", "foreign_patch")
# One integer per anomaly type in the label maps; 0 is background.
KIND_LABELS: dict[str, int] = {k: i + 1 for i, k in enumerate(KINDS)}

_TEMPLATE_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
# Field of view of the synthetic grid in mm (the template's own extent), centred on the brain.
_FOV_MM = np.array([197.0, 233.0, 189.0])


# ----------------------------------------------------------------------------- template


def template_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009 T1, GM and WM files bundled in the installed nilearn wheel.

    Raises FileNotFoundError (naming the file) when nilearn or a file is missing; never downloads.
    """
    spec = importlib.util.find_spec("nilearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed: the MNI152 template files it bundles are needed")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {k: data_dir / _TEMPLATE_NAME.format(k) for k in ("t1", "gm", "wm")}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: MNI152 template file missing from the nilearn wheel")
    return paths


@dataclass(frozen=True)
class _Template:
    gm: np.ndarray  # float32 probability maps on the (possibly block-averaged) template grid
    wm: np.ndarray
    brain: np.ndarray  # float32 soft brain mask (block average of the binary mask)
    affine: np.ndarray  # voxel -> mm of this grid
    centre_mm: np.ndarray  # centre of the brain bounding box, mm


@functools.lru_cache(maxsize=4)
def _template(factor: int = 1) -> _Template:
    """Template tissue maps, block-averaged by an integer factor (anti-aliasing for coarse grids)."""
    if factor > 1:
        full = _template(1)
        f = factor

        def block(a: np.ndarray) -> np.ndarray:
            s = [n // f * f for n in a.shape]
            a = a[: s[0], : s[1], : s[2]]
            return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5), dtype=np.float32)

        # coarse voxel u covers fine voxels f*u .. f*u+f-1: centre at f*u + (f-1)/2
        to_fine = np.diag([f, f, f, 1.0])
        to_fine[:3, 3] = (f - 1) / 2
        return _Template(block(full.gm), block(full.wm), block(full.brain), full.affine @ to_fine, full.centre_mm)
    paths = template_paths()
    imgs = {k: nib.load(str(p)) for k, p in paths.items()}
    brain = np.asarray(imgs["t1"].dataobj) > 0  # the bundled T1 is skull-stripped (0 outside the brain)
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    gm *= brain
    wm *= brain
    idx = np.argwhere(brain)
    centre_vox = (idx.min(0) + idx.max(0)) / 2.0
    affine = imgs["t1"].affine.astype(np.float64)
    centre_mm = affine[:3, :3] @ centre_vox + affine[:3, 3]
    return _Template(gm, wm, brain.astype(np.float32), affine, centre_mm)


# ----------------------------------------------------------------------------- helpers


def _basis(n: int, n_ctrl: int) -> np.ndarray:
    """(n, n_ctrl) Gaussian bumps centred on evenly spaced control points: a smooth 1-D basis."""
    n_ctrl = max(int(n_ctrl), 2)
    pos = np.linspace(0.0, n - 1.0, n_ctrl)
    width = max((n - 1.0) / (n_ctrl - 1.0), 1.0)
    return np.exp(-0.5 * ((np.arange(n)[:, None] - pos[None]) / width) ** 2).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], ctrl: tuple[int, ...]) -> np.ndarray:
    """Random smooth field (zero mean, unit std) as a separable basis expansion.

    Three small tensor contractions instead of an upsampling pass over the whole grid: the cost is a
    few multiply-adds per voxel.
    """
    c = rng.standard_normal(tuple(max(int(n), 2) for n in ctrl)).astype(np.float32)
    wx, wy, wz = (_basis(n, k) for n, k in zip(shape, c.shape))
    f = np.einsum("ia,abc->ibc", wx, c)
    f = np.einsum("jb,ibc->ijc", wy, f)
    f = (f.reshape(-1, c.shape[2]) @ wz.T).reshape(shape)
    f -= f.mean()
    std = f.std()
    return f / std if std > 0 else f


def _ctrl(shape: tuple[int, ...], spacing, every_mm: float) -> tuple[int, ...]:
    """Number of control points per axis for one control point every `every_mm`."""
    return tuple(int(np.ceil(n * s / every_mm)) + 1 for n, s in zip(shape, spacing))


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (Rician)."""
    re = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    im = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


# ----------------------------------------------------------------------------- healthy


@dataclass
class Subject:
    """A synthetic healthy subject (arrays in NIfTI voxel order, see the module docstring).

    ``gm``, ``wm``, ``csf`` are the warped tissue probability maps (float32, 0 outside the brain);
    ``wm_level`` is the white-matter intensity before bias and noise (the contrast reference);
    ``noise`` the Rician sigma in the same units.
    """

    data: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    spacing: tuple[float, float, float]
    wm_level: float
    noise: float
    params: dict


def _grid(shape, spacing, rng) -> tuple[tuple[int, int, int], np.ndarray]:
    """Output shape and spacing: jittered 1-1.3 mm voxels, or the template FOV over `shape`."""
    if spacing is None:
        if shape is None:
            # mostly isotropic voxels of 1-1.25 mm with a little per-axis anisotropy, at most 1.3 mm
            spacing = np.clip(rng.uniform(1.0, 1.25) * rng.uniform(0.97, 1.05, 3), 1.0, 1.3)
        else:
            # fit the template FOV in the requested shape, a little larger FOV for variety
            spacing = _FOV_MM / np.asarray(shape, float) * rng.uniform(1.0, 1.08)
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,)).copy()
    if np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    if shape is None:
        shape = tuple(int(round(n)) for n in _FOV_MM / spacing)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shape}")
    return shape, spacing


#: (min, max) of each `FlairStatistics` over the five real FLAIR scans of ../shared/data/real, as
#: measured by ``benchmarks/real_flair_stats.py`` (docs/synthetic.md). ``brain_ml`` of the raw
#: heads is that of a rough mask (sulcal CSF partly lost): not a target.
REAL_FLAIR_RANGES: dict[str, tuple[float, float]] = {
    "csf": (0.155, 0.231),
    "wm": (0.600, 0.647),
    "gm": (0.785, 0.823),
    "gm_wm": (1.249, 1.309),
    "csf_wm": (0.252, 0.380),
    "wm_spread": (0.092, 0.117),
    "noise": (0.035, 0.048),
    "edge": (0.207, 0.263),
    "bias": (0.018, 0.049),
    "median": (0.673, 0.719),
    "brain_ml": (893.0, 1130.0),
}


@dataclass(frozen=True)
class DomainRandomisation:
    """Ranges of the per-subject domain randomisation of `healthy_subject` (SynthSeg-style).

    Each subject draws one value uniformly from every ``(low, high)`` range (probabilities are
    Bernoulli draws). The defaults bracket what ``benchmarks/real_flair_stats.py`` measured on the
    five real FLAIR scans (see ``docs/synthetic.md``): with them the generated volumes' statistics
    fall within or around the real ones. Contrasts are relative to white matter = 1, before the
    gamma change; noise and bias are relative to white matter too.
    """

    #: grey / white matter intensity (real k-means centre ratio 1.25-1.31 after normalisation)
    gm_wm: tuple[float, float] = (1.15, 1.35)
    #: CSF / white matter intensity (real dark-class ratio 0.25-0.38 after normalisation)
    csf_wm: tuple[float, float] = (0.05, 0.30)
    #: amplitudes of the ~8 mm and ~3 mm within-tissue textures (with the noise they make the
    #: real white-matter spread of 9-12 %; the fine one gives real scans' grain of vessels and
    #: small sulci, which the averaged template lacks)
    texture: tuple[float, float] = (0.02, 0.05)
    fine_texture: tuple[float, float] = (0.03, 0.07)
    #: std over the brain of the smooth log bias field (real quadratic fit 0.02-0.05, which the
    #: white-matter class selection flattens: the drawn field is about twice the measured one)
    bias: tuple[float, float] = (0.02, 0.1)
    #: one bias control point every this many mm (larger = smoother)
    bias_every_mm: tuple[float, float] = (80.0, 160.0)
    #: noise sigma (real in-plane neighbour-difference estimate 3.5-4.8 % of white matter)
    noise: tuple[float, float] = (0.015, 0.045)
    #: probability of Rician (magnitude) noise; Gaussian noise clipped at 0 otherwise
    rician_probability: float = 0.5
    #: in-plane Gaussian blur sigma, mm (reconstruction filters, motion)
    blur_mm: tuple[float, float] = (0.2, 1.2)
    #: probability of a thick-slice acquisition and its slice thickness in mm (clinical 3-4 mm);
    #: a thickness not above the grid's slice spacing leaves the volume as it is
    thick_slice_probability: float = 0.7
    slice_thickness_mm: tuple[float, float] = (2.0, 5.0)
    #: thick slices: True returns the thick-slice grid (its own affine), False the volume
    #: interpolated back onto the thin grid (fixed shape for training); see `thick_slices`
    thick_grid: bool = False
    #: log of the gamma exponent applied to intensities relative to white matter
    log_gamma: tuple[float, float] = (-0.1, 0.3)
    #: smooth elastic deformation: displacement std in mm and control-point spacing in mm
    deformation_mm: tuple[float, float] = (1.0, 3.5)
    deformation_every_mm: tuple[float, float] = (25.0, 45.0)
    #: global brain scale (the MNI template brain is larger than most real brains)
    brain_scale: tuple[float, float] = (0.84, 0.98)
    #: exponent sharpening the warped tissue maps (the template is an average, blurrier than a
    #: single brain): p_c <- p_c^k / sum p^k; 1 keeps the maps
    sharpness: tuple[float, float] = (1.0, 2.2)
    #: depth of the sulcal CSF drawn into the cortex (fraction of grey matter turned to CSF on
    #: the sulcal ridges); the averaged template has almost no visible sulci
    sulci: tuple[float, float] = (0.4, 0.9)
    #: brightening of the thin periventricular rim that normal FLAIR shows (at the wall)
    ventricle_rim: tuple[float, float] = (0.0, 0.3)

    def draw(self, rng: np.random.Generator) -> dict:
        """One subject's values (the keys of this dataclass, plus ``thick``/``rician`` booleans)."""
        out: dict = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, tuple):
                continue
            low, high = value
            if low > high:
                raise ValueError(f"DomainRandomisation.{field.name}: low {low} > high {high}")
            out[field.name] = float(rng.uniform(low, high))
        out["rician"] = bool(rng.random() < self.rician_probability)
        out["thick"] = bool(rng.random() < self.thick_slice_probability)
        out["thick_grid"] = bool(self.thick_grid)
        return out


def thick_slices(volume: np.ndarray, spacing: float, thickness: float) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume thick slices along the last axis: contiguous slabs of `thickness` mm.

    Slab ``j`` covers ``[j T, (j + 1) T)`` mm from the lower edge of thin voxel 0 (T the
    thickness) and is the average of the thin voxels weighted by their overlap with it (a box
    slice profile); slabs that would run past the last thin voxel are dropped.

    Returns
    -------
    (thick, index_affine)
        The thick volume and the 4x4 map from thick voxel indices to thin voxel indices
        (``thin_affine @ index_affine`` is the thick grid's affine).
    """
    n = volume.shape[-1]
    m = float(thickness) / float(spacing)  # slab thickness in thin voxels
    if m < 1.0:
        raise ValueError(f"slice thickness {thickness} mm is below the voxel size {spacing} mm")
    n_thick = int(np.floor(n / m + 1e-9))
    if n_thick < 1:
        raise ValueError(f"slice thickness {thickness} mm exceeds the field of view ({n} x {spacing} mm)")
    lo = np.arange(n_thick)[:, None] * m - 0.5  # slab edges in thin-index units
    edges = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(edges + 0.5, lo + m) - np.maximum(edges - 0.5, lo), 0.0, None)
    weights = (overlap / m).astype(np.float32)  # (n_thick, n); rows sum to 1
    thick = np.tensordot(volume.astype(np.float32), weights.T, axes=([volume.ndim - 1], [0]))
    index_affine = np.eye(4)
    index_affine[2, 2] = m
    index_affine[2, 3] = -0.5 + 0.5 * m  # centre of slab 0
    return thick.astype(np.float32), index_affine


def _thin_from_thick(thick: np.ndarray, index_affine: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of thick slices back to the thin slice centres (edge slabs held)."""
    u = np.clip((np.arange(n) - index_affine[2, 3]) / index_affine[2, 2], 0.0, thick.shape[-1] - 1)
    j0 = np.minimum(np.floor(u).astype(int), thick.shape[-1] - 1)
    j1 = np.minimum(j0 + 1, thick.shape[-1] - 1)
    f = (u - j0).astype(np.float32)
    return thick[..., j0] * (1.0 - f) + thick[..., j1] * f


def _sharpen(maps: list[np.ndarray], k: float) -> list[np.ndarray]:
    """Power-normalise tissue probabilities (p^k / sum p^k): crisper boundaries, same total."""
    powered = [np.power(np.maximum(p, 0.0), np.float32(k)) for p in maps]
    total = sum(powered)
    scale = np.where(total > 0, sum(maps) / np.maximum(total, 1e-12), 0.0).astype(np.float32)
    return [p * scale for p in powered]


def _depth(brain: np.ndarray, spacing) -> np.ndarray:
    """Distance to the outside of the brain in mm, on a 2x coarser grid read back by nearest voxel.

    Placement only needs a few mm of accuracy, and a full-resolution distance map of the box costs
    more than the rest of a subject.
    """
    coarse = ndi.distance_transform_edt(brain[::2, ::2, ::2], sampling=np.asarray(spacing) * 2)
    return coarse[np.ix_(*(np.arange(n) // 2 for n in brain.shape))].astype(np.float32)


def _sulcal_ridges(gm: np.ndarray, wm: np.ndarray, depth: np.ndarray, spacing) -> np.ndarray:
    """Cortical grey-matter voxels farthest from white matter between two banks: where sulci run.

    The averaged template has the cortical ribbon but hardly any sulcal CSF. Within grey matter,
    the distance to white matter peaks midway between the white-matter cores of two gyri, i.e. on
    the sulcal fundus and walls; those ridge voxels become CSF. Sulci are sheets reaching in from
    the surface: ridges deeper than 15 mm or in small pieces (the deep grey nuclei, the insula)
    would be dark dots that no FLAIR shows, and are dropped.
    """
    dist = ndi.distance_transform_edt(wm < 0.5, sampling=spacing).astype(np.float32)
    ridge = (dist >= ndi.maximum_filter(dist, size=3)) & (gm > 0.5) & (dist > 1.0) & (depth < 15.0)
    labels, n = ndi.label(ridge, np.ones((3, 3, 3), bool))
    if n:
        sizes = np.bincount(labels.ravel())
        min_voxels = 20.0 / float(np.prod(spacing))  # 20 mm^3
        ridge = (sizes >= min_voxels)[labels] & ridge
    return ndi.gaussian_filter(ridge.astype(np.float32), 0.5)


def _ventricle_rim(csf: np.ndarray, depth: np.ndarray, spacing) -> np.ndarray:
    """Thin band (about 1.5 mm) of tissue lining the ventricles, 1 at the wall.

    Normal FLAIR shows a bright periventricular rim (ependyma, CSF flow); a model trained without
    it takes every ventricle border of a real scan for an anomaly.
    """
    ventricles = (csf > 0.5) & (depth > 15.0)
    if not ventricles.any():
        return np.zeros(csf.shape, np.float32)
    dist = ndi.distance_transform_edt(~ventricles, sampling=spacing).astype(np.float32)
    return np.exp(-((dist / np.float32(1.5)) ** 2)) * (csf < 0.5)


def healthy_subject(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: float | tuple[float, float, float] | None = None,
    deformation_mm: float = 2.5,
    noise: float | None = None,
    bias: float = 0.2,
    randomisation: DomainRandomisation | None = None,
) -> Subject:
    """Generate one healthy FLAIR-like subject.

    Parameters
    ----------
    seed
        Seed of all randomness: the same seed and options give the same volume.
    shape
        Output shape (i, j, k). None: the template field of view (197 x 233 x 189 mm) at a random
        1-1.3 mm voxel size (about 150-197 voxels per axis). Given without ``spacing``: the voxel
        size is chosen so the field of view fits, e.g. ``(64, 80, 64)`` gives about 3 mm voxels.
    spacing
        Voxel size in mm (scalar or per axis); None for the random or fitted size described above.
    deformation_mm
        Standard deviation of the smooth random displacement field (ignored with ``randomisation``).
    noise
        Rician noise sigma relative to white matter; None draws it in [0.02, 0.05] (with
        ``randomisation``: from its range; a value given here wins).
    bias
        Strength of the multiplicative bias field (log-amplitude std; ignored with
        ``randomisation``).
    randomisation
        None (default): the original generator, unchanged (the napari sample and the bundled
        checkpoints' data depend on it). A `DomainRandomisation`: per-subject random contrasts,
        bias, noise type and level, blur, thick slices, gamma, deformation, brain size and
        cortex sharpness drawn from its ranges (``params["randomisation"]`` records the draw).

    Returns
    -------
    Subject
        ``data`` float32, zero outside ``brain`` (skull-stripped), with its RAS affine. With
        ``randomisation.thick_grid`` and a thick-slice draw, every array is on the thick grid.
    """
    rng = np.random.default_rng([int(seed), 0x5EED])
    shape, spacing = _grid(shape, spacing, rng)
    dr = None if randomisation is None else randomisation.draw(rng)
    if dr is not None:
        deformation_mm = dr["deformation_mm"]
    # block-average the template when the grid is coarse so the resampling does not alias
    factor = int(max(1, np.floor(spacing.min() / 1.5)))
    tpl = _template(factor)

    # output voxel -> world mm: axis-aligned RAS grid centred on the brain, small random offset
    out_aff = np.diag([*spacing, 1.0])
    fov_centre = tpl.centre_mm + rng.uniform(-4.0, 4.0, 3)
    out_aff[:3, 3] = fov_centre - spacing * (np.asarray(shape) - 1) / 2.0

    # subject anatomy = template under a random similarity-ish transform; we need its inverse
    # (world point of the subject -> template point) to pull template values onto the grid
    angles = np.deg2rad(rng.uniform(-6.0, 6.0, 3))
    global_scale = rng.uniform(0.92, 1.08) if dr is None else dr["brain_scale"]
    scales = global_scale * rng.uniform(0.97, 1.03, 3)
    shift = rng.uniform(-5.0, 5.0, 3)
    lin = _rotation(angles) @ np.diag(1.0 / scales)
    world_to_tpl = np.eye(4)
    world_to_tpl[:3, :3] = lin
    world_to_tpl[:3, 3] = tpl.centre_mm - lin @ (tpl.centre_mm + shift)
    h = np.linalg.inv(tpl.affine) @ world_to_tpl @ out_aff  # output voxel -> template voxel
    tpl_step = np.abs(np.diag(tpl.affine)[:3])

    # bounding box of the brain on the output grid (coarse pass) so the expensive resampling and
    # field synthesis only touch the region that can contain tissue
    step = 4
    cg = [np.arange(0, n, step) for n in shape]
    cc = np.stack(np.meshgrid(*cg, indexing="ij"), 0).reshape(3, -1).astype(float)
    tv = h[:3, :3] @ cc + h[:3, 3:4]
    tbrain = ndi.map_coordinates(tpl.brain, tv, order=0, mode="constant", cval=0.0) > 0
    if not tbrain.any():
        raise ValueError(f"no brain on the requested grid (shape {shape}, spacing {tuple(spacing)})")
    inside = cc[:, tbrain]
    margin = np.ceil((3 * deformation_mm + 8.0) / spacing) + step
    lo = np.maximum(inside.min(1) - margin, 0).astype(int)
    hi = np.minimum(inside.max(1) + margin + 1, shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape = tuple(int(b - a) for a, b in zip(lo, hi))

    # template voxel coordinates of every box voxel: exact affine part by broadcasting, plus a
    # smooth displacement (mm in template space -> template voxels)
    axes = [np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)]
    ctrl = _ctrl(bshape, spacing, 30.0 if dr is None else dr["deformation_every_mm"])
    coords = []
    for d in range(3):
        c = (
            np.float32(h[d, 0]) * axes[0][:, None, None]
            + np.float32(h[d, 1]) * axes[1][None, :, None]
            + np.float32(h[d, 2]) * axes[2][None, None, :]
            + np.float32(h[d, 3])
        )
        if deformation_mm > 0:
            c += _smooth_field(rng, bshape, ctrl) * np.float32(deformation_mm / tpl_step[d])
        coords.append(c)

    def pull(a: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        out[box] = ndi.map_coordinates(a, coords, order=1, mode="constant", cval=0.0, prefilter=False)  # noqa: F821 - the enclosing scope's coords, freed after the last pull
        return out

    soft = pull(tpl.brain)
    gm = pull(tpl.gm)
    wm = pull(tpl.wm)
    del coords
    brain = soft > 0.5
    # keep the largest component only (resampling can leave specks at the cut brain stem)
    lab, n = ndi.label(brain[box])
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        brain[box] = lab == np.argmax(sizes)
    gm *= brain
    wm *= brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    if dr is not None:
        g, w, c = _sharpen([gm[box], wm[box], csf[box]], dr["sharpness"])
        depth = _depth(brain[box], spacing)
        sulcal = np.float32(dr["sulci"]) * _sulcal_ridges(g, w, depth, spacing) * g
        gm[box], wm[box], csf[box] = g - sulcal, w, c + sulcal

    # FLAIR contrast relative to white matter = 1: CSF suppressed, GM brighter than WM
    i_gm = rng.uniform(1.2, 1.45) if dr is None else dr["gm_wm"]
    i_csf = rng.uniform(0.08, 0.3) if dr is None else dr["csf_wm"]
    params = dict(
        seed=int(seed),
        shape=list(shape),
        spacing=[float(s) for s in spacing],
        rotation_deg=[float(a) for a in np.rad2deg(angles)],
        scale=[float(s) for s in scales],
        shift_mm=[float(s) for s in shift],
        contrast=dict(wm=1.0, gm=float(i_gm), csf=float(i_csf)),
    )
    g, w, c = gm[box], wm[box], csf[box]
    img = np.float32(i_gm) * g + w + np.float32(i_csf) * c
    if dr is not None:
        img *= 1.0 + np.float32(dr["ventricle_rim"]) * _ventricle_rim(c, depth, spacing)
    # within-tissue texture (a few percent, ~8 mm scale): templates are too smooth otherwise
    texture = rng.uniform(0.02, 0.04) if dr is None else dr["texture"]
    img *= 1.0 + np.float32(texture) * _smooth_field(rng, bshape, _ctrl(bshape, spacing, 8.0))
    if dr is not None:
        img *= 1.0 + np.float32(dr["fine_texture"]) * _smooth_field(rng, bshape, _ctrl(bshape, spacing, 3.0))
        return _randomised(rng, dr, img, box, brain, gm, wm, csf, out_aff, spacing, noise, params)
    # slice-profile blur along the slice axis (thicker slices = more partial volume)
    blur = rng.uniform(0.0, 0.7)
    if blur > 0.05:
        img = ndi.gaussian_filter1d(img, blur, axis=2, mode="nearest")
    img *= np.exp(np.float32(bias) * _smooth_field(rng, bshape, _ctrl(bshape, spacing, 90.0)))
    sigma = float(rng.uniform(0.02, 0.05) if noise is None else noise)
    img = _rician(rng, img, sigma)
    scale = float(rng.uniform(300.0, 1500.0))  # arbitrary scanner units
    img *= np.float32(scale)
    data = np.zeros(shape, np.float32)
    data[box] = img
    data *= brain
    params.update(blur_vox=float(blur), noise=sigma, intensity_scale=scale, bias=float(bias))
    return Subject(
        data=data,
        affine=out_aff,
        brain=brain,
        gm=gm,
        wm=wm,
        csf=csf,
        spacing=tuple(float(s) for s in spacing),
        wm_level=scale,
        noise=sigma * scale,
        params=params,
    )


def _randomised(
    rng: np.random.Generator,
    dr: dict,
    img: np.ndarray,
    box: tuple[slice, ...],
    brain: np.ndarray,
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    affine: np.ndarray,
    spacing: np.ndarray,
    noise: float | None,
    params: dict,
) -> Subject:
    """Acquisition half of a randomised subject: bias, gamma, blur, thick slices, noise, scale.

    Order of a real acquisition: the object (tissue contrast, texture) is modulated by the coil
    sensitivity (bias) and imaged with the scanner's point spread (in-plane blur, slice profile);
    noise is added to each acquired voxel, i.e. on the thick-slice grid.
    """
    bshape = img.shape
    # log-bias with zero mean and std dr["bias"] over the brain (what the measurement sees)
    field = _smooth_field(rng, bshape, _ctrl(bshape, spacing, dr["bias_every_mm"]))
    inside = field[brain[box]]
    field = (field - inside.mean()) / max(float(inside.std()), 1e-6)
    img *= np.exp(np.float32(dr["bias"]) * field)
    # gamma relative to white matter (= 1): contrast changes keep the white-matter reference
    img = np.power(np.maximum(img, 0.0), np.float32(np.exp(dr["log_gamma"])))
    if dr["blur_mm"] > 0:
        img = ndi.gaussian_filter(img, (dr["blur_mm"] / spacing[0], dr["blur_mm"] / spacing[1], 0.0))
    clean = np.zeros(brain.shape, np.float32)
    clean[box] = img
    clean *= brain
    thick = None
    if dr["thick"] and dr["slice_thickness_mm"] > spacing[2]:
        clean, thick = thick_slices(clean, spacing[2], dr["slice_thickness_mm"])
    sigma = float(dr["noise"] if noise is None else noise)
    data = _rician(rng, clean, sigma) if dr["rician"] else np.maximum(
        clean + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32), 0.0)
    maps = [brain.astype(np.float32), gm, wm, csf]
    if thick is not None and dr["thick_grid"]:
        maps = [thick_slices(m, spacing[2], dr["slice_thickness_mm"])[0] for m in maps]
        affine = affine @ thick
        spacing = np.array([spacing[0], spacing[1], spacing[2] * thick[2, 2]])
    elif thick is not None:
        data = _thin_from_thick(data, thick, brain.shape[2])
    brain = maps[0] > 0.5
    scale = float(rng.uniform(300.0, 1500.0))  # arbitrary scanner units
    data = (data * np.float32(scale)) * brain
    params.update(
        noise=sigma, intensity_scale=scale,
        randomisation={k: (float(v) if not isinstance(v, bool) else v) for k, v in dr.items()},
        slice_thickness_mm=float(dr["slice_thickness_mm"]) if thick is not None else None,
    )
    params["spacing"] = [float(s) for s in spacing]
    params["shape"] = list(data.shape)
    return Subject(
        data=data.astype(np.float32),
        affine=affine,
        brain=brain,
        gm=maps[1] * brain,
        wm=maps[2] * brain,
        csf=maps[3] * brain,
        spacing=tuple(float(s) for s in spacing),
        wm_level=scale,
        noise=sigma * scale,
        params=params,
    )


def healthy_volume(
    seed: int,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: float | tuple[float, float, float] | None = None,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Healthy FLAIR-like volume and its 4x4 RAS affine (see `healthy_subject` for options)."""
    s = healthy_subject(seed, shape=shape, spacing=spacing, **kwargs)
    return s.data, s.affine


# ----------------------------------------------------------------------------- anomalies


@dataclass
class _Canvas:
    """Working state of `add_anomalies`: the image being edited and what placement needs."""

    data: np.ndarray
    brain: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    spacing: np.ndarray
    labels: np.ndarray
    level: float  # white-matter intensity
    noise: float  # absolute noise sigma
    stride: int  # subsampling of the placement maps
    depth: np.ndarray  # distance to the brain boundary, mm, on the strided grid

    def strided(self, a: np.ndarray) -> np.ndarray:
        return a[:: self.stride, :: self.stride, :: self.stride]

    def pick(self, rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray | None:
        """A random voxel (full-grid index) among strided candidates not yet labelled."""
        idx = np.flatnonzero(candidates & (self.strided(self.labels) == 0))
        if idx.size == 0:
            return None
        return np.array(np.unravel_index(rng.choice(idx), candidates.shape)) * self.stride

    def box(self, centre: np.ndarray, radius_mm: float) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Slices of a box around `centre` and its open-grid coordinates in mm relative to it."""
        r = np.ceil(radius_mm / self.spacing).astype(int) + 1
        lo = np.maximum(centre - r, 0)
        hi = np.minimum(centre + r + 1, self.data.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        rel = np.ogrid[sl]
        rel = [((g - c) * s).astype(np.float32) for g, c, s in zip(rel, centre, self.spacing)]
        return sl, rel

    def local_level(self, sl: tuple[slice, ...]) -> float:
        """White-matter intensity near the anomaly (follows the bias field)."""
        vals = self.data[sl][(self.wm[sl] > 0.8) & self.brain[sl]]
        return float(np.median(vals)) if vals.size >= 20 else self.level

    def paint(self, rng, sl, alpha: np.ndarray, target: np.ndarray | float) -> None:
        """Blend towards `target` with weight alpha, with fresh noise so texture stays plausible."""
        x = self.data[sl]
        noisy = target + np.float32(self.noise) * rng.standard_normal(x.shape, dtype=np.float32)
        x += alpha * (np.maximum(noisy, 0.0) - x)

    def warp(self, sl: tuple[slice, ...], src: list[np.ndarray]) -> None:
        """Resample the box contents at source coordinates (box voxel indices): a deformation."""
        for a in (self.data, self.wm, self.csf):
            a[sl] = ndi.map_coordinates(a[sl], src, order=1, mode="nearest", prefilter=False)
        self.data[sl] *= self.brain[sl]


def _ellipsoid_q(rng: np.random.Generator, rel: list[np.ndarray], semi_axes) -> np.ndarray:
    """Normalised ellipsoidal distance (1 on the surface) with a random orientation."""
    rot = _rotation(rng.uniform(-np.pi, np.pi, 3))
    q = np.zeros(np.broadcast_shapes(*(r.shape for r in rel)), np.float32)
    for d in range(3):
        u = rot[0, d] * rel[0] + rot[1, d] * rel[1] + rot[2, d] * rel[2]
        q += (u / np.float32(semi_axes[d])) ** 2
    return np.sqrt(q)


def _irregular(rng, q: np.ndarray, spacing, amount: float, every_mm: float = 6.0) -> np.ndarray:
    """Perturb a normalised distance with smooth noise so blobs are not perfect ellipsoids."""
    return q + np.float32(amount) * _smooth_field(rng, q.shape, _ctrl(q.shape, spacing, every_mm))


@dataclass(frozen=True)
class MSLesions:
    """Where MS-like lesions go and how big they are (longest diameter, mm).

    Each lesion is periventricular (white matter 1.5-8 mm from a ventricle) with probability
    ``periventricular``, juxtacortical (white matter touching the cortex) with probability
    ``juxtacortical``, and deep white matter otherwise. `SAMPLE_MS_LESIONS` is the original model
    (the napari sample's lesions: 3-10 mm, 1.4-1.9 x white matter, which mostly saturates the
    normalisation window); the defaults here follow the clinical description of MS lesions
    (3-15 mm, periventricular and juxtacortical predilection) with real-like intensities.
    """

    diameter_mm: tuple[float, float] = (3.0, 15.0)
    periventricular: float = 0.45
    juxtacortical: float = 0.3
    #: lesion core intensity relative to the surrounding white matter; from subtle to bright (the
    #: real MS case's lesion voxels: median 1.45, 10-90 % 1.23-1.74, see docs/synthetic.md)
    intensity: tuple[float, float] = (1.2, 1.7)


#: The generator's original MS lesions (3-10 mm, periventricular or deep), used by default by
#: `add_anomalies` so that the napari sample stays the same volume.
SAMPLE_MS_LESIONS = MSLesions(diameter_mm=(3.0, 10.0), periventricular=0.6, juxtacortical=0.0, intensity=(1.4, 1.9))


def _ms(cv: _Canvas, rng: np.random.Generator, n: int, model: MSLesions = SAMPLE_MS_LESIONS) -> None:
    """Small ovoid hyperintense white-matter lesions: periventricular, juxtacortical or deep."""
    s_wm, s_csf = cv.strided(cv.wm), cv.strided(cv.csf)
    # ventricles: CSF well inside the brain (sulcal CSF lies near the surface)
    vent = (s_csf > 0.5) & (cv.depth > 15.0)
    vdist = ndi.distance_transform_edt(~vent, sampling=cv.spacing * cv.stride) if vent.any() else None
    cortex_dist = None
    if model.juxtacortical > 0:
        cortex = (np.clip(1.0 - s_wm - s_csf, 0.0, 1.0) > 0.5) & cv.strided(cv.brain) & (cv.depth < 12.0)
        if cortex.any():
            cortex_dist = ndi.distance_transform_edt(~cortex, sampling=cv.spacing * cv.stride)
    lab = KIND_LABELS["ms"]
    for _ in range(n):
        # one draw picks the site: [0, pv) periventricular, [pv, pv + jc) juxtacortical, else deep
        u = rng.random() if (vdist is not None or model.juxtacortical > 0) else 1.0
        if vdist is not None and u < model.periventricular:
            cand = (s_wm > 0.7) & (vdist > 1.5) & (vdist < 8.0)
        elif cortex_dist is not None and model.periventricular <= u < model.periventricular + model.juxtacortical:
            cand = (s_wm > 0.5) & (cortex_dist <= 2.0 * cv.spacing.max() * cv.stride)
        else:
            cand = (s_wm > 0.85) & (cv.depth > 10.0)
        c = cv.pick(rng, cand)
        if c is None:
            c = cv.pick(rng, (s_wm > 0.5) & (cv.depth > 3.0))
        if c is None:
            continue
        a = rng.uniform(model.diameter_mm[0] / 2.0, model.diameter_mm[1] / 2.0)
        axes = np.array([a, a * rng.uniform(0.45, 0.9), a * rng.uniform(0.45, 0.9)])
        # at coarse resolution a lesion must still cover at least a voxel or two
        axes = np.maximum(axes, 0.75 * cv.spacing.max())
        sl, rel = cv.box(c, 1.3 * axes.max())
        q = _ellipsoid_q(rng, rel, axes)
        alpha = (1.0 - _smoothstep(0.75, 1.25, q)) * cv.brain[sl] * (cv.csf[sl] < 0.5)
        target = rng.uniform(*model.intensity) * cv.local_level(sl)
        cv.paint(rng, sl, alpha, target)
        cv.labels[sl][alpha >= 0.5] = lab


def _mass_effect(cv: _Canvas, sl, rel, centre: np.ndarray, rho: float, reach: float) -> None:
    """Push tissue radially away from the centre as if a ball of radius rho had been inserted.

    A source radius r_src = cbrt(r^3 - rho^3 g(r)) conserves volume near the mass and tapers to
    the identity through g(r) = exp(-(r / reach)^2); it is monotonic, so the warp does not fold.
    """
    r = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2)
    g = np.exp(-((r / np.float32(reach)) ** 2))
    r_src = np.cbrt(np.maximum(r**3 - np.float32(rho**3) * g, 0.0))
    ratio = np.where(r > 0, r_src / np.maximum(r, 1e-6), 0.0).astype(np.float32)
    # box voxel index of the source point: centre + (x - centre) * ratio
    src = [
        np.broadcast_to(centre[d] - sl[d].start + rel[d] / np.float32(cv.spacing[d]) * ratio, r.shape)
        for d in range(3)
    ]
    cv.warp(sl, src)


def _tumour(cv: _Canvas, rng: np.random.Generator) -> None:
    """Tumour-like mass: hyperintense oedema, heterogeneous core, optional necrosis, mass effect."""
    s_wm = cv.strided(cv.wm)
    radius = rng.uniform(12.0, 24.0)
    c = None
    while c is None and radius >= 5.0:
        c = cv.pick(rng, (s_wm > 0.5) & (cv.depth > radius + 3.0))
        if c is None:
            radius *= 0.8
    if c is None:
        return
    core_frac = rng.uniform(0.45, 0.65)
    sl, rel = cv.box(c, 2.5 * radius)
    _mass_effect(cv, sl, rel, c, rho=rng.uniform(0.4, 0.65) * radius, reach=2.0 * radius)
    axes = radius * rng.uniform(0.8, 1.2, 3)
    q = _ellipsoid_q(rng, rel, axes)
    q_oedema = _irregular(rng, q, cv.spacing, 0.12)  # finger-like oedema borders
    q_core = _irregular(rng, q, cv.spacing, 0.06)
    brain = cv.brain[sl]
    level = cv.local_level(sl)
    # oedema spreads along white matter: stronger hyperintensity where WM was
    k_e = rng.uniform(1.35, 1.8)
    alpha = (1.0 - _smoothstep(0.85, 1.15, q_oedema)) * brain
    cv.paint(rng, sl, alpha, level * (1.0 + (k_e - 1.0) * (0.5 + 0.5 * cv.wm[sl])))
    label = alpha >= 0.5
    # heterogeneous solid core
    tex = _smooth_field(rng, q.shape, _ctrl(q.shape, cv.spacing, 4.0))
    alpha = (1.0 - _smoothstep(core_frac - 0.08, core_frac + 0.08, q_core)) * brain
    cv.paint(rng, sl, alpha, level * rng.uniform(0.9, 1.5) * (1.0 + 0.15 * tex))
    label |= alpha >= 0.5
    if rng.random() < 0.5:  # necrotic, fluid-filled (dark) centre
        nec = rng.uniform(0.15, max(0.16, core_frac - 0.2))
        alpha = (1.0 - _smoothstep(nec - 0.05, nec + 0.05, q_core)) * brain
        cv.paint(rng, sl, alpha, level * rng.uniform(0.25, 0.5))
    cv.labels[sl][label & brain] = KIND_LABELS["tumour"]


def _dark(cv: _Canvas, rng: np.random.Generator) -> None:
    """Hypointense region in tissue (e.g. chronic infarct, cavity): intensity scaled down."""
    tissue = cv.strided(cv.csf) < 0.2
    radius = rng.uniform(5.0, 14.0)
    c = cv.pick(rng, tissue & (cv.depth > radius + 2.0))
    if c is None:
        c = cv.pick(rng, tissue & (cv.depth > 3.0))
    if c is None:
        return
    sl, rel = cv.box(c, 1.4 * radius)
    q = _irregular(rng, _ellipsoid_q(rng, rel, radius * rng.uniform(0.7, 1.3, 3)), cv.spacing, 0.1)
    alpha = (1.0 - _smoothstep(0.8, 1.2, q)) * cv.brain[sl] * (cv.csf[sl] < 0.5)
    k = rng.uniform(0.35, 0.65)
    x = cv.data[sl]
    # scaling shrinks the noise too: add back what keeps its variance (independent draws add in
    # quadrature)
    extra = np.float32(cv.noise * np.sqrt(1.0 - k * k)) * rng.standard_normal(x.shape, dtype=np.float32)
    x *= 1.0 - alpha * np.float32(1.0 - k)
    x += alpha * extra
    np.maximum(x, 0.0, out=x)
    cv.labels[sl][alpha >= 0.5] = KIND_LABELS["dark"]


def _deformation(cv: _Canvas, rng: np.random.Generator) -> None:
    """Local deformation (shift + twist) near tissue boundaries, where it is visible."""
    s_gm = np.clip(1.0 - cv.strided(cv.wm) - cv.strided(cv.csf), 0.0, 1.0) * cv.strided(cv.brain)
    radius = rng.uniform(8.0, 15.0)
    boundary = (s_gm > 0.25) & (s_gm < 0.75)
    c = cv.pick(rng, boundary & (cv.depth > radius))
    if c is None:
        c = cv.pick(rng, cv.depth > 3.0)
    if c is None:
        return
    sigma = radius / 2.0
    sl, rel = cv.box(c, radius * 1.5)
    g = np.exp(-(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) / np.float32(2 * sigma * sigma))
    # displacement gradients stay below ~0.6 so the warp does not fold
    shift = rng.normal(size=3)
    shift *= rng.uniform(0.5, 0.8) * sigma / np.linalg.norm(shift)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    theta = rng.uniform(0.3, 0.5) * rng.choice([-1.0, 1.0])
    ax, ay, az = axis
    twist = theta * np.array([[0.0, -az, ay], [az, 0.0, -ax], [-ay, ax, 0.0]])  # twist @ x = theta axis x x
    disp = [
        g * np.float32(shift[d]) + g * sum(np.float32(twist[d, j]) * rel[j] for j in range(3)) for d in range(3)
    ]
    src = [
        np.broadcast_to(c[d] - sl[d].start + (rel[d] - disp[d]) / np.float32(cv.spacing[d]), g.shape)
        for d in range(3)
    ]
    cv.warp(sl, src)
    mag = np.sqrt(disp[0] ** 2 + disp[1] ** 2 + disp[2] ** 2)
    label = (mag >= max(1.0, 0.5 * cv.spacing.max())) & cv.brain[sl]
    cv.labels[sl][label] = KIND_LABELS["deformation"]


def _foreign_patch(cv: _Canvas, rng: np.random.Generator, donor: np.ndarray) -> None:
    """Ball-shaped patch copied from another subject at an unrelated anatomical position."""
    radius = rng.uniform(10.0, 18.0)
    dbrain = donor > 0
    stride = cv.stride
    ddepth = ndi.distance_transform_edt(dbrain[::stride, ::stride, ::stride], sampling=cv.spacing * stride)
    c = cv.pick(rng, cv.depth > radius)
    didx = np.flatnonzero(ddepth > radius)
    if c is None or didx.size == 0:
        return
    dc = np.array(np.unravel_index(rng.choice(didx), ddepth.shape)) * stride
    r = np.ceil(radius / cv.spacing).astype(int) + 1
    # the same extent on both sides of both centres, clipped to both volumes
    before = np.minimum.reduce([r, c, dc])
    after = np.minimum.reduce([r + 1, np.asarray(cv.data.shape) - c, np.asarray(donor.shape) - dc])
    sl = tuple(slice(int(a - b), int(a + e)) for a, b, e in zip(c, before, after))
    dsl = tuple(slice(int(a - b), int(a + e)) for a, b, e in zip(dc, before, after))
    rel = [((g - cc) * s).astype(np.float32) for g, cc, s in zip(np.ogrid[sl], c, cv.spacing)]
    q = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) / np.float32(radius)
    patch = donor[dsl].astype(np.float32)
    alpha = (1.0 - _smoothstep(0.8, 1.0, q)) * cv.brain[sl] * (patch > 0)
    # bring the donor to the recipient's intensity scale (scanners differ, anatomy should show)
    ratio = np.median(cv.data[cv.brain]) / max(float(np.median(donor[dbrain])), 1e-6)
    x = cv.data[sl]
    x += alpha * (patch * np.float32(ratio) - x)
    cv.labels[sl][alpha >= 0.5] = KIND_LABELS["foreign_patch"]


def _kmeans3(vals: np.ndarray) -> np.ndarray:
    """Centres of a 3-class 1-D k-means of intensities (dark < middle < bright), seeded subsample."""
    rng = np.random.default_rng(0)
    sample = vals if vals.size <= 200_000 else rng.choice(vals, 200_000, replace=False)
    centres = np.percentile(sample, [5.0, 50.0, 95.0])
    for _ in range(20):
        assign = np.argmin(np.abs(sample[:, None] - centres[None]), axis=1)
        centres = np.array([sample[assign == k].mean() if np.any(assign == k) else centres[k] for k in range(3)])
    return centres


def _tissue_from_intensity(data: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rough WM and CSF maps from FLAIR intensities (3-class 1-D k-means: CSF < WM < GM)."""
    centres = _kmeans3(data[brain])
    edges = (centres[:-1] + centres[1:]) / 2.0
    csf = (data < edges[0]) & brain
    wm = (data >= edges[0]) & (data < edges[1]) & brain
    return wm.astype(np.float32), csf.astype(np.float32)


def _noise_sigma(data: np.ndarray, wm_core: np.ndarray) -> float:
    """Noise sigma from neighbour differences inside white matter (robust MAD estimate)."""
    diff = np.diff(data, axis=0)[wm_core[1:] & wm_core[:-1]]
    if diff.size < 50:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def add_anomalies(
    data: np.ndarray | Subject,
    seed: int,
    kinds: tuple[str, ...] | list[str] = KINDS,
    *,
    brain: np.ndarray | None = None,
    wm: np.ndarray | None = None,
    csf: np.ndarray | None = None,
    spacing: float | tuple[float, float, float] | None = None,
    affine: np.ndarray | None = None,
    counts: dict[str, int] | None = None,
    donor: np.ndarray | Subject | None = None,
    ms_lesions: MSLesions = SAMPLE_MS_LESIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """Insert synthetic anomalies into a copy of a volume.

    Parameters
    ----------
    data
        A FLAIR-like volume (zero outside the brain), or a `Subject` (its brain, tissue maps and
        spacing are then used and the keyword arguments below are ignored).
    seed
        Seed of the placement, shapes and intensities.
    kinds
        Anomaly types to insert, from `KINDS`; each is inserted ``counts[kind]`` times.
    brain, wm, csf
        Brain mask and tissue probability maps; default ``data > 0`` and a 3-class intensity
        clustering (works on real skull-stripped FLAIR too).
    spacing, affine
        Voxel size in mm (or taken from the affine); default 1 mm, with a warning: anomaly sizes
        are in mm, so pass the affine of a coarse grid.
    counts
        Number of instances per kind; default 4-10 MS lesions (random) and one of each other kind.
    donor
        Volume supplying the ``foreign_patch`` (another subject, zero outside its brain, same voxel
        size ideally); default a new synthetic subject on the same grid (costs one healthy volume).
    ms_lesions
        Sites and sizes of the ``ms`` lesions; the default is the original model
        (`SAMPLE_MS_LESIONS`), ``MSLesions()`` adds juxtacortical lesions and sizes up to 15 mm.

    Returns
    -------
    (data, labels)
        float32 volume and uint8 label map (``KIND_LABELS`` values, 0 elsewhere; later anomalies
        overwrite earlier ones where they overlap). The binary ground truth is ``labels > 0``;
        labels are always inside the brain mask, which itself is unchanged.
    """
    unknown = [k for k in kinds if k not in KIND_LABELS]
    if unknown:
        raise ValueError(f"unknown anomaly kind(s) {unknown}; known: {list(KINDS)}")
    if isinstance(data, Subject):
        sub = data
        data, brain, wm, csf, spacing = sub.data, sub.brain, sub.wm, sub.csf, sub.spacing
    data = np.array(data, dtype=np.float32, copy=True)
    if data.ndim != 3:
        raise ValueError(f"data must be 3-D, got shape {data.shape}")
    brain = data > 0 if brain is None else np.asarray(brain, bool)
    if not brain.any():
        raise ValueError("empty brain mask: nothing to place anomalies in")
    if spacing is None and affine is None:
        # sizes are in mm: on a coarse grid 1 mm voxels would make every anomaly several times too big
        warnings.warn("add_anomalies: no spacing or affine given, assuming 1 mm voxels", UserWarning, stacklevel=2)
    if spacing is None:
        spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0)) if affine is not None else 1.0
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,)).copy()
    if wm is None or csf is None:
        est_wm, est_csf = _tissue_from_intensity(data, brain)
        wm = est_wm if wm is None else wm
        csf = est_csf if csf is None else csf
    wm = np.array(wm, np.float32, copy=True)
    csf = np.array(csf, np.float32, copy=True)
    wm_core = (wm > 0.9) & brain
    level = float(np.median(data[wm_core])) if wm_core.any() else float(np.median(data[brain]))
    # placement maps on a grid of ~1.5-2 mm: distance transforms on 1 mm volumes cost too much
    stride = int(max(1, round(1.8 / spacing.min())))
    depth = ndi.distance_transform_edt(brain[::stride, ::stride, ::stride], sampling=spacing * stride)
    cv = _Canvas(
        data=data,
        brain=brain,
        wm=wm,
        csf=csf,
        spacing=spacing,
        labels=np.zeros(data.shape, np.uint8),
        level=level,
        noise=_noise_sigma(data, wm_core),
        stride=stride,
        depth=depth,
    )
    rng = np.random.default_rng([int(seed), 0xA11])
    n = {"ms": int(rng.integers(4, 11))}
    n.update(counts or {})
    for kind in kinds:
        if kind == "ms":
            _ms(cv, rng, n["ms"], ms_lesions)
            continue
        for _ in range(n.get(kind, 1)):
            if kind == "tumour":
                _tumour(cv, rng)
            elif kind == "dark":
                _dark(cv, rng)
            elif kind == "deformation":
                _deformation(cv, rng)
            elif kind == "foreign_patch":
                if donor is None:
                    donor = healthy_subject(int(seed) + 104729, shape=data.shape, spacing=spacing).data
                _foreign_patch(cv, rng, donor.data if isinstance(donor, Subject) else np.asarray(donor))
    cv.labels[~brain] = 0
    return cv.data, cv.labels


# ----------------------------------------------------------------------------- FLAIR statistics


@dataclass(frozen=True)
class FlairStatistics:
    """Intensity statistics of a FLAIR brain, as measured for ``docs/synthetic.md``.

    Intensities are normalised as the project's preprocessing does (brain 0.5-99.5th percentile
    window, `napari_tae.preprocess.fit_normalisation`) on a 1 mm in-plane grid; the three classes
    are a 1-D k-means of the brain's intensities (dark = CSF and its partial volume, middle = white
    matter, bright = grey matter), so real and synthetic volumes are measured the same way without
    a segmentation.
    """

    csf: float  # class centres, normalised intensity
    wm: float
    gm: float
    gm_wm: float  # grey / white matter centre ratio
    csf_wm: float  # CSF / white matter centre ratio
    wm_spread: float  # robust std (1.4826 MAD) of the white-matter class / its centre
    noise: float  # native-grid in-plane neighbour-difference MAD / sqrt(2) in white matter / its level
    edge: float  # 90th percentile of the in-plane gradient magnitude (1 mm Gaussian), per mm
    bias: float  # std over the brain of a quadratic fit to the log raw white-matter intensity
    median: float  # median normalised brain intensity
    brain_ml: float


def flair_statistics(data: np.ndarray, brain: np.ndarray, spacing: float | tuple[float, ...]) -> FlairStatistics:
    """Measure `FlairStatistics` of one volume (NIfTI order, slice axis last) inside `brain`.

    Apart from the noise (measured on the native grid, see `_relative_noise`), the volume is first
    resampled to 1 mm in-plane (linear; the slice axis is kept) so that edges and spreads are
    compared at one scale whatever the scanner's pixel size.
    """
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
    brain = np.asarray(brain, bool)
    brain_ml = float(brain.sum() * np.prod(spacing) / 1000.0)
    noise = _relative_noise(np.asarray(data, np.float32), brain)
    zoom = (spacing[0], spacing[1], 1.0)
    data = ndi.zoom(np.asarray(data, np.float32), zoom, order=1, grid_mode=True, mode="grid-constant")
    brain = ndi.zoom(brain.astype(np.float32), zoom, order=1, grid_mode=True, mode="grid-constant") > 0.5
    x = normalise(data, brain, fit_normalisation(data, brain))
    vals = x[brain]
    csf, wm, gm = _kmeans3(vals)
    edges = (np.array([csf, wm]) + np.array([wm, gm])) / 2.0
    wm_class = brain & (x >= edges[0]) & (x < edges[1])
    wm_vals = x[wm_class]
    spread = 1.4826 * np.median(np.abs(wm_vals - np.median(wm_vals))) / wm
    smooth = ndi.gaussian_filter(x, (1.0, 1.0, 0.0))
    grad = np.hypot(ndi.sobel(smooth, axis=0) / 8.0, ndi.sobel(smooth, axis=1) / 8.0)
    # 3 mm inside the brain: the mask's own border is not an anatomical edge
    inner = ndi.binary_erosion(brain, np.ones((7, 7, 1), bool))
    edge = float(np.percentile(grad[inner], 90.0))
    idx = np.argwhere(wm_class)
    if len(idx) > 50_000:
        idx = idx[np.random.default_rng(0).choice(len(idx), 50_000, replace=False)]
    centre = np.argwhere(brain).mean(0)
    scale = np.array([1.0, 1.0, spacing[2]]) / 50.0  # mm / 50 mm: well-conditioned design
    design = _quadratic_design((idx - centre) * scale)
    # on the raw intensities: the bias multiplies them, the normalisation's offset would not
    level = np.log(np.maximum(data[tuple(idx.T)], 1e-6 * float(data[brain].max())))
    coef, *_ = np.linalg.lstsq(design, level, rcond=None)
    bidx = np.argwhere(brain)[:: max(1, int(brain.sum()) // 50_000)]
    bias = float(np.std(_quadratic_design((bidx - centre) * scale) @ coef))
    return FlairStatistics(
        csf=float(csf), wm=float(wm), gm=float(gm), gm_wm=float(gm / wm), csf_wm=float(csf / wm),
        wm_spread=float(spread), noise=float(noise), edge=edge, bias=bias,
        median=float(np.median(vals)), brain_ml=brain_ml,
    )


def _relative_noise(data: np.ndarray, brain: np.ndarray) -> float:
    """Noise sigma / white-matter level on the native grid (resampling would filter the noise).

    Neighbour differences along the first in-plane axis inside the eroded white-matter class of
    the brain's 3-class k-means; their MAD / sqrt(2) is the per-voxel sigma when the noise is
    independent between neighbours.
    """
    centres = _kmeans3(data[brain])
    edges = (centres[:-1] + centres[1:]) / 2.0
    core = ndi.binary_erosion(brain & (data >= edges[0]) & (data < edges[1]), np.ones((3, 3, 1), bool))
    diff = np.diff(data, axis=0)[core[1:] & core[:-1]]
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0) / centres[1])


def _quadratic_design(p: np.ndarray) -> np.ndarray:
    """Columns 1, x, y, z, x^2, y^2, z^2, xy, xz, yz of points p (n, 3)."""
    x, y, z = p.T
    return np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], 1)


# ----------------------------------------------------------------------------- datasets


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, *, labels: bool = False) -> Path:
    """Write an on-disk-order array through :func:`napari_tae.io.save_volume` (atomic, integers
    for ``labels``), qform and sform both the affine with code 1: a scanner's coordinates."""
    from napari_tae.io import Geometry, save_volume

    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    geometry = Geometry.from_affine(affine, data.shape, header)
    return save_volume(geometry.from_source(data), geometry, path, labels=labels, overwrite=True)


def _sub_seed(seed: int, split: int, index: int) -> int:
    """Independent, reproducible seed per (dataset seed, split, case)."""
    return int(np.random.SeedSequence([int(seed), split, index]).generate_state(1)[0])


def write_dataset(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: float | tuple[float, float, float] | None = None,
    kinds: tuple[str, ...] | list[str] = KINDS,
    kinds_per_case: int = 1,
    n_test_healthy: int = 0,
    overwrite: bool = False,
    randomisation: DomainRandomisation | None = None,
    ms_lesions: MSLesions | None = None,
) -> dict:
    """Write a synthetic dataset of NIfTI volumes with a JSON manifest.

    Layout (``NNN`` = zero-padded index)::

        train/healthy_NNN.nii.gz     healthy volumes (float32)
        val/healthy_NNN.nii.gz       healthy volumes for validation / calibration
        test/images/case_NNN.nii.gz  volumes with anomalies
        test/labels/case_NNN.nii.gz  binary ground truth (uint8 0/1)
        test/kinds/case_NNN.nii.gz   anomaly type per voxel (uint8, `KIND_LABELS`)
        test/masks/case_NNN.nii.gz   brain masks (uint8 0/1)
        test/healthy/healthy_NNN.nii.gz  healthy test volumes (when n_test_healthy > 0)
        manifest.json

    Test case ``i`` receives ``kinds_per_case`` kinds taken in turn from `kinds` (one kind per case
    by default, so results can be reported per type); the manifest records which.

    Parameters
    ----------
    shape, spacing
        Grid options passed to `healthy_subject` (None: jittered 1-1.3 mm voxels).
    overwrite
        Allow writing into a folder that already holds a manifest.
    randomisation
        Domain randomisation of every volume (`healthy_subject`); None writes the original
        generator's volumes. ``python -m training synth`` passes ``DomainRandomisation()`` unless
        told ``--no-domain-randomisation``.
    ms_lesions
        MS-like lesion model of the test cases; None: ``MSLesions()`` (3-15 mm, periventricular,
        juxtacortical, deep) with ``randomisation``, the original `SAMPLE_MS_LESIONS` without.

    Returns
    -------
    dict
        ``{"train": [Path], "val": [Path], "test_images": [Path], "test_labels": [Path],
        "test_kinds": [Path], "test_masks": [Path], "test_healthy": [Path], "manifest": Path}``
    """
    out = Path(out_dir)
    if min(n_train, n_val, n_test, n_test_healthy) < 0:
        raise ValueError("volume counts must be >= 0")
    if not kinds and n_test:
        raise ValueError("no anomaly kinds given for the test volumes")
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"{manifest_path}: a dataset already exists here (--overwrite, or overwrite=True from Python, replaces it)")
    dirs = {
        "train": out / "train",
        "val": out / "val",
        "test_images": out / "test" / "images",
        "test_labels": out / "test" / "labels",
        "test_kinds": out / "test" / "kinds",
        "test_masks": out / "test" / "masks",
        "test_healthy": out / "test" / "healthy",
    }
    for key, d in dirs.items():
        if key != "test_healthy" or n_test_healthy:
            d.mkdir(parents=True, exist_ok=True)
    paths: dict = {k: [] for k in dirs}
    manifest: dict = {
        "generator": "napari_tae.synthetic",
        "seed": int(seed),
        "kind_labels": KIND_LABELS,
        "train": [],
        "val": [],
        "test": [],
        "test_healthy": [],
    }
    grid = {"shape": shape, "spacing": spacing, "randomisation": randomisation}
    if ms_lesions is None:
        ms_lesions = SAMPLE_MS_LESIONS if randomisation is None else MSLesions()
    manifest["randomisation"] = None if randomisation is None else asdict(randomisation)
    manifest["ms_lesions"] = asdict(ms_lesions)
    for split, key, n, folder in ((0, "train", n_train, "train"), (1, "val", n_val, "val"),
                                  (3, "test_healthy", n_test_healthy, "test_healthy")):
        for i in range(n):
            sub = healthy_subject(_sub_seed(seed, split, i), **grid)
            p = _save_nifti(sub.data, sub.affine, dirs[folder] / f"healthy_{i:03d}.nii.gz")
            paths[key].append(p)
            manifest[key].append({"image": str(p.relative_to(out)), **sub.params})
    for i in range(n_test):
        sub = healthy_subject(_sub_seed(seed, 2, i), **grid)
        case_kinds = [kinds[(i * kinds_per_case + j) % len(kinds)] for j in range(kinds_per_case)]
        donor = None
        if randomisation is not None and "foreign_patch" in case_kinds:
            # another subject on this grid, from another "scanner"; already on the final grid,
            # so no second thick-slice pass
            donor = healthy_subject(_sub_seed(seed, 5, i), shape=sub.data.shape, spacing=sub.spacing,
                                    randomisation=replace(randomisation, thick_slice_probability=0.0))
        data, labels = add_anomalies(sub, _sub_seed(seed, 4, i), tuple(dict.fromkeys(case_kinds)),
                                     donor=donor, ms_lesions=ms_lesions)
        name = f"case_{i:03d}.nii.gz"
        files = {
            "image": _save_nifti(data, sub.affine, dirs["test_images"] / name),
            "label": _save_nifti((labels > 0).astype(np.uint8), sub.affine, dirs["test_labels"] / name,
                                 labels=True),
            "kinds": _save_nifti(labels, sub.affine, dirs["test_kinds"] / name, labels=True),
            "mask": _save_nifti(sub.brain.astype(np.uint8), sub.affine, dirs["test_masks"] / name,
                                labels=True),
        }
        for k, f in zip(("test_images", "test_labels", "test_kinds", "test_masks"), files.values()):
            paths[k].append(f)
        counts = {k: int(np.count_nonzero(labels == v)) for k, v in KIND_LABELS.items() if k in case_kinds}
        entry = {k: str(f.relative_to(out)) for k, f in files.items()}
        manifest["test"].append({**entry, "anomaly_kinds": case_kinds, "anomaly_voxels": counts, **sub.params})
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1))
    paths["manifest"] = manifest_path
    return paths


def sample_case(
    seed: int = 0,
    *,
    shape: tuple[int, int, int] | None = None,
    n_lesions: int = 10,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A FLAIR-like volume with MS-like white-matter lesions, for napari's sample data and demos.

    Parameters
    ----------
    seed
        Same seed, same case.
    shape
        Grid shape (NIfTI order); None gives the realistic 1-1.3 mm grid (about 1-2 s),
        ``(96, 112, 96)`` a 2 mm one in a fraction of a second.
    n_lesions
        Number of lesions inserted (some may merge).

    Returns
    -------
    (flair, mask, affine)
        float32 volume, uint8 lesion mask (0/1) and 4x4 RAS affine; arrays in NIfTI voxel order
        (napari order is ``a.transpose(2, 1, 0)`` with scale ``spacing[::-1]``).
    """
    sub = healthy_subject(int(seed), shape=shape)
    flair, labels = add_anomalies(sub, int(seed), ("ms",), counts={"ms": int(n_lesions)})
    return flair, (labels > 0).astype(np.uint8), sub.affine
