"""A synthetic head around a synthetic brain: CSF, skull, marrow and scalp layers.

:func:`napari_tae.synthetic.healthy_subject` gives a skull-stripped brain (zero outside it).
Clinical FLAIRs are heads: a thin dark CSF rim, dark cortical bone with bright marrow (diploe)
between its two tables, and bright scalp fat and skin, on a zero (or noisy) background. The
layers follow the distance from a smooth envelope of the brain, so the brain itself is unchanged
and ``subject.brain`` stays the exact ground truth of brain extraction.

Arrays are in NIfTI voxel order of the subject's RAS affine, as in :mod:`napari_tae.synthetic`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_tae.synthetic import Subject, _ctrl, _rician, _smooth_field

__all__ = ["HEAD_LAYERS_MM", "Head", "add_head"]

#: Outer edge of each layer, in mm outside the brain's envelope, and its FLAIR intensity relative
#: to white matter (CSF suppressed, bone without signal, marrow and scalp fat bright).
HEAD_LAYERS_MM: tuple[tuple[str, float, float], ...] = (
    ("csf", 1.5, 0.15),
    ("outer_table", 3.0, 0.05),
    ("diploe", 5.0, 0.9),
    ("inner_table", 6.5, 0.05),
    ("scalp", 12.0, 1.1),
)


@dataclass
class Head:
    """A synthetic head: ``data`` (float32) and ``head`` (bool, brain and every layer)."""

    data: np.ndarray
    head: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def add_head(subject: Subject, seed: int, *, background_noise: bool = False) -> Head:
    """Wrap ``subject``'s brain in CSF, skull and scalp layers (see :data:`HEAD_LAYERS_MM`).

    Parameters
    ----------
    subject
        A :func:`~napari_tae.synthetic.healthy_subject` (its field of view leaves ~25 mm around
        the brain, room for the 12 mm of layers).
    seed
        Seed of the layers' texture and noise.
    background_noise
        Rician noise outside the head as on an unmasked scanner image; False leaves a zero
        background, as many anonymised or face-removed exports have.

    Raises
    ------
    ValueError
        The field of view cannot hold the layers on the sides or at the top (the head would be
        cut there; at the bottom it may be, as the neck is in a real head's field of view).
    """
    rng = np.random.default_rng([int(seed), 0x4EAD])
    spacing = np.asarray(subject.spacing, float)
    brain = np.asarray(subject.brain, bool)
    # the skull follows the brain's outline, not its sulci: a smoothed envelope, holes filled
    envelope = ndi.gaussian_filter(brain.astype(np.float32), 4.0 / spacing) > 0.3
    envelope = ndi.binary_fill_holes(envelope | brain)
    outside_mm = ndi.distance_transform_edt(~envelope, sampling=spacing).astype(np.float32)
    thickness = HEAD_LAYERS_MM[-1][1]
    head = envelope | (outside_mm <= thickness)
    # the inferior face may cut the layers (the neck goes on below a real head's field of view)
    faces = [head[0], head[-1], head[:, 0], head[:, -1], head[:, :, -1]]
    if any(f.any() for f in faces):
        raise ValueError(
            f"the field of view {tuple(int(n) for n in head.shape)} at {tuple(spacing)} mm is too "
            f"small for {thickness:g} mm of skull and scalp around the brain"
        )
    level = np.zeros(head.shape, np.float32)
    level[envelope & ~brain] = HEAD_LAYERS_MM[0][2]
    inner = 0.0
    for _name, outer, value in HEAD_LAYERS_MM:
        level[(outside_mm > inner) & (outside_mm <= outer)] = value
        inner = outer
    # fat and marrow are not uniform: a few percent of smooth texture, as in the brain
    texture = _smooth_field(rng, head.shape, _ctrl(head.shape, spacing, 10.0))
    level *= 1.0 + np.float32(0.08) * texture
    layers = head & ~brain
    signal = level * np.float32(subject.wm_level)
    data = np.asarray(subject.data, np.float32).copy()
    noisy = _rician(rng, signal, subject.noise)
    data[layers] = noisy[layers]
    if background_noise:
        background = _rician(rng, np.zeros(head.shape, np.float32), subject.noise)
        data[~head] = background[~head]
    return Head(data=data, head=head, brain=brain.copy(), affine=subject.affine.copy(),
                spacing=tuple(float(s) for s in spacing))
