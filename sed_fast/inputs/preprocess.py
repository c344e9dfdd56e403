"""SED's official test-time resize of the raw image, before the model.

The official evaluation and demo (detectron2) resize each image with
``ResizeShortestEdge(short_edge_length=640, max_size=2560)``: the output size comes from
``ResizeShortestEdge.get_output_shape`` (reproduced by :func:`official_resize_shape`) and the pixels
from ``ResizeTransform.apply_image`` (reproduced by :func:`official_resize`): Pillow's bilinear resize
for uint8 images, ``F.interpolate(..., mode="bilinear", align_corners=False)`` for float images.
Images are upscaled as well as downscaled.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels.pil_bilinear_resize import pil_bilinear_resize

# The official configs' INPUT.MIN_SIZE_TEST and INPUT.MAX_SIZE_TEST.
OFFICIAL_SHORT_EDGE = 640
OFFICIAL_MAX_SIZE = 2560


def official_resize_shape(height: int, width: int, short_edge: int = OFFICIAL_SHORT_EDGE,
                          max_size: int = OFFICIAL_MAX_SIZE) -> Tuple[int, int]:
    """(new_h, new_w) as detectron2's ``ResizeShortestEdge.get_output_shape``: the short side becomes
    ``short_edge``, unless the long side would then exceed ``max_size``, in which case the long side
    becomes ``max_size``; both rounded half up, ``int(x + 0.5)``, in Python floats as detectron2."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")
    size = short_edge * 1.0
    scale = size / min(height, width)
    if height < width:
        new_h, new_w = size, scale * width
    else:
        new_h, new_w = scale * height, size
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h = new_h * scale
        new_w = new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def official_resize(image: torch.Tensor, short_edge: int = OFFICIAL_SHORT_EDGE, max_size: int = OFFICIAL_MAX_SIZE,
                    horizontal_first: Optional[bool] = None) -> torch.Tensor:
    """Resize a raw image as SED's official pipeline does, on the image's device.

    Args:
        image: (3, H, W) RGB, any device. uint8: resized like Pillow's ``Image.resize(..., BILINEAR)``,
            bit for bit (antialiased when shrinking), via :func:`pil_bilinear_resize`. Floating point:
            ``F.interpolate`` bilinear, ``align_corners=False``, no antialias, as detectron2 does for
            non-uint8 arrays.
        short_edge, max_size: the resize rule (:func:`official_resize_shape`).
        horizontal_first: uint8 only, the order of Pillow's two passes (see :func:`pil_bilinear_resize`;
            None: the installed Pillow's order, True: horizontal first as every Pillow before 13).

    Returns:
        (3, new_h, new_w) contiguous, in the image's dtype.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"official_resize expects a tensor image, got {type(image).__name__}")
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    new_h, new_w = official_resize_shape(image.shape[1], image.shape[2], short_edge, max_size)
    if image.dtype == torch.uint8:
        return pil_bilinear_resize(image, (new_h, new_w), horizontal_first=horizontal_first)
    if not image.is_floating_point():
        raise TypeError(f"official_resize expects a uint8 or floating-point image, got {image.dtype}")
    resized = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)
    return resized[0].contiguous()
