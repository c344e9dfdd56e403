"""Overlay frames of the video's own size: the class colours blended in, the legend of the image
overlays (:mod:`sed_fast.visualize`) drawn in the top-right corner and, for random weights, the red
banner across the top (a video's frames must all have one size, so nothing is added beside it)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .. import visualize

#: The legend covers at most this share of the frame's width and height (it is scaled down to fit).
LEGEND_MAX_SHARE = (0.4, 0.9)


def render_frame(rgb: np.ndarray, labels: np.ndarray, shown_names: Sequence[str], *, alpha: float = 0.5,
                 banner: bool = False, colours: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W, 3) uint8 frame + (H, W) labels -> (H, W, 3) uint8 overlay frame."""
    height, width = labels.shape
    colours = visualize.palette(len(shown_names)) if colours is None else colours
    picture = visualize.overlay(rgb, labels, alpha, colours)
    font_size = max(8, min(visualize._font_size_for(max(height, 200)), height // 10))
    top = 0
    if banner:
        strip = visualize.draw_banner(width, visualize.RANDOM_WEIGHTS_BANNER_LINE, font_size)
        picture.paste(strip, (0, 0))
        top = strip.height
    entries = visualize.legend_entries(labels, shown_names, colours)
    if entries:
        row = visualize._line_height(visualize._font(font_size)) + max(2, font_size // 4)
        max_items = int(max(1, min(20, (height - top) * LEGEND_MAX_SHARE[1] // max(row, 1) - 1)))
        legend = visualize.draw_legend([(name, colour, share) for _, name, colour, share in entries],
                                       max_items=max_items, font_size=font_size)
        room_w, room_h = int(width * LEGEND_MAX_SHARE[0]), int((height - top) * LEGEND_MAX_SHARE[1])
        scale = min(1.0, room_w / legend.width, room_h / legend.height)
        if scale < 1.0:
            legend = legend.resize((max(1, int(legend.width * scale)), max(1, int(legend.height * scale))),
                                   Image.BILINEAR)
        picture.paste(legend, (width - legend.width, top))
    return np.asarray(picture)
