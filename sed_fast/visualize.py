"""Turning SED scores into pictures: label maps, class colours, overlays and a legend.

Only Pillow and numpy are used (the legend font is ``ImageFont.load_default()``, bundled with
Pillow; nothing is downloaded).

    >>> labels = label_image(scores)                 # (T, H, W) scores -> (H, W) class indices
    >>> picture = render_overlay(image, labels, class_names)   # blended image + legend panel
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = Tuple[int, int, int]

__all__ = ["palette", "class_colour", "label_image", "label_map_image", "class_areas", "colorize", "overlay",
           "draw_legend", "legend_entries", "render_overlay", "draw_banner", "png_info", "PNG_MARKER_KEY",
           "RANDOM_WEIGHTS_MARKER", "RANDOM_WEIGHTS_BANNER", "RANDOM_WEIGHTS_BANNER_LINE", "RELEASED_WEIGHTS_URL",
           "BANNER_BACKGROUND", "BANNER_TEXT"]

_LEGEND_BACKGROUND = (255, 255, 255)
_LEGEND_TEXT = (0, 0, 0)
#: The random-weights banner's colours: white on dark red, contrast 8.4:1 (WCAG asks >= 4.5:1).
BANNER_BACKGROUND = (160, 0, 0)
BANNER_TEXT = (255, 255, 255)


# -- colours ----------------------------------------------------------------------------------------
def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, deterministic and pairwise distinct (up to 2**24 - 1 classes).

    The PASCAL VOC / ADE bit-interleaving colour map applied to ``index + 1`` (so that no class is
    black): the bits of the index are spread over the high bits of R, G and B, which puts classes
    with nearby indices far apart in colour.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes > (1 << 24) - 1:
        raise ValueError(f"at most {(1 << 24) - 1} distinct colours, got num_classes={num_classes}")
    ids = np.arange(1, num_classes + 1, dtype=np.int64)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):  # 8 rounds x 3 bits = 24 bits of the index
        for channel in range(3):
            bit = (ids >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return colours.astype(np.uint8)


def class_colour(index: int) -> Colour:
    """The colour of class ``index`` (the same as ``palette(n)[index]`` for any n > index)."""
    return tuple(int(c) for c in palette(index + 1)[index])


# -- labels -----------------------------------------------------------------------------------------
def label_image(scores) -> np.ndarray:
    """Per-pixel argmax class: scores (T, H, W) or (1, T, H, W), torch or numpy -> (H, W) int64.

    Ties (e.g. classes rejected to exact zero by category early rejection) go to the lowest index.
    A torch tensor is reduced on its own device; only the (H, W) labels are copied to the host.
    """
    if hasattr(scores, "detach"):  # torch.Tensor, without importing torch here
        if scores.dim() == 4:
            if scores.shape[0] != 1:
                raise ValueError(f"label_image takes one image's scores, got shape {tuple(scores.shape)}")
            scores = scores[0]
        if scores.dim() != 3:
            raise ValueError(f"scores must have shape (T, H, W), got {tuple(scores.shape)}")
        return scores.detach().argmax(dim=0).cpu().numpy().astype(np.int64)
    scores = np.asarray(scores)
    if scores.ndim == 4:
        if scores.shape[0] != 1:
            raise ValueError(f"label_image takes one image's scores, got shape {scores.shape}")
        scores = scores[0]
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (T, H, W), got {scores.shape}")
    return scores.argmax(axis=0).astype(np.int64)


_BAND_PIXELS = 1 << 20  # pixels processed at a time: no full-size temporaries for large images


def label_map_image(labels: np.ndarray, num_classes: int, colours: Optional[np.ndarray] = None) -> Image.Image:
    """A label map (H, W) as the image to save as PNG: for up to 256 classes a palette image
    (mode ``P``) whose pixel values are the class indices, unchanged, shown in the class colours
    (``palette(num_classes)`` unless ``colours``: a viewer shows the classes, ``np.array(Image.open(f))``
    gives the indices); for more classes a 16-bit grey image (PNG has no 16-bit palette)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= max(num_classes, 1)):
        raise ValueError(f"labels must be class indices in 0..{num_classes - 1}")
    if num_classes > 256:
        return Image.fromarray(labels.astype(np.uint16))
    image = Image.fromarray(labels.astype(np.uint8, copy=False))  # "L"; putpalette makes it "P", values unchanged
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = palette(num_classes) if colours is None else np.asarray(colours, dtype=np.uint8)[:num_classes]
    image.putpalette(table.ravel().tolist())
    return image


