"""Reading image files safely: regular files only, a pixel limit of our own, bounded memory.

Every reader of sed_fast (``sed-fast segment``, ``sed-fast eval``, and any new command that reads
images or videos) opens its input files through :func:`open_regular_file` (or checks them up front
with :func:`check_regular_file`): a FIFO, socket or device is refused with an error naming it (a
FIFO would block the reader forever), as is a loop of symbolic links or a link to nothing.

:func:`read_rgb` reads an image as detectron2's ``read_image(path, "RGB")`` does (EXIF orientation,
then ``convert("RGB")``), into a (H, W, 3) uint8 array, converting band by band so that the peak is
about the decoded image plus the array (no float or full-size intermediate copies). Images over the
pixel limit (:func:`max_pixels`: ``--max-pixels``, else ``SED_FAST_MAX_PIXELS``, else Pillow's
``MAX_IMAGE_PIXELS``) are refused before they are decoded, with our message rather than Pillow's
``DecompressionBombWarning``. Greyscale of more than 8 bits (``I;16``, ``I``, ``F``) is converted
as detectron2 does when that is exact (every value in 0..255) and refused otherwise: detectron2's
``convert("RGB")`` clips every value above 255 to white, which nobody wants silently. Multi-frame
files (animated GIF, multi-page TIFF) give frame 0; :class:`ImageInfo` says how many there are
(``segment`` sends an animated GIF file to the video path instead: :func:`sed_fast.video.is_animated_gif`).

Transparency (RGBA, LA, palette or RGB/L files with a transparent colour) is composited on white
(:data:`TRANSPARENT_BACKGROUND`, as an image viewer or a web page shows the file) instead of being
dropped: dropping alpha, as ``convert("RGB")`` does, shows whatever colour the transparent pixels
happen to store, usually black, and the model would label that. Opaque pixels are read unchanged, so
an image without transparency reads exactly as detectron2 reads it. :func:`flatten_transparency`
does the same for an already opened PIL image (the web app's uploads).
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass
from typing import BinaryIO, Optional, Tuple, Union

import numpy as np

from ..base.envvars import env_value

__all__ = ["InputFileError", "ImageTooLargeError", "ImageInfo", "check_regular_file", "open_regular_file",
           "max_pixels", "open_image", "read_rgb", "apply_exif_orientation", "flatten_transparency",
           "TRANSPARENT_BACKGROUND"]

PathLike = Union[str, os.PathLike]
#: The colour transparent pixels are composited on (white: how viewers and browsers show them).
TRANSPARENT_BACKGROUND = (255, 255, 255)
_BAND_PIXELS = 1 << 20  # pixels converted at a time (a few MB of intermediate copies)
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112
# Pillow's decompression-bomb check reads the process-global Image.MAX_IMAGE_PIXELS (also while
# decoding GIF frames): it is switched off while any of our reads runs, and restored after the last.
_bomb_lock = threading.Lock()
_bomb_state = {"depth": 0, "saved": None}


def _pillow_limit() -> Optional[int]:
    from PIL import Image

    with _bomb_lock:
        return _bomb_state["saved"] if _bomb_state["depth"] else Image.MAX_IMAGE_PIXELS


def _pillow_check_off() -> None:
    from PIL import Image

    with _bomb_lock:
        if not _bomb_state["depth"]:
            _bomb_state["saved"], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _bomb_state["depth"] += 1


def _pillow_check_restored() -> None:
    from PIL import Image

    with _bomb_lock:
        _bomb_state["depth"] -= 1
        if not _bomb_state["depth"]:
            Image.MAX_IMAGE_PIXELS, _bomb_state["saved"] = _bomb_state["saved"], None


class InputFileError(ValueError):
    """An input path that cannot be read as an image file (not a regular file, a link loop, an
    image over the pixel limit, a pixel format that would be converted wrongly)."""


class ImageTooLargeError(InputFileError):
    pass


@dataclass(frozen=True)
class ImageInfo:
    """What was read: size (after EXIF orientation), the file's PIL mode and format, and which
    frame of how many (``frames`` > 1 for an animated GIF or a multi-page TIFF)."""

    width: int
    height: int
    mode: str
    format: Optional[str]
    frame: int = 0
    frames: int = 1
    transparent: bool = False  # some pixel was (partly) transparent and was composited on white

    @property
    def transparency_note(self) -> Optional[str]:
        """What was done with transparent pixels, for a summary; None when there were none."""
        if not self.transparent:
            return None
        return "transparent pixels composited on white (%d,%d,%d)" % TRANSPARENT_BACKGROUND

    @property
    def frame_note(self) -> Optional[str]:
        """``"frame 0 of N"`` for a multi-frame file, else None."""
        return f"frame {self.frame} of {self.frames}" if self.frames > 1 else None


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)", "reading it waits for a writer, possibly forever"),
          (stat.S_ISSOCK, "a socket", "it has no image content to read"),
          (stat.S_ISCHR, "a character device", "reading it may never end or have side effects"),
          (stat.S_ISBLK, "a block device", "it is a disk, not an image file"),
          (stat.S_ISDIR, "a folder", "give the image files in it, or the folder where folders are accepted"))


def _not_regular(path: PathLike, mode: int, what: str) -> InputFileError:
    for test, kind, why in _KINDS:
        if test(mode):
            return InputFileError(f"{what} {os.fspath(path)} is {kind}, not a regular file ({why}): "
                                  "only regular files are read")
    return InputFileError(f"{what} {os.fspath(path)} is not a regular file (mode {stat.filemode(mode)})")


def _stat_error(path: PathLike, error: OSError, what: str) -> Exception:
    if error.errno == errno.ELOOP:
        return InputFileError(f"{what} {os.fspath(path)}: a loop of symbolic links (following them leads back "
                              "to a link already seen)")
    if error.errno == errno.ENOENT and os.path.islink(path):
        return InputFileError(f"{what} {os.fspath(path)} is a symbolic link to {os.readlink(path)!r}, which "
                              "does not exist")
    return error


def check_regular_file(path: PathLike, what: str = "image") -> os.stat_result:
    """``os.stat(path)`` (links followed) when ``path`` is a regular file; else raises
    :class:`InputFileError` naming it and what it is (FIFO, socket, device, folder, a loop of
    symbolic links, a link to nothing). A missing file raises ``FileNotFoundError``. Nothing is
    opened: call this before any expensive work (building a model) to refuse bad inputs up front."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise _stat_error(path, error, what) from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode, what)
    return info


