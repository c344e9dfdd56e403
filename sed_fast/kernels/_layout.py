"""Layout helpers shared by the kernel launchers."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def pixel_strides(x: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """For a 4-D (B, C, h, w) tensor: (stride_b, stride_c, stride_pixel) when h and w flatten into
    one pixel axis without a copy (contiguous and channels-last both do), else None."""
    _, _, height, width = x.shape
    stride_b, stride_c, stride_h, stride_w = x.stride()
    if height == 1 or stride_h == width * stride_w:
        return stride_b, stride_c, stride_w
    return None
