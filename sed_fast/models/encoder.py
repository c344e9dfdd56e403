"""The CLIP side of SED: open_clip ConvNeXt models, dense image features, image preprocessing.

The CLIP model is built by open_clip (which builds the ConvNeXt trunk with timm), never copied by
hand, so its state-dict keys are exactly those of the official checkpoints.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VariantSpec:
    """What distinguishes the released SED models."""

    name: str                      # "b" or "l"
    checkpoint_name: str           # "sed-b" / "sed-l" (names used in the shapes fixture)
    clip_model: str                # open_clip model name
    embed_dim: int                 # D, the CLIP embedding width
    trunk_dims: Tuple[int, int, int, int]  # channels of res2..res5

    @property
    def guidance_dims(self) -> Tuple[int, int, int]:
        """Channels of res4, res3, res2: the decoder guidance inputs."""
        return (self.trunk_dims[2], self.trunk_dims[1], self.trunk_dims[0])


VARIANTS: Dict[str, VariantSpec] = {
    "b": VariantSpec("b", "sed-b", "convnext_base_w_320", 640, (128, 256, 512, 1024)),
    "l": VariantSpec("l", "sed-l", "convnext_large_d_320", 768, (192, 384, 768, 1536)),
}

# CLIP pixel statistics in 0..255 units (MODEL.CLIP_PIXEL_MEAN / STD of the official config).
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.3231630)
CLIP_RESOLUTION = 768  # the official model resizes every input to 768x768


def variant_spec(variant: str) -> VariantSpec:
    """The spec of ``variant`` ("b"/"l", also accepted: "sed-b", "B", "convnext_base_w_320"...)."""
    key = str(variant).lower().strip()
    for spec in VARIANTS.values():
        if key in (spec.name, spec.checkpoint_name, spec.clip_model, f"sed_{spec.name}"):
            return spec
    raise ValueError(f"unknown SED variant {variant!r}; expected 'b' (ConvNeXt-B) or 'l' (ConvNeXt-L)")


@contextmanager
def _quiet_open_clip():
    """open_clip logs a warning whenever it builds a model without pretrained weights; we always do
    (weights come from the SED checkpoint), so that warning would only mislead."""
    logger = logging.getLogger()
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def create_clip_model(spec: VariantSpec, device="cpu") -> nn.Module:
    """An open_clip CLIP model of the variant's architecture, randomly initialised, in eval mode."""
    import open_clip

    with _quiet_open_clip():
        model = open_clip.create_model(spec.clip_model, pretrained=None, device=device)
    return model.eval()


def create_tokenizer(spec: VariantSpec):
    """open_clip's tokenizer for the variant (its BPE vocabulary ships with open_clip: offline)."""
    import open_clip

    return open_clip.get_tokenizer(spec.clip_model)


def dense_image_features(clip_model: nn.Module, images: torch.Tensor):
    """Dense CLIP features, as the official ``encode_image(dense=True)``.

    Args:
        images: (B, 3, S, S) CLIP-normalised images.
    Returns:
        (clip_vis_dense (B, D, S/32, S/32), [res2, res3, res4, res5]).
    """
    visual = clip_model.visual
    trunk = visual.trunk
    x = trunk.stem(images)
    stages = []
    for stage in trunk.stages:
        x = stage(x)
        stages.append(x)
    x = trunk.norm_pre(x)
    batch, channels, height, width = x.shape
    # Per-pixel CLIP head: the trunk head (LayerNorm; pooling over a fake 1x1 map is the identity)
    # then the projection, applied to every pixel as the official code does.
    pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels, 1, 1)
    pixels = visual.head(trunk.head(pixels))
    dense = pixels.view(batch, height * width, -1).permute(0, 2, 1).reshape(batch, -1, height, width)
    return dense, stages


def preprocess_images(images: torch.Tensor, resolution: int = CLIP_RESOLUTION) -> torch.Tensor:
    """RGB 0..255 (B, 3, H, W) -> CLIP-normalised, bilinearly resized to resolution x resolution."""
    mean = torch.tensor(CLIP_PIXEL_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    x = (images - mean) / std
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
