"""The brain mask of a volume: supplied, the non-background of a skull-stripped volume, or
extracted from a head by deepbet.

Clinical FLAIRs are heads (scalp, skull, neck); the models are trained on brains, and the scalp
of an unmasked head comes out as "lesion". :func:`resolve_brain_mask` is the one rule the CLI, the
plugin, training and evaluation use. ``skull_strip="auto"`` extracts the brain only when
:func:`unstripped_reason` finds the volume is not skull-stripped, which works on a zero
background too: the non-background region of a head is far larger than any brain.

Brain extraction is deepbet (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI
using Convolutional Neural Networks", 2024; MIT licence; its TorchScript weights ship inside its
wheel, nothing is downloaded), on the CPU, on the volume's own grid: resampling thick-slice heads
to 1 mm first gave the same masks (Dice 0.99, volumes within 1 %) and was slower; see
``docs/preprocessing.md``. deepbet and torch are imported when a brain is extracted, not before.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_tae.preprocess import (
    NotSkullStrippedWarning,
    _corners,
    _default_spacing,
    brain_mask,
)

__all__ = [
    "MAX_BRAIN_LITRES",
    "SKULL_STRIP_CHOICES",
    "BrainExtractionError",
    "BrainMask",
    "extract_brain",
    "resolve_brain_mask",
    "unstripped_reason",
]

_logger = logging.getLogger(__name__)

#: Values of the ``skull_strip`` option: extract when the volume looks unstripped, always, never.
SKULL_STRIP_CHOICES = ("auto", "always", "never")
#: Largest brain expected, in litres: adult brains are 1.0-1.8 L with their CSF, the synthetic
#: ones up to 2.1 L; a head's non-background region is 2.7 L or more (docs/preprocessing.md).
MAX_BRAIN_LITRES = 2.4
#: Smallest extracted brain accepted: less means the extraction failed (not a brain, cut FOV).
MIN_BRAIN_LITRES = 0.4


class BrainExtractionError(ValueError):
    """Brain extraction failed or was asked for nonsense; the message is one line."""


@dataclass(frozen=True)
class BrainMask:
    """A ``(Z, Y, X)`` boolean brain mask and how it was obtained.

    ``method`` is ``"supplied"``, ``"non_background"`` (a skull-stripped volume) or
    ``"deepbet"``; ``reason`` says why the volume was taken as not skull-stripped (empty when it
    was not).
    """

    mask: np.ndarray
    method: str
    reason: str = ""

    def litres(self, spacing: Any = None) -> float:
        """Brain volume in litres for ``(Z, Y, X)`` voxel sizes in mm (None: 1 mm)."""
        return float(np.count_nonzero(self.mask) * np.prod(_default_spacing(spacing)) / 1e6)


def unstripped_reason(data: np.ndarray, spacing: Any = None) -> str | None:
    """Why ``data`` looks like a head rather than a skull-stripped brain, or None.

    Two signs, both independent of the intensity scale: the corners are not one constant value
    (noise or tissue around the head), or the non-background region is larger than any brain
    (:data:`MAX_BRAIN_LITRES`): a head on a zero background, scalp and neck included.
    """
    data = np.asarray(data)
    corners = _corners(data).astype(np.float64)
    span = float(data.max()) - float(data.min())
    tol = 1e-6 * span if span > 0 else 0.0
    if np.ptp(corners) > tol:
        return "the volume's corners are not one constant background value"
    litres = float(np.count_nonzero(np.abs(data - corners[0]) > tol))
    litres *= float(np.prod(_default_spacing(spacing))) / 1e6
    if litres > MAX_BRAIN_LITRES:
        return (
            f"its non-background region holds {litres:.1f} L, more than a brain "
            f"(at most {MAX_BRAIN_LITRES} L)"
        )
    return None


_deepbet_lock = threading.Lock()  # the extractor keeps per-call state (its bounding box)


@functools.lru_cache(maxsize=1)
def _deepbet() -> Any:
    """deepbet's extractor on the CPU, loaded once (two TorchScript files from its wheel)."""
    try:
        from deepbet import BrainExtraction
    except ImportError as exc:
        raise BrainExtractionError(
            f"brain extraction needs the deepbet package ({exc}); install napari-tae's "
            "dependencies, or supply a brain mask"
        ) from None
    with warnings.catch_warnings():
        # deepbet loads its weights with torch.jit.load, which recent torch marks as deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return BrainExtraction(no_gpu=True)