def open_regular_file(path: PathLike, what: str = "image") -> BinaryIO:
    """``path`` opened for binary reading, refused unless it is a regular file (see
    :func:`check_regular_file`). Checked before opening (opening a device can have effects) and
    again on the open descriptor, which is opened non-blocking: a file swapped for a FIFO in
    between is refused too, never waited on."""
    check_regular_file(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise _stat_error(path, error, what) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        if getattr(os, "O_NONBLOCK", 0) and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def max_pixels(override: Optional[int] = None) -> Optional[int]:
    """The largest image (width x height) that is decoded, or None for no limit: ``override``
    (e.g. ``--max-pixels``), else ``SED_FAST_MAX_PIXELS``, else Pillow's ``MAX_IMAGE_PIXELS``;
    0 means no limit."""
    value = override if override is not None else env_value("SED_FAST_MAX_PIXELS")
    if value is None:
        return _pillow_limit()
    value = int(value)
    if value < 0:
        raise ValueError(f"the pixel limit must be >= 0 (0: no limit), got {value}")
    return value or None


def _check_size(path, size, limit: Optional[int], what: str) -> None:
    width, height = size
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(
            f"{what} {os.fspath(path)} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit "
            f"of {limit} pixels (a guard against decompression bombs: --max-pixels or SED_FAST_MAX_PIXELS, "
            "0 for no limit; segmenting takes about 12 bytes of memory per pixel)")


class open_image:  # noqa: N801 - used like open(): ``with open_image(path) as image``
    """``with open_image(path, limit) as image``: ``PIL.Image.open`` on a regular file (see
    :func:`open_regular_file`), refused over the pixel limit (``limit``: as :func:`max_pixels`'s
    ``override``) before anything is decoded. Pillow's own decompression-bomb check is replaced
    by ours while the image is open (so its warning never reaches stderr)."""

    def __init__(self, path: PathLike, limit: Optional[int] = None, what: str = "image"):
        self.path, self.limit, self.what = path, max_pixels(limit), what
        self._file = self._image = None
        self._check_off = False

    def __enter__(self):
        from PIL import Image

        self._file = open_regular_file(self.path, self.what)
        _pillow_check_off()
        self._check_off = True
        try:
            self._image = Image.open(self._file)
            _check_size(self.path, self._image.size, self.limit, self.what)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self._image

    def __exit__(self, *exc) -> None:
        if self._check_off:
            self._check_off = False
            _pillow_check_restored()
        for closing in (self._image, self._file):
            if closing is not None:
                closing.close()
        self._image = self._file = None


def apply_exif_orientation(image):
    """detectron2's ``_apply_exif_orientation`` (``detectron2/data/detection_utils.py``): the image
    transposed as its EXIF orientation says (the same image when it says nothing; unreadable EXIF
    counts as none)."""
    from PIL import Image

    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001 - detectron2 treats unreadable EXIF as none
        return image
    method = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
              6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}.get(exif.get(_EXIF_ORIENTATION))
    return image.transpose(method) if method is not None else image


