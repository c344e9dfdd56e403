"""Colour-coded label maps: a palette that maps each RGB colour to a class (or to "ignore").

Many datasets (CamVid, Cityscapes' ``*_color.png``, PASCAL VOC's ``SegmentationClass``, custom sets)
store a label map as colours. ``sed-fast eval --label-palette FILE`` reads them directly: FILE holds
one line per class, in vocabulary order, then any ignored colours::

    # R G B [name]          (or R,G,B [name]; blank lines and # comments are skipped)
    128 128 128 sky
    128 0 0 building
    ignore 0 0 0 void       (an "ignore" line: pixels of this colour are not scored)

A name, when given, must be the vocabulary's class name at that position (case and the synonyms
after the first ignored): a palette in another order is refused rather than silently scoring the
wrong classes. ``--palette-from DATASET`` takes a built-in dataset's official palette; only PASCAL
VOC has one (the VOC devkit's ``VOClabelcolormap``: ``voc20``, ``voc20b``): the other evaluation
sets are distributed as index maps.

With a palette, RGB, RGBA (alpha dropped) and palette-mode (``P``, by their colours) label maps are
read by colour; single-channel index maps are read as indices, as without one. A colour that is in
no line of the palette is an error naming the file, the first such colour and its pixel count
(``--invalid-labels ignore``: ignored and counted).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .datasets import _VOC20, InvalidLabelError

__all__ = ["Palette", "PaletteError", "load_palette", "builtin_palette", "BUILTIN_PALETTES", "voc_colormap"]

Colour = Tuple[int, int, int]
_LINE = re.compile(r"^\s*(?:(ignore)\s+)?(\d{1,3})\s*[,\s]\s*(\d{1,3})\s*[,\s]\s*(\d{1,3})(?:\s+(.*?))?\s*$",
                   re.IGNORECASE)


class PaletteError(ValueError):
    """A palette file that cannot be used, or a palette that does not fit the dataset."""


@dataclass(frozen=True)
class Palette:
    """``colours[i]``: the colour of class i; ``ignored``: colours of unscored pixels;
    ``names[i]``: the name given for class i ("" if none); ``source``: the file or dataset."""

    colours: Tuple[Colour, ...]
    ignored: Tuple[Colour, ...] = ()
    names: Tuple[str, ...] = ()
    source: str = ""

    def fingerprint(self) -> str:
        text = repr((self.colours, tuple(sorted(self.ignored))))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def check_classes(self, class_names: Sequence[str]) -> None:
        """The palette has one colour per evaluated class, and its names (where given) are theirs."""
        from ..data.vocabulary import display_name

        if len(self.colours) != len(class_names):
            raise PaletteError(f"the palette {self.source} has {len(self.colours)} class colour(s) but the dataset "
                               f"has {len(class_names)} classes: give one 'R G B name' line per class, in vocabulary "
                               "order (then 'ignore R G B' lines for unscored colours)")
        for index, (given, wanted) in enumerate(zip(self.names, class_names)):
            if given and given.strip().lower() != display_name(str(wanted)).strip().lower() \
                    and given.strip().lower() != str(wanted).strip().lower():
                raise PaletteError(f"the palette {self.source} names class {index} {given!r}, but the vocabulary's "
                                   f"class {index} is {display_name(str(wanted))!r}: list the colours in vocabulary "
                                   "order (or leave the names out to pair them by position)")

    def lookup(self, ignore_label: int) -> Tuple[np.ndarray, np.ndarray]:
        """(sorted 24-bit colour keys, label value of each): class index, or ``ignore_label``."""
        keys = [_key(c) for c in self.colours] + [_key(c) for c in self.ignored]
        values = list(range(len(self.colours))) + [ignore_label] * len(self.ignored)
        order = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
        return np.asarray(keys, dtype=np.int64)[order], np.asarray(values, dtype=np.int64)[order]

    def apply(self, rgb: np.ndarray, ignore_label: int, invalid: str = "error", where: str = "") -> np.ndarray:
        """(H, W, 3) uint8 colours -> (H, W) int64 label values (class index or ``ignore_label``);
        a colour in no line: :class:`UnknownColourError`, or -1 (an invalid label) with
        ``invalid="ignore"``."""
        keys, values = self.lookup(ignore_label)
        pixels = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        position = np.clip(np.searchsorted(keys, pixels), 0, len(keys) - 1)
        known = keys[position] == pixels
        labels = np.where(known, values[position], -1)
        if invalid != "ignore" and not bool(known.all()):
            flat = np.flatnonzero(~known.ravel())
            first = int(pixels.ravel()[flat[0]])
            colour = (first >> 16, (first >> 8) & 255, first & 255)
            count = int((pixels == first).sum())
            others = len(np.unique(pixels.ravel()[flat])) - 1
            y, x = divmod(int(flat[0]), rgb.shape[1])
            raise UnknownColourError(
                f"{where}: colour {colour[0]},{colour[1]},{colour[2]} ({count} pixel(s), first at x={x}, y={y}) is "
                f"not in the palette {self.source}" + (f", nor are {others} other colour(s)" if others else "")
                + ": add it to the palette as a class or an 'ignore R G B' line, or pass --invalid-labels ignore "
                  "to ignore such pixels (counted in the report)")
        return labels


class UnknownColourError(PaletteError, InvalidLabelError):
    """A label map holds a colour that no line of the palette has (an invalid label value)."""


def _key(colour: Colour) -> int:
    return (colour[0] << 16) | (colour[1] << 8) | colour[2]


def load_palette(path: Union[str, os.PathLike]) -> Palette:
    """Parse a palette file (see the module docstring); :class:`PaletteError` names the bad line."""
    path = Path(os.path.expanduser(str(path)))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise PaletteError(f"cannot read the palette file {path}: {error}") from error
    colours: List[Colour] = []
    names: List[str] = []
    ignored: List[Colour] = []
    seen: Dict[Colour, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        match = _LINE.match(stripped)
        if match is None:
            raise PaletteError(f"{path}:{number}: expected 'R G B name', 'R,G,B' or 'ignore R G B', "
                               f"got {line.strip()!r}")
        colour = tuple(int(match.group(i)) for i in (2, 3, 4))
        if max(colour) > 255:
            raise PaletteError(f"{path}:{number}: colour values must be 0..255, got {line.strip()!r}")
        if colour in seen:
            raise PaletteError(f"{path}:{number}: colour {colour[0]},{colour[1]},{colour[2]} is already on line "
                               f"{seen[colour]}: each colour must mean one class")
        seen[colour] = number
        if match.group(1):
            ignored.append(colour)  # type: ignore[arg-type]
        else:
            colours.append(colour)  # type: ignore[arg-type]
            names.append((match.group(5) or "").strip())
    if not colours:
        raise PaletteError(f"the palette file {path} lists no class colour")
    return Palette(tuple(colours), tuple(ignored), tuple(names), source=str(path))


def voc_colormap(count: int = 256) -> np.ndarray:
    """PASCAL VOC's label colour map (the devkit's ``VOClabelcolormap.m``): (count, 3) uint8, the
    bits of index i spread over the high bits of R, G and B; 0 is black, 255 (void) 224,224,192."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        c, r, g, b = index, 0, 0, 0
        for shift in range(8):
            r |= ((c >> 0) & 1) << (7 - shift)
            g |= ((c >> 1) & 1) << (7 - shift)
            b |= ((c >> 2) & 1) << (7 - shift)
            c >>= 3
        colours[index] = (r, g, b)
    return colours