def extract_brain(data: np.ndarray, spacing: Any = None) -> np.ndarray:
    """deepbet's brain mask of a ``(Z, Y, X) = (S, A, R)`` head, on the same grid (bool).

    Raises
    ------
    BrainExtractionError
        deepbet finds no brain, or less than :data:`MIN_BRAIN_LITRES` of it.
    """
    import torch

    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise BrainExtractionError(f"brain extraction needs a 3D volume (got shape {data.shape})")
    extractor = _deepbet()
    # deepbet reads canonical RAS arrays indexed (R, A, S): napari's order reversed
    ras = np.ascontiguousarray(data.transpose(2, 1, 0))
    with _deepbet_lock, torch.inference_mode():
        try:
            probability = extractor.run_model(ras)
            mask = extractor.postprocess(probability > 0.5)
        except (AssertionError, ValueError, RuntimeError) as exc:
            raise BrainExtractionError(f"brain extraction found no brain ({exc})") from None
    mask = np.ascontiguousarray(np.asarray(mask, dtype=bool).transpose(2, 1, 0))
    litres = float(np.count_nonzero(mask) * np.prod(_default_spacing(spacing)) / 1e6)
    if litres < MIN_BRAIN_LITRES:
        raise BrainExtractionError(
            f"brain extraction found only {litres:.2f} L of brain (expected about 1-1.8 L); "
            "supply a brain mask"
        )
    return mask


def resolve_brain_mask(
    data: np.ndarray,
    spacing: Any = None,
    *,
    supplied: np.ndarray | None = None,
    skull_strip: str = "auto",
) -> BrainMask:
    """The brain mask a run uses: ``supplied``, else deepbet's or the non-background.

    Parameters
    ----------
    data : ndarray
        ``(Z, Y, X)`` volume in napari order (canonical RAS, axial slices first).
    spacing : sequence of float, optional
        ``(Z, Y, X)`` voxel size in mm (None: 1 mm).
    supplied : ndarray, optional
        A brain mask (non-zero = brain); it wins over ``skull_strip``.
    skull_strip : {"auto", "always", "never"}
        ``auto`` extracts the brain when :func:`unstripped_reason` finds the volume is a head
        (when deepbet finds no brain there, the non-background is used with a warning);
        ``never`` takes the non-background and warns (:class:`NotSkullStrippedWarning`) on a head.

    Raises
    ------
    BrainExtractionError
        Unknown ``skull_strip``, or a failed extraction with ``skull_strip="always"``.
    ValueError
        From :func:`~napari_tae.preprocess.brain_mask` (shape mismatch, empty mask).
    """
    if skull_strip not in SKULL_STRIP_CHOICES:
        raise BrainExtractionError(
            f"unknown skull_strip {skull_strip!r} (choose {', '.join(SKULL_STRIP_CHOICES)})"
        )
    if supplied is not None:
        return BrainMask(brain_mask(data, supplied), "supplied")
    reason = unstripped_reason(data, spacing) or ""
    if skull_strip == "always":
        return BrainMask(extract_brain(data, spacing), "deepbet", reason)
    if skull_strip == "auto" and reason:
        _logger.info("not skull-stripped (%s): extracting the brain with deepbet", reason)
        try:
            return BrainMask(extract_brain(data, spacing), "deepbet", reason)
        except BrainExtractionError as exc:
            # e.g. a small field of view holding only part of a brain: its corners are tissue,
            # and there is no head for deepbet to find; asked for explicitly, the error stands
            reason = f"{reason}, but {exc}"
    if reason:
        warnings.warn(
            f"The input looks not skull-stripped ({reason}); the non-background voxels are "
            "taken for brain, scalp included. Supply a brain mask for reliable results.",
            NotSkullStrippedWarning,
            stacklevel=2,
        )
    with warnings.catch_warnings():
        if reason:  # already said, in the words above
            warnings.simplefilter("ignore", NotSkullStrippedWarning)
        return BrainMask(brain_mask(data), "non_background", reason)
