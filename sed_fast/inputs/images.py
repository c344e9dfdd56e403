"""The images a model takes: checked, and turned into one list of (3, H, W) tensors.

A model accepts a batch tensor (B, 3, H, W), one image (3, H, W), or a list of (3, H_i, W_i)
tensors of different sizes; RGB, uint8 or floating point in 0..255. Errors say what was wrong
and how to fix it (grayscale, RGBA, channels-last arrays, too small, empty batch); NaN / infinite
pixels and values outside 0..255 are refused; a float image whose values all lie in [0, 1] gets
a warning (a 0..1 image where 0..255 is expected changes most labels).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch

from ..base.errors import PixelRangeWarning

MIN_IMAGE_SIDE = 32
#: Float pixels outside this range are refused: a scale other than 0..255 (a small margin allows
#: the overshoot of a bicubic resize done by the caller).
PIXEL_LIMITS = (-1.0, 256.0)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class ImageList:
    """Checked input images. ``images``: (3, H_i, W_i) tensors as given (uint8 or float);
    ``as_batch``: the input was a tensor, so the output is one tensor too (else a list)."""

    images: List[torch.Tensor]
    as_batch: bool

    @property
    def sizes(self) -> List[Tuple[int, int]]:
        return [tuple(image.shape[-2:]) for image in self.images]

    def __len__(self) -> int:
        return len(self.images)


def _channel_hint(shape) -> str:
    channels = shape[0]
    if shape[-1] in (1, 3, 4) and channels > 4:
        return " (this looks channels-last (H, W, C): use image.permute(2, 0, 1))"
    if channels == 1:
        return " (grayscale: repeat it to 3 channels, e.g. image.expand(3, -1, -1))"
    if channels == 4:
        return " (RGBA: drop the alpha channel, image[:3])"
    return ""


def _check_one(image, where: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor of shape (3, H, W), got {type(image).__name__}")
    if image.device.type == "meta":
        raise ValueError(f"{where} is on the meta device ({image.device}): a tensor with a shape but no data "
                         "(e.g. made under torch.device('meta')); give the pixels on cpu or cuda")
    if image.dim() != 3:
        raise ValueError(f"{where} must have shape (3, H, W), got {tuple(image.shape)}")
    if image.shape[0] != 3:
        raise ValueError(f"{where} must have 3 RGB channels first, got shape {tuple(image.shape)}"
                         f"{_channel_hint(image.shape)}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"{where} must be float (RGB in 0..255) or uint8, got {image.dtype}")
    height, width = image.shape[-2:]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"{where} must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels, got {height}x{width}")
    return image


def as_image_list(images: Images) -> ImageList:
    """Check the input's form (not its values) and return it as an :class:`ImageList`."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0): give at least one image")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 RGB channels in dim 1, got shape {tuple(images.shape)}"
                             f"{_channel_hint(images.shape[1:])}")
        return ImageList([_check_one(image, "images") for image in images.unbind(0)], as_batch=True)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list: give at least one image")
        return ImageList([_check_one(image, f"images[{i}]") for i, image in enumerate(images)], as_batch=False)
    raise TypeError("images must be a torch.Tensor (B, 3, H, W) or (3, H, W), or a list of (3, H, W) tensors; "
                    f"got {type(images).__name__}")


def pixel_extremes(batch: ImageList) -> torch.Tensor:
    """(N, 2) float32 min and max of each float image, on the images' device (no host sync);
    an empty tensor when every image is uint8 (always in range)."""
    rows = [torch.stack(torch.aminmax(image.detach())).float() for image in batch.images
            if image.is_floating_point()]
    if not rows:
        return torch.empty(0, 2)
    device = rows[0].device
    return torch.stack([row.to(device) for row in rows])


def check_pixel_values(extremes: torch.Tensor) -> None:
    """Refuse NaN / infinite pixels and values outside :data:`PIXEL_LIMITS`; warn when every float
    image lies within [0, 1]. ``extremes`` from :func:`pixel_extremes` (read here: one host sync)."""
    if extremes.numel() == 0:
        return
    values = extremes.tolist()
    lows, highs = [low for low, _ in values], [high for _, high in values]
    if not all(torch.isfinite(torch.tensor(lows + highs)).tolist()):
        raise ValueError("images contain NaN or infinite values")
    low, high = min(lows), max(highs)
    if low < PIXEL_LIMITS[0] or high > PIXEL_LIMITS[1]:
        raise ValueError(f"image values span {low:.4g}..{high:.4g}, but the model takes RGB in 0..255 "
                         "(uint8, or float on the same scale): rescale the images to 0..255")
    if high <= 1.0:
        warnings.warn(f"every float image lies within [0, 1] (values {low:.3g}..{high:.3g}), but the model takes "
                      "RGB in 0..255: multiply by 255 if these are 0..1 images", PixelRangeWarning, stacklevel=3)