def _voc(background_is_class: bool) -> Palette:
    """VOC ``SegmentationClass`` PNGs by colour: classes 1..20 are the 20 objects; 0 (background) is
    ignored by ``voc20`` and is class 20 of ``voc20b``; 255 (void, object borders) is ignored."""
    cmap = [tuple(int(v) for v in row) for row in voc_colormap()]
    colours = cmap[1:21] + ([cmap[0]] if background_is_class else [])
    names = _VOC20 + (("background",) if background_is_class else ())
    ignored = [cmap[255]] + ([] if background_is_class else [cmap[0]])
    name = "voc20b" if background_is_class else "voc20"
    return Palette(tuple(colours), tuple(ignored), tuple(names), source=f"{name} (PASCAL VOC devkit colour map)")


#: Datasets with an official colour palette: name -> builder.
BUILTIN_PALETTES = {"voc20": lambda: _voc(False), "voc20b": lambda: _voc(True)}


def builtin_palette(name: str, known_datasets: Optional[Sequence[str]] = None) -> Palette:
    key = name.strip().lower()
    if key in BUILTIN_PALETTES:
        return BUILTIN_PALETTES[key]()
    others = f" ({', '.join(d for d in known_datasets if d not in BUILTIN_PALETTES)} are distributed as index " \
             "maps and have no official palette)" if known_datasets else ""
    raise PaletteError(f"--palette-from {name}: no official colour palette for this dataset; datasets with one: "
                       f"{', '.join(BUILTIN_PALETTES)}{others}. Give your own with --label-palette FILE")
