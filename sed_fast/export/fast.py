"""The fast model's decoder as one exportable graph (``sed-fast export --impl fast``).

The fast decoder (:class:`sed_fast.models.fast.layers.FastDecoder`) runs its per-class work in
chunks sized on the host and calls ``sed_fast::`` custom ops whose kernels an exported file cannot
carry (a package that loads with torch alone, an ONNX model for ONNX Runtime). Here is the same
decoder, exact decoding of one image, written with plain PyTorch ops only, so that torch.export
traces it with a dynamic image size and class count. Each piece keeps the fast formulation where
that formulation is plain PyTorch, and falls back to the op's reference formulation where it is a
kernel; :data:`FORMULATIONS` says which, and the export prints and records it.

The chunking is left out: its pieces are sized from the image and class count at run time, which a
graph with dynamic shapes cannot unroll, and the compiler (Inductor, ONNX Runtime) plans the
memory of the whole graph itself.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Each piece of the exported fast decoder: which formulation the exported graph runs, and why.
FORMULATIONS: Dict[str, str] = {
    "image_encoder": "reference: the same modules (the eager fast model differs in memory layout, oneDNN "
                     "linears and CUDA graphs, which the compiler decides for itself)",
    "cost_map": "fast: normalise + one einsum straight into the per-class rows (T, P, h, w), not the official "
                "(B, P, T, h, w) map then a permuted copy (sed_fast::cost_map's kernel: no export path)",
    "dwconv_layernorm": "reference: depthwise conv, then LayerNorm (sed_fast::dwconv_layernorm's fused kernel: "
                        "no export path)",
    "convnext_mlp": "fast: the MLP on channels-last tokens, gamma and residual in one addcmul; one piece (the "
                    "chunks are sized at run time)",
    "class_attention": "fast: q, k, v from one GEMM (fused weight), the linear attention across classes written "
                       "on the (T, P, H, d) rows as they lie, KV and the key sum contracted over the classes "
                       "(the reference transposes q, k, v to per-pixel rows first; sed_fast::class_attention's "
                       "kernel: no export path)",
    "double_conv": "fast: the first conv's weight split by input channels, the image guidance convolved once "
                   "and broadcast over the classes (the reference convolves it repeated T times)",
    "aux_heads": "fast: not computed (exact decoding reads none of them)",
}


def _positive_feature(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1, the linear attention's feature map, as the official code computes it."""
    return F.elu(x) + 1


def class_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    eps: float = 1e-6) -> torch.Tensor:
    """The multi-head linear attention across all T rows (one image) at every pixel: q, k, v (T, P, C)
    -> (T, P, C). The official result (``kernels.class_attention_reference``) to rounding: the
    official code scales v by 1/T and the output back by T, which cancels."""
    classes, pixels, channels = q.shape
    head_dim = channels // num_heads
    q = _positive_feature(q.reshape(classes, pixels, num_heads, head_dim))
    k = _positive_feature(k.reshape(classes, pixels, num_heads, head_dim))
    v = v.reshape(classes, pixels, num_heads, head_dim)
    kv = torch.einsum("tphd,tphe->phde", k, v)
    numerator = torch.einsum("tphd,phde->tphe", q, kv)
    denominator = (q * k.sum(0)).sum(-1, keepdim=True) + eps
    return (numerator / denominator).reshape(classes, pixels, channels)


def _convnext(block, x: torch.Tensor) -> torch.Tensor:
    """FastConvNextBlock: x (T, C, H, W) -> tokens (T, H, W, C)."""
    channels = x.shape[1]
    normed = F.conv2d(x, block.dwconv.weight, block.dwconv.bias, padding=block.dwconv.padding, groups=channels)
    normed = F.layer_norm(normed.permute(0, 2, 3, 1), (channels,), block.norm.weight, block.norm.bias, block.norm.eps)
    hidden = F.gelu(F.linear(normed, block.pwconv1.weight, block.pwconv1.bias))
    return torch.addcmul(x.permute(0, 2, 3, 1), block.gamma, F.linear(hidden, block.pwconv2.weight, block.pwconv2.bias))


