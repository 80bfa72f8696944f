"""CNN autoencoder baselines: AE (dense), AE (spatial), VAE, VQ-VAE.

The "unified" convolutional architecture of Baur et al., "Autoencoders for Unsupervised Anomaly
Segmentation in Brain MR Images: A Comparative Study" (arXiv:2004.03271), as used for the baselines
of Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in Brain MR
Images", BrainLes 2022 (arXiv:2207.02059): 5x5 stride-2 convs with 32/64/128/128 channels and
LeakyReLU(0.3), a 1x1 conv to 16 channels (16x16x16 at 256 input), a dense or spatial bottleneck,
and a mirrored decoder of transposed convs.

Departures from the reference code (docs/models.md): the VAE includes its KL term (weight
configurable) and decodes the posterior mean at inference; the output layer has no activation.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from ._base import ModelConfig, ReconstructionModel
from ._registry import register_model
from .blocks import ConvAE, ConvDecoder, ConvEncoder, VectorQuantizer

__all__ = ["ConvAEConfig", "VAEConfig", "VQVAEConfig", "ConvAutoencoder", "VAE", "VQVAE"]


@dataclasses.dataclass
class _ConvConfig(ModelConfig):
    img_size: int = 256
    channels: tuple[int, ...] = (32, 64, 128, 128)
    latent_channels: int = 16
    kernel_size: int = 5
    negative_slope: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        down = 2 ** len(self.channels)
        if self.img_size % down:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by {down} "
                             f"({len(self.channels)} stride-2 convs).")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.img_size // 2 ** len(self.channels)
        return self.latent_channels, s, s


@dataclasses.dataclass
class ConvAEConfig(_ConvConfig):
    """AE (dense) / AE (spatial). ``bottleneck`` is "dense" (flatten, dense latent_dim, dense back) or "spatial"."""

    bottleneck: str = "dense"
    latent_dim: int = 512  # used by the dense bottleneck only

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck not in ("dense", "spatial"):
            raise ValueError(f"bottleneck must be 'dense' or 'spatial', got {self.bottleneck!r}")


@dataclasses.dataclass
class VAEConfig(_ConvConfig):
    """VAE: flatten, dense ``intermediate_dim`` (0: none), Gaussian latent ``latent_dim``, KL weight."""

    intermediate_dim: int = 2048
    latent_dim: int = 512
    kl_weight: float = 1.0


@dataclasses.dataclass
class VQVAEConfig(_ConvConfig):
    """VQ-VAE: spatial latent quantised with ``num_codes`` codes of dim ``latent_channels``."""

    num_codes: int = 512
    commitment: float = 0.25


def _act(cfg: _ConvConfig):
    return partial(nn.LeakyReLU, negative_slope=cfg.negative_slope)


class ConvAutoencoder(ReconstructionModel):
    """AE (dense) or AE (spatial) of the unified CNN architecture."""

    def __init__(self, config: ConvAEConfig) -> None:
        super().__init__(config)
        self.ae = ConvAE(
            img_size=config.img_size,
            channels=config.channels,
            latent_channels=config.latent_channels,
            kernel_size=config.kernel_size,
            bottleneck=config.bottleneck,
            latent_dim=config.latent_dim,
            act_layer=_act(config),
        )

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(x)

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decode(z)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over latent dims, averaged over the batch."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1. - logvar).sum(1).mean()


class VAE(ReconstructionModel):
    """Dense VAE; decodes the posterior mean at inference, samples (reparameterised) in training.

    The KL term is divided by the number of pixels so that it is on the scale of the per-pixel mean
    reconstruction loss (MAE), then multiplied by ``kl_weight``.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        act = _act(config)
        self.latent_shape = config.latent_shape
        flat = config.latent_shape[0] * config.latent_shape[1] * config.latent_shape[2]
        self.encoder = ConvEncoder(1, config.channels, config.latent_channels, config.kernel_size, act)
        if config.intermediate_dim:
            self.enc_fc = nn.Sequential(nn.Flatten(1), nn.Linear(flat, config.intermediate_dim), act())
            hidden = config.intermediate_dim
        else:
            self.enc_fc = nn.Flatten(1)
            hidden = flat
        self.fc_mu = nn.Linear(hidden, config.latent_dim)
        self.fc_logvar = nn.Linear(hidden, config.latent_dim)
        self.dec_fc = nn.Sequential(nn.Linear(config.latent_dim, flat), act())
        self.decoder = ConvDecoder(1, config.channels, config.latent_channels, config.kernel_size, act)

    def encode_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x)."""
        h = self.enc_fc(self.encoder(x))
        return self.fc_mu(h), self.fc_logvar(h)

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_posterior(x)[0]

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.dec_fc(z).reshape(z.shape[0], *self.latent_shape))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_input(x)
        mu, logvar = self.encode_posterior(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        kl = kl_normal(mu, logvar) / (x.shape[-2] * x.shape[-1])
        return self.forward_decoder(z), {"kl": self.config.kl_weight * kl}


class VQVAE(ReconstructionModel):
    """Spatial AE with a vector quantiser between encoder and decoder.

    The bottleneck (``forward_encoder``) is the quantised latent, latent_channels x 16 x 16 at 256
    input, each vector one of ``num_codes`` codebook entries. Usage of the last batch:
    :meth:`codebook_usage`.
    """

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__(config)
        act = _act(config)
        self.encoder = ConvEncoder(1, config.channels, config.latent_channels, config.kernel_size, act)
        self.quantizer = VectorQuantizer(config.num_codes, config.latent_channels, config.commitment)
        self.decoder = ConvDecoder(1, config.channels, config.latent_channels, config.kernel_size, act)

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(x))[0]

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_input(x)
        q, losses = self.quantizer(self.encoder(x))
        return self.decoder(q), losses

    def codebook_usage(self) -> dict[str, float]:
        """{'used_fraction': share of codes hit, 'perplexity': exp(entropy)} of the last forward batch."""
        return dict(self.quantizer.last_usage)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return dict(img_size=256, in_chans=1, **kwargs)


# bottleneck: paper Table 4 at 256 input; reference_params: the authors' Keras models (docs/models.md)
default_cfgs = {
    "ae_dense": _cfg(bottleneck=(512,), reference_params=5.56e6),
    "ae_spatial": _cfg(bottleneck=(16, 16, 16), reference_params=1.36e6),
    "vae": _cfg(bottleneck=(512,), reference_params=13.95e6),
    "vq_vae": _cfg(bottleneck=(16, 16, 16), reference_params=1.37e6),
}


def _create(model_cls: type, config_cls: type, _config_only: bool = False, **kwargs: Any):
    config = config_cls(**kwargs)
    return config if _config_only else model_cls(config)


@register_model
def ae_dense(_config_only: bool = False, **kwargs: Any):
    """AE (dense): bottleneck (512,)."""
    model_args = dict(bottleneck="dense", latent_dim=512)
    return _create(ConvAutoencoder, ConvAEConfig, _config_only, **dict(model_args, **kwargs))


@register_model
def ae_spatial(_config_only: bool = False, **kwargs: Any):
    """AE (spatial): bottleneck (16, 16, 16)."""
    model_args = dict(bottleneck="spatial")
    return _create(ConvAutoencoder, ConvAEConfig, _config_only, **dict(model_args, **kwargs))


@register_model
def vae(_config_only: bool = False, **kwargs: Any):
    """VAE: dense 2048 then Gaussian latent (512,), KL weight 1 (per pixel)."""
    model_args = dict(intermediate_dim=2048, latent_dim=512)
    return _create(VAE, VAEConfig, _config_only, **dict(model_args, **kwargs))


@register_model
def vq_vae(_config_only: bool = False, **kwargs: Any):
    """VQ-VAE: 512 codes of dim 16 on the 16x16 spatial latent, commitment 0.25."""
    model_args = dict(num_codes=512, commitment=0.25)
    return _create(VQVAE, VQVAEConfig, _config_only, **dict(model_args, **kwargs))