def _check_wide_grey(path, image, what: str) -> None:
    """Greyscale of more than 8 bits: detectron2's ``convert("RGB")`` clips it to 0..255; exact
    (accepted) only when every value already lies there."""
    low, high = image.getextrema()
    if np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255:
        return
    kind = {"I": "32-bit integer", "F": "32-bit float"}.get(image.mode, "16-bit")
    raise InputFileError(
        f"{what} {os.fspath(path)}: {kind} greyscale (PIL mode {image.mode}) with values {low:g}..{high:g}. The "
        "official pipeline (detectron2's read_image, PIL convert('RGB')) clips every value outside 0..255 (here "
        "the image would turn mostly white), so SED would not see the image as it looks; scale it to 8 bits first "
        "(e.g. value * 255 / 65535 for 16-bit) and save it as an 8-bit image")


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def flatten_transparency(image):
    """A PIL image as RGB, its transparent pixels composited on :data:`TRANSPARENT_BACKGROUND`
    (an image without transparency is only converted)."""
    from PIL import Image

    if not _has_alpha(image):
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def read_rgb(path: PathLike, limit: Optional[int] = None, what: str = "image") -> Tuple[np.ndarray, ImageInfo]:
    """``path`` as detectron2's ``read_image(path, "RGB")``: (H, W, 3) uint8, writable, EXIF
    orientation applied, frame 0 of a multi-frame file, transparency composited on white (the only
    difference: detectron2 drops alpha); and its :class:`ImageInfo`.

    Raises :class:`InputFileError` for a path that is not a regular file, an image over the pixel
    limit (``limit`` as in :func:`max_pixels`) and wide greyscale that ``convert("RGB")`` would
    clip; Pillow's own errors for a file it cannot decode."""
    import warnings

    with open_image(path, limit, what) as image:
        frames = int(getattr(image, "n_frames", 1) or 1)
        file_mode, file_format = image.mode, image.format
        if image.mode in _WIDE_GREY:
            _check_wide_grey(path, image, what)
        oriented = apply_exif_orientation(image)
        if oriented is not image:
            image.close()  # the un-rotated pixels are not needed any more
        width, height = oriented.size
        out = np.empty((height, width, 3), dtype=np.uint8)
        rows = max(1, _BAND_PIXELS // max(1, width))
        alpha = _has_alpha(oriented)
        transparent = False
        with warnings.catch_warnings():  # Pillow suggests RGBA for palette images with transparency
            warnings.simplefilter("ignore", UserWarning)
            for top in range(0, height, rows):
                band = oriented.crop((0, top, width, min(height, top + rows)))
                if alpha:
                    band = band.convert("RGBA")
                    transparent = transparent or band.getchannel("A").getextrema()[0] < 255
                out[top:top + band.height] = np.asarray(flatten_transparency(band))
        if oriented is not image:
            oriented.close()
    return out, ImageInfo(width, height, file_mode, file_format, 0, frames, transparent)


def load_image(path, max_pixels: Optional[int] = None):
    """An image file as an RGB PIL image, as detectron2's ``read_image(path, "RGB")`` reads it
    (:func:`read_rgb`: regular files only, the pixel limit, EXIF orientation applied, frame 0, wide
    greyscale that would be clipped refused)."""
    from PIL import Image

    return Image.fromarray(read_rgb(path, max_pixels)[0])