class ExportableFastDecoder(nn.Module):
    """The fast decoder's exact decoding of one image in plain PyTorch, built from a reference or a
    fast decoder (the same modules and parameter names; shared, not copied). The weights the fast
    layers derive (the fused q, k, v weight; the first conv's weight split by input channels) are
    buffers here, computed once: in the exported file they are constants, as the parameters are."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.layers = (decoder.decoder1, decoder.decoder2, decoder.decoder3)
        for i, layer in enumerate(self.layers):
            attn = layer.attention.attention
            with torch.no_grad():
                self.register_buffer(f"qkv_weight{i}", torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
                self.register_buffer(f"qkv_bias{i}", torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
                weight = layer.conv.double_conv[0].weight  # input channels: [upsampled x | guidance | corr guidance]
                up_channels = layer.up.out_channels
                guide_channels = weight.shape[1] - up_channels - (layer.conv.double_conv[0].in_channels
                                                                  - layer.up.in_channels)
                self.register_buffer(f"conv_class_weight{i}", torch.cat(
                    [weight[:, :up_channels], weight[:, up_channels + guide_channels:]], 1).contiguous())
                self.register_buffer(f"conv_guide_weight{i}",
                                     weight[:, up_channels:up_channels + guide_channels].contiguous())

    def forward(self, img_feats: torch.Tensor, text: torch.Tensor, guidance: Sequence[torch.Tensor]) -> torch.Tensor:
        """img_feats (1, D, h, w), text (T, P, D), guidance (res5, res4, res3, res2) -> scores
        (1, T, 8h, 8w), the sigmoid of the logits."""
        decoder = self.decoder
        _, res4, res3, res2 = guidance
        img = F.normalize(img_feats[0], dim=0)
        corr = torch.einsum("dhw,tpd->tphw", img, F.normalize(text.to(img.dtype), dim=-1))  # (T, P, h, w)
        x = decoder.conv1(corr)
        image_guidance = decoder.decoder_guidance(res4, res3, res2)
        corr_source = corr
        for i, layer in enumerate(self.layers):
            corr_source = decoder.decoder_corr_guidance_projection[i](corr_source)
            x = self._fusion_layer(i, layer, x, image_guidance[i], corr_source)
        return decoder.head(x)[:, 0].float().sigmoid()[None]

    def _fusion_layer(self, i: int, layer, x: torch.Tensor, guidance: torch.Tensor,
                      corr_guidance: torch.Tensor) -> torch.Tensor:
        """FastUp: x (T, C, H, W), guidance (1, g, 2H, 2W), corr_guidance (T, g, 2H, 2W) -> (T, C_out, 2H, 2W)."""
        classes, channels, height, width = x.shape
        tokens = _convnext(layer.cnext, x).reshape(classes, height * width, channels)
        attended = self._class_transformer(i, layer.attention, tokens)
        x = attended.reshape(classes, height, width, channels).permute(0, 3, 1, 2)
        norm_a, conv_b, norm_b = layer.conv.double_conv[1], layer.conv.double_conv[3], layer.conv.double_conv[4]
        y = F.conv2d(torch.cat([layer.up(x), corr_guidance], 1), getattr(self, f"conv_class_weight{i}"), padding=1)
        y = y + F.conv2d(guidance, getattr(self, f"conv_guide_weight{i}"), padding=1)  # once, for every class
        y = F.relu(norm_a(y))
        return F.relu(norm_b(conv_b(y)))

    def _class_transformer(self, i: int, layer, tokens: torch.Tensor) -> torch.Tensor:
        """FastClassTransformerLayer at pooling (1, 1): tokens (T, P, C) -> ``2x + attention + MLP``."""
        channels = tokens.shape[-1]
        normed = F.layer_norm(tokens, (channels,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        qkv = F.linear(normed, getattr(self, f"qkv_weight{i}"), getattr(self, f"qkv_bias{i}"))
        q, k, v = qkv.split(channels, dim=-1)
        branch = tokens + class_attention(q, k, v, layer.attention.num_heads)
        normed = F.layer_norm(branch, (channels,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
        mlp = F.linear(F.relu(F.linear(normed, layer.MLP[0].weight, layer.MLP[0].bias)),
                       layer.MLP[2].weight, layer.MLP[2].bias)
        return tokens + branch + mlp
