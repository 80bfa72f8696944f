"""The CNN blocks on channels-last activations give the values of a plain NCHW hand reference.

The reference pads explicitly (F.pad, then an unpadded conv) and computes each transposed conv as
zero insertion plus an ordinary conv with the flipped kernel, all on contiguous NCHW tensors, so
it shares neither the memory layout nor the transposed-conv kernel with the blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_tae.models import build_model
from napari_tae.models.blocks import ConvDecoder, ConvEncoder


def _conv_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    p = conv.padding[0]
    return F.conv2d(F.pad(x, (p, p, p, p)), conv.weight, conv.bias, stride=conv.stride)


def _transposed_conv_reference(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """Stride-s transposed conv = zeros between the inputs, pad, conv with the flipped kernel."""
    s, k, p, extra = conv.stride[0], conv.kernel_size[0], conv.padding[0], conv.output_padding[0]
    b, c, h, w = x.shape
    spread = x.new_zeros(b, c, (h - 1) * s + 1, (w - 1) * s + 1)
    spread[:, :, ::s, ::s] = x
    lead, trail = k - 1 - p, k - 1 - p + extra
    weight = conv.weight.flip(-1, -2).transpose(0, 1)  # (in, out, k, k) -> (out, in, k, k)
    return F.conv2d(F.pad(spread, (lead, trail, lead, trail)), weight, conv.bias)


def _sequential_reference(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    for layer in seq:
        if isinstance(layer, nn.ConvTranspose2d):
            x = _transposed_conv_reference(layer, x)
        elif isinstance(layer, nn.Conv2d):
            x = _conv_reference(layer, x)
        elif isinstance(layer, nn.LeakyReLU):
            x = F.leaky_relu(x, layer.negative_slope)
        else:
            raise AssertionError(f"no reference for {layer}")
        assert x.is_contiguous()
    return x


def test_transposed_conv_reference_by_hand():
    """One input pixel, a 3x3 kernel of 1..9, stride 2, padding 1, output padding 1: the output is
    the kernel itself cropped by the padding, then the unused output padding row and column."""
    conv = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, output_padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1., 10.).reshape(1, 1, 3, 3))
    out = _transposed_conv_reference(conv, torch.ones(1, 1, 1, 1))
    assert out[0, 0].tolist() == [[5., 6.], [8., 9.]]


@pytest.mark.parametrize("kernel", [3, 5])
def test_blocks_match_the_nchw_reference(kernel):
    torch.manual_seed(0)
    encoder = ConvEncoder(1, (8, 16), 4, kernel)
    decoder = ConvDecoder(1, (8, 16), 4, kernel)
    x = torch.rand(2, 1, 32, 32)
    layouts = []
    for seq in (encoder, decoder):  # the first strided conv of each block sees channels-last
        conv = next(m for m in seq if getattr(m, "stride", None) == (2, 2))
        conv.register_forward_pre_hook(
            lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        z = encoder(x)
        torch.testing.assert_close(z, _sequential_reference(encoder, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(decoder(z), _sequential_reference(decoder, z), rtol=1e-5, atol=1e-6)
    assert layouts == [True, True]


@pytest.mark.parametrize("name", ["ae_dense", "ae_spatial"])
def test_cnn_models_match_the_nchw_reference(name):
    """Whole models (the dense bottleneck flattens a channels-last map: NCHW order must hold)."""
    torch.manual_seed(0)
    model = build_model(name, img_size=64).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        z = _sequential_reference(model.ae.encoder, x)
        z = model.ae.dec_fc(model.ae.enc_fc(z)).reshape(x.shape[0], *model.ae.latent_shape)
        expected = _sequential_reference(model.ae.decoder, z)
        out = model(x)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
