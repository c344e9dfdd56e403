"""The CLIP side of SED: open_clip ConvNeXt models, dense image features, image preprocessing.

The CLIP model is built by open_clip (which builds the ConvNeXt trunk with timm), never copied by
hand, so its state-dict keys are exactly those of the official checkpoints.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, CLIP_RESOLUTION, VARIANTS, VariantSpec, variant_spec  # noqa: F401


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


def set_train_regularisation(clip_model: nn.Module, spec: VariantSpec) -> None:
    """Give the image tower the stochastic depth and head dropout of the official code's open_clip
    configuration (``spec.train_drop_path``, ``spec.train_head_dropout``; active in train mode
    only), whatever the installed open_clip's configuration says. Stochastic depth follows timm's
    schedule: rates rising linearly from 0 over the trunk's blocks."""
    from timm.layers import DropPath

    blocks = [block for stage in clip_model.visual.trunk.stages for block in stage.blocks]
    rates = torch.linspace(0, spec.train_drop_path, len(blocks)).tolist() if blocks else []
    for block, rate in zip(blocks, rates):
        block.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
    head = clip_model.visual.head
    if hasattr(head, "drop"):  # "linear" projection: Dropout then Linear
        head.drop.p = spec.train_head_dropout
    if hasattr(head, "mlp"):  # "mlp" projection: the dropout after its first layer
        head.mlp.drop1.p = spec.train_head_dropout


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
