"""Option vocabularies shared by the CLI, the widget, the settings file, training and evaluation.

One definition each, so that a value accepted in one place is accepted everywhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEVICE_CHOICES", "MEDIAN_MODES", "PRECISIONS", "check_median_kernel"]

#: ``auto`` takes CUDA, then Apple MPS, then the CPU (``inference.select_device``)
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
#: arithmetic of the model's forward pass: ``auto`` is bfloat16 autocast on CUDA and float32
#: elsewhere; ``bfloat16`` on the CPU is about twice as fast for the transformers on CPUs with
#: AVX-512 BF16 or AMX, at a reconstruction error of about 1e-2 (docs/speed.md)
PRECISIONS = ("auto", "float32", "bfloat16")
#: median filter per axial slice or over the volume (``postprocess.median_filtered``)
MEDIAN_MODES = ("2d", "3d")


def check_median_kernel(kernel: Any) -> int:
    """The median kernel as an int; ValueError unless it is an odd integer >= 1 (1 = off)."""
    if isinstance(kernel, bool) or not isinstance(kernel, int) and not hasattr(kernel, "__index__"):
        raise ValueError(f"median kernel must be an odd integer >= 1, got {kernel!r}")
    kernel = int(kernel)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"median kernel must be an odd integer >= 1, got {kernel}")
    return kernel
