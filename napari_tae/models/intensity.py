"""The FLAIR-intensity baseline as a (parameter-free) model.

Thresholding the normalised FLAIR intensity itself is a strong lesion detector (Meissen et al.,
"Challenging Current Semi-Supervised Anomaly Segmentation Methods for Brain MRI", arXiv:2109.06023)
and must be reported beside the autoencoders of Ghorbel et al. (arXiv:2207.02059). Its
"reconstruction" is all zeros, so the residual max(x - x_hat, 0) is the normalised FLAIR.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ._base import ModelConfig, ReconstructionModel
from ._registry import register_model

__all__ = ["IntensityConfig", "IntensityBaseline"]


@dataclasses.dataclass
class IntensityConfig(ModelConfig):
    """Only the input size (kept so that every model shares the preprocessing path)."""

    img_size: int = 256


class IntensityBaseline(ReconstructionModel):
    """Reconstruction = zeros; no parameters, no bottleneck (an empty B x 0 tensor)."""

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 0)

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(z.shape[0], 1, self.img_size, self.img_size)


default_cfgs = {"intensity": dict(img_size=256, in_chans=1, bottleneck=(0,), reference_params=None)}


@register_model
def intensity(_config_only: bool = False, **kwargs: Any):
    """Intensity baseline: the residual is the normalised FLAIR."""
    config = IntensityConfig(**kwargs)
    return config if _config_only else IntensityBaseline(config)
