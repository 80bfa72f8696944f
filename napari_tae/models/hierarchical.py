"""Hierarchical transformer autoencoders H_TAE and H_TAE_S (Swin-UNet-like).

From Ghorbel et al., "Transformer based Models for Unsupervised Anomaly Segmentation in Brain MR
Images", BrainLes 2022 (arXiv:2207.02059), inspired by Swin-UNet (Cao et al., arXiv:2105.05537).

Conv patch embedding (p=4, C=96) -> L/2 encoder stages of 2 blocks, patch merging (timm
``PatchMerging``: 2x2 concat, LN, linear 4C -> 2C) between stages, down to (64, 768) at 256 input ->
mirrored decoder: one stage at the bottleneck resolution, then patch expanding (linear C -> 2C,
depth-to-space 2, LN) before each further stage -> final x4 expansion and a 1x1 conv to 1 channel.
``h_tae_s`` adds each encoder stage's output to the decoder stage of the same resolution (then
LayerNorm); ``h_tae`` has no skip connections.

Blocks are timm's ``SwinTransformerBlock`` (window attention with relative position bias, shifted
windows on every second block) by default; ``attention="global"`` uses timm's ViT ``Block`` over
all tokens instead (the reference code's choice, without position information). The window size
is clamped to the feature map at small inputs (timm does this), so every input size whose grid is
divisible by 2^(stages-1) works. Decoder blocks are self-attention blocks (the reference's decoder
"cross-attention" attends to its own stage input, which a self-attention block already covers).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block

from ._base import ModelConfig, ReconstructionModel, init_weights
from ._registry import register_model
from .blocks import PatchExpand

__all__ = ["HTAEConfig", "HierarchicalTAE"]

#: Largest expanded map built at once by the final expansion (see ``forward_decoder``).
_EXPAND_CHUNK_BYTES = 32 * 2 ** 20


@dataclasses.dataclass
class HTAEConfig(ModelConfig):
    """Config of the hierarchical transformer autoencoders.

    Args:
        img_size: Input height = width.
        patch_size: Patch size of the conv embedding (4 -> 64x64 tokens at 256).
        embed_dim: Channels C of the first stage; doubled by every patch merging.
        depth: Encoder blocks in total (paper's L); stages = depth // blocks_per_stage.
        blocks_per_stage: Blocks per stage (2 in the paper).
        num_heads: Heads in every stage (the paper keeps h constant).
        window_size: Swin window (clamped to the feature map when larger).
        attention: "window" (shifted windows, default) or "global".
        skip: Additive skip connections encoder -> decoder (H_TAE_S).
        mlp_ratio: MLP hidden width / C.
        qkv_bias: Bias on q, k, v projections.
        drop_rate: Dropout (reference 0 for the hierarchical models).
        drop_path_rate: Stochastic depth, linearly increasing over encoder blocks.
    """

    img_size: int = 256
    patch_size: int = 4
    embed_dim: int = 96
    depth: int = 8
    blocks_per_stage: int = 2
    num_heads: int = 4
    window_size: int = 8
    attention: str = "window"
    skip: bool = False
    mlp_ratio: float = 4.
    qkv_bias: bool = True
    drop_rate: float = 0.
    drop_path_rate: float = 0.

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth % self.blocks_per_stage or self.depth < self.blocks_per_stage:
            raise ValueError(f"depth ({self.depth}) must be a positive multiple of blocks_per_stage "
                             f"({self.blocks_per_stage}).")
        if self.attention not in ("window", "global"):
            raise ValueError(f"attention must be 'window' or 'global', got {self.attention!r}")
        need = self.patch_size * 2 ** (self.num_stages - 1)
        if self.img_size % need:
            raise ValueError(f"img_size ({self.img_size}) must be divisible by {need} "
                             f"(patch {self.patch_size}, {self.num_stages} stages).")
        for i in range(self.num_stages):
            if (self.embed_dim * 2 ** i) % self.num_heads:
                raise ValueError(f"stage width {self.embed_dim * 2 ** i} not divisible by num_heads {self.num_heads}.")

    @property
    def num_stages(self) -> int:
        return self.depth // self.blocks_per_stage


class _GlobalBlock(Block):
    """timm ViT block applied to all tokens of an NHWC map (global attention)."""

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        B, H, W, C = x.shape
        return super().forward(x.reshape(B, H * W, C)).reshape(B, H, W, C)


def _make_blocks(cfg: HTAEConfig, dim: int, resolution: int, drop_path: list[float]) -> nn.Sequential:
    norm_layer = nn.LayerNorm
    blocks = []
    for i, dp in enumerate(drop_path):
        if cfg.attention == "window":
            block = SwinTransformerBlock(
                dim, input_resolution=(resolution, resolution), num_heads=cfg.num_heads,
                window_size=cfg.window_size, shift_size=0 if i % 2 == 0 else cfg.window_size // 2,
                mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.drop_rate,
                attn_drop=cfg.drop_rate, drop_path=dp, norm_layer=norm_layer)
            # timm leaves it off for windows (experimental); the same attention, 6-12 % faster at
            # one CPU thread (docs/speed.md, section 8)
            block.attn.fused_attn = True
            blocks.append(block)
        else:
            blocks.append(_GlobalBlock(
                dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.drop_rate,
                attn_drop=cfg.drop_rate, drop_path=dp, norm_layer=norm_layer))
    return nn.Sequential(*blocks)


class HierarchicalTAE(ReconstructionModel):
    """H_TAE / H_TAE_S. ``forward_encoder`` returns the bottleneck tokens B x L x C (64 x 768 at 256)."""

    def __init__(self, config: HTAEConfig) -> None:
        super().__init__(config)
        n = config.num_stages
        bps = config.blocks_per_stage
        res0 = config.img_size // config.patch_size
        dims = [config.embed_dim * 2 ** i for i in range(n)]
        res = [res0 // 2 ** i for i in range(n)]
        self.dims, self.resolutions = dims, res
        self.skip = config.skip
        dpr = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]

        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, in_chans=1, embed_dim=dims[0],
                                      norm_layer=nn.LayerNorm, output_fmt="NHWC")
        self.pos_drop = nn.Dropout(config.drop_rate)
        # encoder: stage i = [patch merging (i > 0)] + blocks at dims[i], res[i]
        self.stages = nn.ModuleList()
        for i in range(n):
            self.stages.append(nn.Sequential(
                PatchMerging(dims[i - 1], dims[i]) if i > 0 else nn.Identity(),
                _make_blocks(config, dims[i], res[i], dpr[i * bps:(i + 1) * bps]),
            ))
        self.norm = nn.LayerNorm(dims[-1])

        # decoder: stage j works at level k = n-1-j; stage 0 at the bottleneck, later ones expand first
        self.expands = nn.ModuleList()
        self.skip_norms = nn.ModuleList()
        self.dec_stages = nn.ModuleList()
        for j in range(n):
            k = n - 1 - j
            self.expands.append(PatchExpand(dims[k + 1], 2, dims[k]) if j > 0 else nn.Identity())
            self.skip_norms.append(nn.LayerNorm(dims[k]) if (config.skip and j > 0) else nn.Identity())
            self.dec_stages.append(_make_blocks(config, dims[k], res[k], dpr[k * bps:(k + 1) * bps][::-1]))
        self.dec_norm = nn.LayerNorm(dims[0])
        self.final_expand = PatchExpand(dims[0], config.patch_size, dims[0])
        self.head = nn.Conv2d(dims[0], 1, kernel_size=1)

        self.apply(init_weights)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NHWC outputs of every encoder stage, the last one normed (the bottleneck)."""
        x = self.pos_drop(self.patch_embed(x))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats[-1] = self.norm(feats[-1])
        return feats

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        z = self._encode(x)[-1]
        return z.flatten(1, 2)  # NHWC -> NLC

    def forward_decoder(self, z: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Bottleneck tokens (B, L, C) -> image; ``skips`` (encoder stage outputs) required for H_TAE_S."""
        if self.skip and skips is None:
            raise ValueError("H_TAE_S needs the encoder skip features: call forward() or pass skips.")
        r = self.resolutions[-1]
        x = z.reshape(z.shape[0], r, r, z.shape[-1])
        n = len(self.dec_stages)
        for j in range(n):
            x = self.expands[j](x)
            if self.skip and j > 0:
                x = self.skip_norms[j](x + skips[n - 1 - j])
            x = self.dec_stages[j](x)
        x = self.dec_norm(x)
        # the final x(p*p) expansion, a few slices at a time: at 256 px one slice's expanded map
        # is 25 MiB, a batch of 16 400 MiB, which glibc would map afresh on every pass
        # (docs/speed.md); every op here works slice by slice, so the output is unchanged
        slice_bytes = x.shape[1] * x.shape[2] * self.final_expand.expand.out_features * x.element_size()
        step = max(1, _EXPAND_CHUNK_BYTES // slice_bytes)
        weight = self.head.weight.flatten(1)  # the 1x1 conv as a linear map on NHWC: no layout copy
        out = torch.cat([F.linear(self.final_expand(part), weight, self.head.bias) for part in x.split(step)])
        return out.permute(0, 3, 1, 2)  # NHWC -> NCHW (one channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        feats = self._encode(x)
        return self.forward_decoder(feats[-1].flatten(1, 2), feats if self.skip else None)

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return dict(img_size=256, in_chans=1, **kwargs)


default_cfgs = {
    # the paper's Table 4 says (1024, 768); four stages at 256 input give (64, 768), as the reference code
    "h_tae": _cfg(bottleneck=(64, 768), reference_params=103.7e6),
    "h_tae_s": _cfg(bottleneck=(64, 768), reference_params=103.7e6),
}


def _create_htae(_config_only: bool = False, **kwargs: Any):
    config = HTAEConfig(**kwargs)
    return config if _config_only else HierarchicalTAE(config)


@register_model
def h_tae(_config_only: bool = False, **kwargs: Any):
    """H_TAE: L=8 (4 stages x 2), p=4, h=4, C=96, shifted windows of 8, no skips."""
    model_args = dict(patch_size=4, embed_dim=96, depth=8, num_heads=4, window_size=8, skip=False)
    return _create_htae(_config_only, **dict(model_args, **kwargs))


@register_model
def h_tae_s(_config_only: bool = False, **kwargs: Any):
    """H_TAE_S (paper's best): as H_TAE with additive skip connections."""
    model_args = dict(patch_size=4, embed_dim=96, depth=8, num_heads=4, window_size=8, skip=True)
    return _create_htae(_config_only, **dict(model_args, **kwargs))
