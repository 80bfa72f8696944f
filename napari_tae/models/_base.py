"""Base classes of the napari-tae model zoo: the config dataclass and the reconstruction model.

Every family of Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in
Brain MR Images", BrainLes 2022 (arXiv:2207.02059), and every CNN baseline derives from
:class:`ReconstructionModel`, as timm's models derive from its base conventions.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ["ModelConfig", "ReconstructionModel", "init_weights"]




@dataclasses.dataclass
class ModelConfig:
    """Base of every family's config: JSON-friendly fields, lists coerced back to tuples."""

    img_size: int = 256

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; restore them so configs compare equal.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        if not isinstance(self.img_size, int) or isinstance(self.img_size, bool) or self.img_size <= 0:
            raise ValueError(f"img_size must be a positive int, got {self.img_size!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        out = {}
        for k, v in dataclasses.asdict(self).items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


class ReconstructionModel(nn.Module):
    """Base class: an autoencoder mapping B x 1 x H x W images in [0, 1] to reconstructions.

    Subclasses implement :meth:`forward_encoder` (image -> bottleneck) and :meth:`forward_decoder`
    (bottleneck -> image); :meth:`forward` only composes them. :meth:`forward_train` returns the
    reconstruction and a dict of extra, already weighted, loss terms (empty for plain AEs), so that
    training adds ``sum(extra.values())`` to its reconstruction loss for every model alike.
    """

    #: registry name, set by ``build_model`` (empty when the class is instantiated directly)
    model_name: str = ""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.img_size = int(config.img_size)

    def config_dict(self) -> dict[str, Any]:
        """The full config as a plain JSON-serialisable dict (rebuilds the model with build_model)."""
        return self.config.to_dict()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is B x 1 x img_size x img_size."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"Input shape {tuple(x.shape)} doesn't match model (B, 1, {self.img_size}, {self.img_size}).")

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> bottleneck (deterministic; the shape is the model's bottleneck, batch first)."""
        raise NotImplementedError

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """Bottleneck -> reconstruction B x 1 x H x W."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_decoder(self.forward_encoder(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction and extra (weighted) loss terms; only losses go in the dict."""
        return self(x), {}

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}"


def init_weights(module: nn.Module) -> None:
    """ViT-style init: truncated normal (std .02) for Linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
