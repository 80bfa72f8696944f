"""napari sample data: a synthetic FLAIR volume with lesions and its ground-truth mask.

Generated offline and seeded by :func:`napari_tae.synthetic.sample_case` (MNI152-based synthetic
brain, see that module), so the sample exists on a fresh install without any download and is the
same volume every time. Used by the npe2 ``sample_data`` contribution, ``napari-tae demo`` and the
tests of the bundled checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_tae.io import Geometry, Volume, layer_kwargs

__all__ = ["SAMPLE_NAME", "SAMPLE_SEED", "make_sample_data", "sample_volume"]

#: Seed of the bundled sample; the tests' Dice figures refer to this exact volume.
SAMPLE_SEED = 0
#: Layer name of the sample FLAIR image; the mask layer adds ``_ground_truth``.
SAMPLE_NAME = "synthetic_flair"

LayerData = tuple[Any, dict[str, Any], str]


def sample_volume(seed: int = SAMPLE_SEED) -> tuple[Volume, np.ndarray]:
    """The sample as a :class:`~napari_tae.io.Volume` (napari order) and its lesion mask.

    The geometry comes from the generator's RAS affine (no temporary file), so the layers carry
    real scale/translate and the writer can save results on the synthetic grid.

    Args:
        seed: Generator seed; the default is the bundled sample.

    Returns:
        The FLAIR volume (float32, ``(Z, Y, X)``) and the ground-truth mask (uint8, same shape,
        1 = lesion of any kind).
    """
    from napari_tae.synthetic import sample_case

    flair, lesions, affine = sample_case(seed=seed)
    geometry = Geometry.from_affine(affine, flair.shape)
    data = np.ascontiguousarray(geometry.from_source(flair), dtype=np.float32)
    truth = np.ascontiguousarray(geometry.from_source(np.asarray(lesions) > 0), dtype=np.uint8)
    return Volume(data=data, geometry=geometry), truth


def make_sample_data() -> list[LayerData]:
    """npe2 sample-data command: the FLAIR image layer and the ground-truth labels layer."""
    from napari_tae._reader import contrast_limits

    volume, truth = sample_volume()
    image_kwargs = layer_kwargs(volume.geometry, SAMPLE_NAME)
    image_kwargs.update(colormap="gray", contrast_limits=contrast_limits(volume.data))
    labels_kwargs = layer_kwargs(volume.geometry, f"{SAMPLE_NAME}_ground_truth")
    # drawn as an outline so the model's filled mask stays readable on top of it
    labels_kwargs.update(contour=1, opacity=0.8)
    return [(volume.data, image_kwargs, "image"), (truth, labels_kwargs, "labels")]
