"""napari sample data: a synthetic FLAIR volume with lesions and its ground-truth mask.

Generated offline and seeded by :mod:`napari_tae.synthetic` (MNI152-based synthetic brain with
MS-like lesions and a tumour-like mass), so the sample exists on a fresh install without any download and is the
same volume every time. Used by the npe2 ``sample_data`` contribution, ``napari-tae demo`` and the
tests of the bundled checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_tae.io import Geometry, Volume
from napari_tae.plugin._layers import contrast_limits, layer_kwargs, reference_style

__all__ = ["SAMPLE_NAME", "SAMPLE_SEED", "SAMPLE_SHAPE", "make_sample_data", "sample_arrays", "sample_volume"]

#: Seed of the bundled sample; the tests' Dice figures refer to this exact volume.
SAMPLE_SEED = 0
#: NIfTI-order grid of the sample (about 1.5 mm voxels), as the bundled checkpoints' training data.
SAMPLE_SHAPE = (132, 156, 126)
SAMPLE_MS_LESIONS = 10
#: Layer name of the sample FLAIR image; the mask layer adds ``_ground_truth``.
SAMPLE_NAME = "synthetic_flair"

LayerData = tuple[Any, dict[str, Any], str]


def sample_arrays(seed: int = SAMPLE_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample in NIfTI voxel order: FLAIR, anomaly-kind labels and the RAS affine.

    :func:`napari_tae.synthetic.sample_case` gives the same brain with MS-like lesions only;
    those are 3-10 mm across, and a 5-voxel median (the default post-processing) erases most
    of them even from a perfect residual (Dice ceiling about 0.2 at this grid). The sample
    therefore adds one tumour-like mass (oedema, heterogeneous core) beside the MS lesions, so
    that what a model detects at default settings is visible. Same generator, same grid as the
    bundled checkpoints' training volumes (``python -m training synth --shape 132 156 126
    --no-domain-randomisation``).
    """
    from napari_tae.synthetic import KIND_LABELS, add_anomalies, healthy_subject

    subject = healthy_subject(int(seed), shape=SAMPLE_SHAPE)
    flair, labels = add_anomalies(
        subject, int(seed), ("ms", "tumour"), counts={"ms": SAMPLE_MS_LESIONS, "tumour": 1}
    )
    assert set(np.unique(labels)) <= {0, *KIND_LABELS.values()}
    return flair, labels, subject.affine


def sample_volume(seed: int = SAMPLE_SEED) -> tuple[Volume, np.ndarray]:
    """The sample as a :class:`~napari_tae.io.Volume` (napari order) and its anomaly labels.

    The geometry comes from the generator's RAS affine (no temporary file), so the layers carry
    real scale/translate and the writer can save results on the synthetic grid.

    Args:
        seed: Generator seed; the default is the bundled sample.

    Returns:
        The FLAIR volume (float32, ``(Z, Y, X)``) and the ground truth (uint8, same shape):
        0 background, else the anomaly kind's value in ``napari_tae.synthetic.KIND_LABELS``
        (1 MS-like lesion, 2 tumour-like mass). ``truth > 0`` is the binary lesion mask.
    """
    flair, labels, affine = sample_arrays(seed)
    geometry = Geometry.from_affine(affine, flair.shape)
    data = np.ascontiguousarray(geometry.from_source(flair), dtype=np.float32)
    truth = np.ascontiguousarray(geometry.from_source(labels), dtype=np.uint8)
    return Volume(data=data, geometry=geometry), truth


def make_sample_data() -> list[LayerData]:
    """npe2 sample-data command: the FLAIR image layer and the ground-truth labels layer."""

    volume, truth = sample_volume()
    image_kwargs = layer_kwargs(volume.geometry, SAMPLE_NAME)
    image_kwargs.update(colormap="gray", contrast_limits=contrast_limits(volume.data))
    labels_kwargs = layer_kwargs(volume.geometry, f"{SAMPLE_NAME}_ground_truth")
    # every anomaly kind in the reference colour: the model's mask is the one outlined in another
    labels_kwargs.update(reference_style())
    return [(volume.data, image_kwargs, "image"), (truth, labels_kwargs, "labels")]
