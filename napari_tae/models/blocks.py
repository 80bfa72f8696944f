"""Network blocks shared by the napari-tae model families.

Blocks used by several model families of Ghorbel et al., "Transformer based Models for Unsupervised
Anomaly Segmentation in Brain MR Images", BrainLes 2022 (arXiv:2207.02059): patchify / un-patchify,
the transformer decoder block with cross-attention, patch expanding, the "unified" convolutional
autoencoder of Baur et al. (arXiv:2004.03271) used by the CNN baselines and inside DC_TAE / SC_TAE,
and the vector quantiser. The base classes live in :mod:`napari_tae.models._base`.

Everything timm already provides (``Attention``, ``Mlp``, ``PatchEmbed``, ``DropPath``, the Swin
blocks) is imported from timm, not re-written.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Literal, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, DropPath, Mlp

__all__ = [
    "patchify",
    "unpatchify",
    "Unpatchify",
    "CrossAttention",
    "DecoderBlock",
    "PatchExpand",
    "ConvEncoder",
    "ConvDecoder",
    "ConvAE",
    "VectorQuantizer",
]

LeakyReLU03 = partial(nn.LeakyReLU, negative_slope=0.3)  # Keras' LeakyReLU default slope


# ---------------------------------------------------------------------------------------------
# Patchify / un-patchify
# ---------------------------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B x C x H x W -> B x N x (p*p*C); tokens row-major over the grid, pixels (row, col, chan)."""
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"Image size ({H}, {W}) is not divisible by patch size {p}.")
    gh, gw = H // p, W // p
    x = x.reshape(B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # B, gh, gw, p, p, C
    return x.reshape(B, gh * gw, p * p * C)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 1) -> torch.Tensor:
    """Exact inverse of :func:`patchify`: B x N x (p*p*C) -> B x C x (gh*p) x (gw*p).

    Unlike the reference code (a reshape followed by space_to_depth, correct only for p=16), each
    token's p*p pixels land in its own grid cell for every patch size.
    """
    B, N, D = tokens.shape
    p = patch_size
    gh, gw = grid_size
    if gh * gw != N or p * p * channels != D:
        raise ValueError(f"Tokens {tuple(tokens.shape)} don't match grid {grid_size}, patch {p}, channels {channels}.")
    x = tokens.reshape(B, gh, gw, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # B, C, gh, p, gw, p
    return x.reshape(B, channels, gh * p, gw * p)


class Unpatchify(nn.Module):
    """Module wrapper of :func:`unpatchify` for a fixed grid."""

    def __init__(self, patch_size: int, grid_size: tuple[int, int], channels: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = tuple(grid_size)
        self.channels = channels

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.patch_size, self.grid_size, self.channels)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, grid_size={self.grid_size}, channels={self.channels}"


# ---------------------------------------------------------------------------------------------
# Transformer decoder pieces (timm has self-attention blocks only)
# ---------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Standard multi-head attention of a query stream over a memory (key/value) stream."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = memory.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(memory).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm transformer decoder block: self-attention, cross-attention to memory, MLP.

    Pre-norm (as timm's encoder ``Block``) rather than the reference's post-norm: it trains stably
    at the paper's small learning rate without warm-up, and encoder and decoder then share one
    convention. The MLP acts on the decoder stream (the reference fed it the encoder memory).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.cross_attn = CrossAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm3 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.cross_attn(self.norm2(x), memory))
        x = x + self.drop_path3(self.mlp(self.norm3(x)))
        return x


class PatchExpand(nn.Module):
    """Swin-UNet patch expanding: linear C -> s*s*C_out, depth-to-space by s, LayerNorm.

    ``scale=2, out_dim=C//2`` is the decoder's up-sampling step (linear C -> 2C); ``scale=4,
    out_dim=C`` is the final x4 expansion (linear C -> 16C). Works on NHWC tensors.
    """

    def __init__(
            self,
            dim: int,
            scale: int = 2,
            out_dim: int | None = None,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale
        self.out_dim = out_dim if out_dim is not None else dim // 2
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(x)
        # depth-to-space: channel index = (row offset, col offset, channel)
        x = x.reshape(B, H, W, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(B, H * s, W * s, c)
        return self.norm(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, out_dim={self.out_dim}"


# ---------------------------------------------------------------------------------------------
# The unified convolutional autoencoder (Baur et al.) and the vector quantiser
# ---------------------------------------------------------------------------------------------


class _ChannelsLastSequential(nn.Sequential):
    """Runs its convs on channels-last (NHWC) activations on the CPU.

    oneDNN, torch's CPU convolution library, computes in NHWC: with NCHW activations every
    transposed conv's output is copied back to NCHW (about a fifth of ``ae_spatial``'s time at
    batch 8). Channels-last makes the CNN baselines about 20-30 % faster on the CPU, same values
    within float32 rounding (docs/speed.md); other devices keep NCHW (not measured there).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class ConvEncoder(_ChannelsLastSequential):
    """Strided convs (stride 2, "same" padding) then a 1x1 conv to ``latent_channels``; act after each."""

    def __init__(
            self,
            in_chans: int = 1,
            channels: Sequence[int] = (32, 64, 128, 128),
            latent_channels: int = 16,
            kernel_size: int = 5,
            act_layer: Callable[[], nn.Module] = LeakyReLU03,
    ) -> None:
        layers: list[nn.Module] = []
        prev = in_chans
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, kernel_size, stride=2, padding=kernel_size // 2), act_layer()]
            prev = ch
        layers += [nn.Conv2d(prev, latent_channels, 1), act_layer()]
        super().__init__(*layers)


class ConvDecoder(_ChannelsLastSequential):
    """Mirror of :class:`ConvEncoder`: 1x1 conv up, transposed convs (x2 each), 1x1 conv to output.

    With encoder channels (32, 64, 128, 128) the transposed convs output 128, 64, 32, 32. The output
    conv has no activation (a linear read-out; the reference put a LeakyReLU there).
    """

    def __init__(
            self,
            out_chans: int = 1,
            channels: Sequence[int] = (32, 64, 128, 128),
            latent_channels: int = 16,
            kernel_size: int = 5,
            act_layer: Callable[[], nn.Module] = LeakyReLU03,
    ) -> None:
        channels = list(channels)
        outs = list(reversed(channels))[1:] + [channels[0]]
        prev = channels[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, prev, 1), act_layer()]
        for ch in outs:
            # padding k//2 + output_padding 1 doubles the size exactly (Keras "same")
            layers += [nn.ConvTranspose2d(prev, ch, kernel_size, stride=2, padding=kernel_size // 2,
                                          output_padding=1), act_layer()]
            prev = ch
        layers += [nn.Conv2d(prev, out_chans, 1)]
        super().__init__(*layers)


class ConvAE(nn.Module):
    """The unified CNN autoencoder: spatial bottleneck, or a dense one (flatten, dense, dense back).

    Args:
        img_size: Input height = width.
        channels: Channels of the strided convs.
        latent_channels: Channels of the 1x1 conv closing the encoder (16 -> 16x16x16 at 256).
        kernel_size: Conv kernel (5 in the baselines, 3 inside DC_TAE / SC_TAE).
        bottleneck: ``"spatial"`` or ``"dense"``.
        latent_dim: Width of the dense bottleneck.
        act_layer: Activation after every conv / dense layer except the output.
    """

    def __init__(
            self,
            img_size: int = 256,
            channels: Sequence[int] = (32, 64, 128, 128),
            latent_channels: int = 16,
            kernel_size: int = 5,
            bottleneck: Literal["spatial", "dense"] = "dense",
            latent_dim: int = 512,
            act_layer: Callable[[], nn.Module] = LeakyReLU03,
    ) -> None:
        super().__init__()
        down = 2 ** len(channels)
        if img_size % down:
            raise ValueError(f"img_size ({img_size}) must be divisible by {down} for {len(channels)} strided convs.")
        if bottleneck not in ("spatial", "dense"):
            raise ValueError(f"bottleneck must be 'spatial' or 'dense', got {bottleneck!r}")
        self.bottleneck = bottleneck
        self.latent_shape = (latent_channels, img_size // down, img_size // down)
        flat = math.prod(self.latent_shape)
        self.encoder = ConvEncoder(1, channels, latent_channels, kernel_size, act_layer)
        if bottleneck == "dense":
            self.enc_fc = nn.Sequential(nn.Flatten(1), nn.Linear(flat, latent_dim), act_layer())
            self.dec_fc = nn.Sequential(nn.Linear(latent_dim, flat), act_layer())
        else:
            self.enc_fc = nn.Identity()
            self.dec_fc = nn.Identity()
        self.decoder = ConvDecoder(1, channels, latent_channels, kernel_size, act_layer)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_fc(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.dec_fc(z)
        return self.decoder(z.reshape(z.shape[0], *self.latent_shape))


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry for each vector of ``z`` (..., D); returns (quantised, indices)."""
    flat = z.reshape(-1, z.shape[-1])
    # squared distances without materialising (n, K, D)
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
    idx = d.argmin(1)
    return codebook[idx].reshape(z.shape), idx.reshape(z.shape[:-1])


class VectorQuantizer(nn.Module):
    """VQ-VAE quantiser (van den Oord et al. 2017) on NCHW latents, straight-through gradient.

    ``forward`` returns the straight-through quantised latent and the two loss terms (codebook and
    weighted commitment). Codebook usage of the last batch is kept in :attr:`last_usage` (a plain
    dict, not part of the weights) so the loss dict stays losses only.
    """

    def __init__(self, num_codes: int = 512, code_dim: int = 16, commitment: float = 0.25) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.commitment = commitment
        self.codebook = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-1. / num_codes, 1. / num_codes))
        self.last_usage: dict[str, float] = {}

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_nhwc = z.permute(0, 2, 3, 1)
        q, idx = vector_quantize(z_nhwc, self.codebook)
        losses = {
            "codebook": F.mse_loss(q, z_nhwc.detach()),
            "commitment": self.commitment * F.mse_loss(z_nhwc, q.detach()),
        }
        q = z_nhwc + (q - z_nhwc).detach()  # straight-through estimator
        self._record_usage(idx)
        return q.permute(0, 3, 1, 2), losses

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor) -> None:
        if idx.device.type == "meta":  # shape-only pass (parameter table): nothing to count
            return
        counts = torch.bincount(idx.flatten(), minlength=self.num_codes).float()
        probs = counts / counts.sum()
        entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
        self.last_usage = {
            "used_fraction": float((counts > 0).float().mean()),
            "perplexity": float(entropy.exp()),
        }

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, code_dim={self.code_dim}, commitment={self.commitment}"