def class_areas(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel count of each class in a label map: (num_classes,) int64."""
    flat = np.asarray(labels).reshape(-1)
    areas = np.zeros(max(num_classes, 0), dtype=np.int64)
    for start in range(0, flat.size, _BAND_PIXELS):  # bincount copies its input to int64: a band at a time
        counts = np.bincount(flat[start:start + _BAND_PIXELS].astype(np.int64), minlength=num_classes)
        areas += counts[:num_classes]
    return areas


def colorize(labels: np.ndarray, colours: Optional[np.ndarray] = None) -> Image.Image:
    """A label map (H, W) -> an RGB image of its class colours."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    needed = int(labels.max()) + 1 if labels.size else 0
    if colours is None:
        colours = palette(needed)
    elif len(colours) < needed:
        raise ValueError(f"{len(colours)} colours for labels up to {needed - 1}")
    return Image.fromarray(np.ascontiguousarray(np.asarray(colours, dtype=np.uint8)[labels]))


def _as_rgb_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:  # (3, H, W) -> (H, W, 3)
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or an (H, W, 3) array, got shape {array.shape}")
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _image_size(image) -> Tuple[int, int]:
    """(height, width) of a PIL image, an (H, W, 3) or a (3, H, W) array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = np.shape(image)
    if len(shape) == 3 and shape[0] == 3 and shape[-1] != 3:
        return shape[1], shape[2]
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"image must be a PIL image or an (H, W, 3) array, got shape {shape}")
    return shape[0], shape[1]


def _image_band(image, top: int, bottom: int) -> Image.Image:
    """Rows ``top:bottom`` of the image as an RGB PIL image (only that band is copied)."""
    if isinstance(image, Image.Image):
        return _as_rgb_image(image.crop((0, top, image.width, bottom)))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        return _as_rgb_image(array[:, top:bottom])
    band = array[top:bottom]
    return Image.fromarray(np.ascontiguousarray(band)) if band.dtype == np.uint8 else _as_rgb_image(band)


def _blend_into(canvas: Image.Image, origin: Tuple[int, int], image, labels, alpha: float,
                colours: Optional[np.ndarray]) -> None:
    """Paste ``overlay(image, labels)`` into ``canvas`` at ``origin``, a band of rows at a time."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {labels.shape}")
    height, width = _image_size(image)
    if labels.shape != (height, width):
        raise ValueError(f"labels are {labels.shape[0]}x{labels.shape[1]} but the image is {height}x{width}")
    if colours is None and labels.size:
        if labels.min() < 0:
            raise ValueError("labels must be >= 0")
        colours = palette(int(labels.max()) + 1)  # once, not per band
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = Image.blend(_image_band(image, top, bottom), colorize(labels[top:bottom], colours), alpha)
        canvas.paste(band, (origin[0], origin[1] + top))


