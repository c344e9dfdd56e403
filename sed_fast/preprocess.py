"""The official test-time resize (detectron2 ``ResizeShortestEdge(640, max_size=2560)``)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

OFFICIAL_SHORT_EDGE = 640   # INPUT.MIN_SIZE_TEST of the official configs
OFFICIAL_MAX_SIZE = 2560    # INPUT.MAX_SIZE_TEST


def official_resize_shape(height: int, width: int, short_edge: int = OFFICIAL_SHORT_EDGE,
                          max_size: int = OFFICIAL_MAX_SIZE) -> Tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape``: (new_h, new_w)."""
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def official_resize(image: torch.Tensor, short_edge: int = OFFICIAL_SHORT_EDGE,
                    max_size: int = OFFICIAL_MAX_SIZE) -> torch.Tensor:
    """(3, H, W) -> (3, new_h, new_w): uint8 as PIL's bilinear resize, float as F.interpolate."""
    size = official_resize_shape(image.shape[-2], image.shape[-1], short_edge, max_size)
    if image.dtype == torch.uint8:
        from PIL import Image
        array = image.permute(1, 2, 0).cpu().numpy()
        resized = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))
        return torch.from_numpy(resized.copy()).permute(2, 0, 1).to(image.device)
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
