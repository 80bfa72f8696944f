"""Transformer autoencoders B_TAE, SC_TAE and DC_TAE.

From Ghorbel, Aldahdooh, Albarqouni, Hamidouche, "Transformer based Models for Unsupervised
Anomaly Segmentation in Brain MR Images", BrainLes 2022 (arXiv:2207.02059).

* ``b_tae``: patchify, linear embedding + learned positions, L encoder blocks (timm ``Block``),
  L decoder blocks (self-attention, cross-attention to the encoder memory, MLP), linear to p*p,
  un-patchify. Bottleneck: the encoder tokens, (256, 96) at 256 input.
* ``dc_tae`` / ``sc_tae``: the encoder tokens are un-patchified to an image and passed through the
  dense / spatial CNN autoencoder (3x3 kernels); its output is re-patchified with a new embedding and
  positions and becomes both the decoder's input stream and its cross-attention memory, so the CNN
  bottleneck ((512,) / (16, 16, 16)) is the only path from encoder to decoder. Width d = p*p.

Our choices where the reference code differs (docs/models.md): standard multi-head attention
(head width d/h, not d), pre-norm blocks (timm convention; stable at lr 1e-5 without warm-up),
learned decoder positions added once to the decoder stream, the decoder MLP on the decoder stream,
and an exact un-patchify for every patch size.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block

from ._base import ModelConfig, ReconstructionModel, init_weights
from ._registry import register_model
from .blocks import ConvAE, DecoderBlock, Unpatchify

__all__ = ["TAEConfig", "TransformerAE"]


@dataclasses.dataclass
class TAEConfig(ModelConfig):
    """Config of the flat transformer autoencoders.

    Args:
        img_size: Input height = width.
        patch_size: Patch size p (N = (img_size / p)^2 tokens).
        embed_dim: Token width d; None means p*p (DC/SC_TAE tie the width to the patch).
        depth: Number of encoder blocks, and of decoder blocks.
        num_heads: Attention heads (standard MHA, head width d / h).
        mlp_ratio: MLP hidden width / d.
        qkv_bias: Bias on q, k, v projections (Keras' MultiHeadAttention has one).
        drop_rate: Dropout on attention weights, projections and MLP (reference 0.1).
        drop_path_rate: Stochastic depth, linearly increasing over blocks.
        cnn_bottleneck: None (B_TAE), "dense" (DC_TAE) or "spatial" (SC_TAE).
        cnn_channels: Channels of the inner CNN autoencoder's strided convs.
        cnn_kernel_size: Kernel of the inner CNN autoencoder.
        cnn_latent_dim: Dense bottleneck width of the inner CNN autoencoder.
    """

    img_size: int = 256
    patch_size: int = 16
    embed_dim: int | None = 96
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: float = 4.
    qkv_bias: bool = True
    drop_rate: float = 0.1
    drop_path_rate: float = 0.
    cnn_bottleneck: str | None = None
    cnn_channels: tuple[int, ...] = (32, 64, 128, 128)
    cnn_kernel_size: int = 3
    cnn_latent_dim: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size}).")
        if self.width % self.num_heads:
            raise ValueError(f"embed_dim ({self.width}) must be divisible by num_heads ({self.num_heads}).")
        if self.cnn_bottleneck not in (None, "dense", "spatial"):
            raise ValueError(f"cnn_bottleneck must be None, 'dense' or 'spatial', got {self.cnn_bottleneck!r}")
        down = 2 ** len(self.cnn_channels)
        if self.cnn_bottleneck is not None and self.img_size % down:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by {down} for the inner CNN autoencoder.")

    @property
    def width(self) -> int:
        return self.embed_dim if self.embed_dim is not None else self.patch_size ** 2


class TransformerAE(ReconstructionModel):
    """B_TAE, or DC_TAE / SC_TAE when ``config.cnn_bottleneck`` is set."""

    def __init__(self, config: TAEConfig) -> None:
        super().__init__(config)
        p, d = config.patch_size, config.width
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = p
        self.grid_size = (config.img_size // p, config.img_size // p)
        num_patches = self.grid_size[0] * self.grid_size[1]
        dpr = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]

        # encoder: a conv with kernel = stride = p is the linear patch embedding
        self.patch_embed = PatchEmbed(config.img_size, p, in_chans=1, embed_dim=d)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, d))
        self.pos_drop = nn.Dropout(config.drop_rate)
        self.blocks = nn.Sequential(*[
            Block(d, config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                  proj_drop=config.drop_rate, attn_drop=config.drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(config.depth)])
        self.norm = norm_layer(d)

        # optional CNN autoencoder between encoder and decoder (DC_TAE / SC_TAE)
        if config.cnn_bottleneck is not None:
            self.to_pixels = nn.Linear(d, p * p) if d != p * p else nn.Identity()
            self.unpatchify_enc = Unpatchify(p, self.grid_size)
            self.cnn = ConvAE(config.img_size, channels=config.cnn_channels, kernel_size=config.cnn_kernel_size,
                              bottleneck=config.cnn_bottleneck, latent_dim=config.cnn_latent_dim)
            self.repatch_embed = PatchEmbed(config.img_size, p, in_chans=1, embed_dim=d)
            self.repatch_pos_embed = nn.Parameter(torch.zeros(1, num_patches, d))
            self.memory_norm = norm_layer(d)
        else:
            self.to_pixels = self.unpatchify_enc = self.cnn = None
            self.repatch_embed = self.repatch_pos_embed = None
            self.memory_norm = nn.Identity()  # encoder output is already normed

        # decoder
        self.dec_pos_embed = nn.Parameter(torch.zeros(1, num_patches, d))
        self.dec_blocks = nn.ModuleList([
            DecoderBlock(d, config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                         proj_drop=config.drop_rate, attn_drop=config.drop_rate, drop_path=dpr[i],
                         norm_layer=norm_layer)
            for i in range(config.depth)])
        self.dec_norm = norm_layer(d)
        self.head = nn.Linear(d, p * p)
        self.unpatchify = Unpatchify(p, self.grid_size)

        self.apply(init_weights)
        for pe in (self.pos_embed, self.dec_pos_embed, self.repatch_pos_embed):
            if pe is not None:
                trunc_normal_(pe, std=.02)

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """B x 1 x H x W -> encoder tokens B x N x d (B_TAE) or the CNN bottleneck (DC/SC_TAE)."""
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # NCHW -> NLC
        x = self.norm(self.blocks(x))
        if self.cnn is None:
            return x
        img = self.unpatchify_enc(self.to_pixels(x))
        return self.cnn.encode(img)

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        if self.cnn is not None:
            img = self.cnn.decode(z)
            memory = self.repatch_embed(img) + self.repatch_pos_embed
        else:
            memory = z
        memory = self.memory_norm(memory)
        x = self.pos_drop(memory + self.dec_pos_embed)
        for blk in self.dec_blocks:
            x = blk(x, memory)
        x = self.head(self.dec_norm(x))
        return self.unpatchify(x)

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return dict(img_size=256, in_chans=1, **kwargs)


default_cfgs = {
    "b_tae": _cfg(bottleneck=(256, 96), reference_params=4.84e6),
    "dc_tae": _cfg(bottleneck=(512,), reference_params=93.3e6),
    "sc_tae": _cfg(bottleneck=(16, 16, 16), reference_params=34.4e6),
}


def _create_tae(_config_only: bool = False, **kwargs: Any):
    config = TAEConfig(**kwargs)
    return config if _config_only else TransformerAE(config)


@register_model
def b_tae(_config_only: bool = False, **kwargs: Any):
    """B_TAE: L=8, p=16, h=4, d=96."""
    model_args = dict(patch_size=16, embed_dim=96, depth=8, num_heads=4)
    return _create_tae(_config_only, **dict(model_args, **kwargs))


@register_model
def sc_tae(_config_only: bool = False, **kwargs: Any):
    """SC_TAE: L=8, p=16, h=4, d=p*p, spatial CNN AE inside."""
    model_args = dict(patch_size=16, embed_dim=None, depth=8, num_heads=4, cnn_bottleneck="spatial")
    return _create_tae(_config_only, **dict(model_args, **kwargs))


@register_model
def dc_tae(_config_only: bool = False, **kwargs: Any):
    """DC_TAE (paper's best): L=12, p=16, h=8, d=p*p, dense CNN AE inside."""
    model_args = dict(patch_size=16, embed_dim=None, depth=12, num_heads=8, cnn_bottleneck="dense")
    return _create_tae(_config_only, **dict(model_args, **kwargs))