def overlay(image, labels: np.ndarray, alpha: float = 0.5, colours: Optional[np.ndarray] = None) -> Image.Image:
    """The image blended with its class colours: ``(1 - alpha) * image + alpha * colour``
    (Pillow's ``Image.blend``), computed a band of rows at a time."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = _image_size(image)
    canvas = Image.new("RGB", (width, height))
    _blend_into(canvas, (0, 0), image, labels, alpha, colours)
    return canvas


# -- text -------------------------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType build of Pillow: scalable
    except (TypeError, ValueError, OSError, ImportError, AttributeError):  # old Pillow / no FreeType
        return ImageFont.load_default()


def _font_size_for(height: int) -> int:
    return int(min(28, max(11, round(height / 40))))


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> Tuple[int, int]:
    text = _drawable(text, font)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _drawable(text: str, font) -> str:
    """``text``, or an ASCII stand-in where the font cannot encode it (bitmap fallback font)."""
    try:
        font.getbbox(text)
        return text
    except (UnicodeEncodeError, UnicodeError):
        return text.encode("ascii", "replace").decode("ascii")


def _line_height(font) -> int:
    try:
        ascent, descent = font.getmetrics()
        return ascent + descent
    except AttributeError:  # pragma: no cover - bitmap fonts of old Pillow
        return font.getbbox("Hg")[3]


# -- legend -----------------------------------------------------------------------------------------
def legend_entries(labels: np.ndarray, class_names: Sequence[str],
                   colours: Optional[np.ndarray] = None) -> List[Tuple[int, str, Colour, float]]:
    """The classes present in ``labels``, largest first: (index, name, colour, pixel share)."""
    num_classes = len(class_names)
    areas = class_areas(labels, num_classes)
    total = max(int(areas.sum()), 1)
    colours = palette(num_classes) if colours is None else colours
    present = [int(i) for i in np.flatnonzero(areas)]
    present.sort(key=lambda i: (-int(areas[i]), i))
    return [(i, str(class_names[i]), tuple(int(c) for c in colours[i]), float(areas[i]) / total) for i in present]


def draw_legend(entries: Sequence[Tuple[str, Colour, float]], *, max_items: int = 20,
                font_size: int = 12, min_height: int = 0, title: Optional[str] = None) -> Image.Image:
    """A legend panel: one row per entry (colour swatch, name, pixel share), in the given order.

    ``entries``: (display name, colour, share in [0, 1]) tuples, e.g. largest first. When there are
    more than ``max_items``, the first ``max_items - 1`` are listed and a last row says "+N more".
    The panel is white, at least ``min_height`` tall.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    font = _font(font_size)
    rows: List[Tuple[Optional[Colour], str]] = []
    if len(entries) > max_items:
        shown, hidden = list(entries[:max_items - 1]), len(entries) - (max_items - 1)
    else:
        shown, hidden = list(entries), 0
    for name, colour, share in shown:
        rows.append((tuple(colour), f"{name} {100.0 * share:.1f}%"))
    if hidden:
        rows.append((None, f"+{hidden} more"))

    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _line_height(font)
    pad = max(4, font_size // 2)
    swatch = line
    row_height = line + max(2, font_size // 4)
    text_widths = [_text_size(scratch, text, font)[0] for _, text in rows]
    title_height = row_height if title else 0
    title_width = _text_size(scratch, title, font)[0] if title else 0
    width = pad + max([swatch + pad + w for w in text_widths] + [title_width, swatch]) + pad
    height = max(min_height, pad + title_height + row_height * len(rows) + pad)

    panel = Image.new("RGB", (width, height), _LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(panel)
    y = pad
    if title:
        draw.text((pad, y), _drawable(title, font), fill=_LEGEND_TEXT, font=font)
        y += title_height
    for colour, text in rows:
        x = pad
        if colour is not None:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=None)
        draw.text((x + swatch + pad, y), _drawable(text, font), fill=_LEGEND_TEXT, font=font)
        y += row_height
    return panel


def draw_banner(width: int, texts: Sequence[str], font_size: int = 12) -> Image.Image:
    """A dark red strip of ``width`` pixels with the first of ``texts`` whose every line fits (a
    text may hold several lines, separated by newlines; the last text is clipped if none fits):
    used to mark outputs made with random weights. White on :data:`BANNER_BACKGROUND` has a
    contrast ratio above 7:1 (WCAG AAA)."""
    font = _font(font_size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(3, font_size // 3)
    chosen = texts[-1]
    for text in texts:
        if all(_text_size(scratch, line, font)[0] + 2 * pad <= width for line in text.split("\n")):
            chosen = text
            break
    lines = chosen.split("\n")
    step = _line_height(font) + max(1, font_size // 6)
    banner = Image.new("RGB", (width, step * len(lines) - (step - _line_height(font)) + 2 * pad), BANNER_BACKGROUND)
    draw = ImageDraw.Draw(banner)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * step), _drawable(line, font), fill=BANNER_TEXT, font=font)
    return banner


#: Where the released SED weights are linked from (the official repository's README).
RELEASED_WEIGHTS_URL = "github.com/xb534/SED"
#: The random-weights banner of an image overlay, longest first: what the colours are, what a real
#: checkpoint shows, and where to get one (narrow images get the shorter texts).
RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS (no checkpoint): these colours are noise, not a segmentation.\n"
    "With the released weights each region takes the colour of the class it shows (sky, grass, ...).\n"
    f"Get them from {RELEASED_WEIGHTS_URL} and pass --checkpoint model_final.pth.",
    "RANDOM WEIGHTS: these colours are noise.\nReal weights: " + RELEASED_WEIGHTS_URL,
    "RANDOM WEIGHTS: colours are noise", "RANDOM WEIGHTS", "RANDOM")
#: One line for a video frame, whose picture the banner should not cover much.
RANDOM_WEIGHTS_BANNER_LINE = (
    f"RANDOM WEIGHTS: these colours are noise; real weights: {RELEASED_WEIGHTS_URL}",
    "RANDOM WEIGHTS: colours are noise", "RANDOM WEIGHTS", "RANDOM")


#: The PNG text chunk that marks every PNG of a random-weights run: ``{PNG_MARKER_KEY: RANDOM_WEIGHTS_MARKER}``
#: (read it back with ``Image.open(path).text``).
PNG_MARKER_KEY = "sed_fast"
RANDOM_WEIGHTS_MARKER = "random_weights"
_RANDOM_WEIGHTS_NOTE = "made with RANDOM WEIGHTS (no checkpoint): this output is meaningless"


def png_info(random_weights: bool):
    """The ``pnginfo`` to save a PNG with: the random-weights text chunks when ``random_weights``
    (``sed_fast=random_weights`` and a ``Comment``), else None."""
    if not random_weights:
        return None
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_MARKER_KEY, RANDOM_WEIGHTS_MARKER)
    info.add_text("Comment", _RANDOM_WEIGHTS_NOTE)
    return info


def render_overlay(image, labels: np.ndarray, class_names: Sequence[str], *, alpha: float = 0.5,
                   colours: Optional[np.ndarray] = None, max_items: Optional[int] = None,
                   banner: Union[bool, Sequence[str], None] = None, display_names: bool = True) -> Image.Image:
    """The image blended with its class colours, a legend panel on its right listing the classes
    present (largest first) and, with ``banner``, a red strip on top (``True``: the random-weights
    warning; a sequence: texts to choose from, longest first).

    ``class_names`` are shown by their display name (first synonym) unless ``display_names=False``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = _image_size(image)
    labels = np.asarray(labels)
    if labels.shape != (height, width):
        raise ValueError(f"labels are {'x'.join(map(str, labels.shape))} but the image is {height}x{width}")
    if display_names:
        from .data.vocabulary import display_name
        shown_names = [display_name(name) for name in class_names]
    else:
        shown_names = list(class_names)
    entries = legend_entries(labels, shown_names, colours)
    font_size = _font_size_for(max(height, 200))
    if max_items is None:
        row = _line_height(_font(font_size)) + max(2, font_size // 4)
        max_items = int(min(40, max(10, height // max(row, 1))))
    legend = draw_legend([(name, colour, share) for _, name, colour, share in entries], max_items=max_items,
                         font_size=font_size, min_height=height)
    total_width = width + legend.width
    strip = None
    if banner:
        strip = draw_banner(total_width, RANDOM_WEIGHTS_BANNER if banner is True else list(banner), font_size)
    top = strip.height if strip is not None else 0
    canvas = Image.new("RGB", (total_width, top + max(height, legend.height)), _LEGEND_BACKGROUND)
    if strip is not None:
        canvas.paste(strip, (0, 0))
    _blend_into(canvas, (0, top), image, labels, alpha, colours)  # straight into the canvas: no full-size copy
    canvas.paste(legend, (width, top))
    return canvas
