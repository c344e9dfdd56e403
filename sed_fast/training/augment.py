"""The official training augmentation, without detectron2: numpy, PIL and torch.

``MaskFormerSemanticDatasetMapper`` (``sed/data/dataset_mappers/``) with the SED configs applies, in
this order: ``ResizeShortestEdge((768,), 2666, "choice")``, ``RandomCrop_CategoryAreaConstraint(
"absolute", (768, 768), 1.0, 255)``, ``ColorAugSSDTransform("RGB")``, ``RandomFlip()``; then pads the
image (value 128) and the label map (the ignore value) on the right and bottom to the size
divisibility. Each step here follows detectron2's code (``detectron2/data/transforms/``,
``projects/PointRend/point_rend/color_augmentation.py``) line by line, including which random
numbers it draws and from which generator (numpy for the geometry and the flip, Python's ``random``
for the colours):

* the image is resized with PIL's bilinear filter (uint8), the label map with
  ``F.interpolate(mode="nearest")`` on float64, as ``ResizeTransform`` does for a ``double`` array;
* the colour changes convert to HSV and back as ``cv2.cvtColor`` does for uint8, reimplemented in
  numpy (OpenCV is not a dependency): BGR->HSV is OpenCV's integer formula, equal to
  cv2 4.10 / 5.1 on every pixel checked; HSV->BGR is OpenCV's float formula, rounded, which
  differs from cv2's 8-bit path by at most 1 level on about 7 pixels in 10 (cv2 rounds
  otherwise), far below the random colour jitter itself.

Randomness: every sample draws from its own ``numpy.random.RandomState`` and ``random.Random``,
seeded from (run seed, position of the sample in the data stream), so an augmented sample does not
depend on the process, the loader worker or how many samples came before it: the data of a resumed
run, of one process or of many, are the same.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# ResizeShortestEdge.get_output_shape: the test-time resize's rule, with the training sizes.
from ..inputs.preprocess import official_resize_shape as resize_shortest_edge_shape

__all__ = ["AugmentConfig", "augment", "resize_shortest_edge_shape", "pad_to_divisibility", "sample_rngs",
           "bgr_to_hsv", "hsv_to_bgr", "color_aug_ssd"]

IMAGE_PAD_VALUE = 128  # the official mapper's F.pad(image, value=128)


@dataclass(frozen=True)
class AugmentConfig:
    """The official defaults (``configs/convnextB_768.yaml``, ``configs/config.yaml``)."""

    min_size_train: Tuple[int, ...] = (768,)       # INPUT.MIN_SIZE_TRAIN
    max_size_train: int = 2666                     # INPUT.MAX_SIZE_TRAIN
    min_size_train_sampling: str = "choice"        # INPUT.MIN_SIZE_TRAIN_SAMPLING
    crop_enabled: bool = True                      # INPUT.CROP.ENABLED
    crop_type: str = "absolute"                    # INPUT.CROP.TYPE
    crop_size: Tuple[int, int] = (768, 768)        # INPUT.CROP.SIZE
    single_category_max_area: float = 1.0          # INPUT.CROP.SINGLE_CATEGORY_MAX_AREA
    color_aug_ssd: bool = True                     # INPUT.COLOR_AUG_SSD
    flip: bool = True                              # RandomFlip() (horizontal, p = 0.5)
    size_divisibility: int = 768                   # INPUT.SIZE_DIVISIBILITY

    def __post_init__(self):
        if self.min_size_train_sampling not in ("choice", "range"):
            raise ValueError("min_size_train_sampling must be 'choice' or 'range', "
                             f"got {self.min_size_train_sampling!r}")
        if self.min_size_train_sampling == "range" and len(self.min_size_train) != 2:
            raise ValueError("min_size_train_sampling 'range' needs two sizes (min, max)")
        if not self.min_size_train or any(int(s) < 0 for s in self.min_size_train):
            raise ValueError(f"min_size_train must be sizes >= 0, got {self.min_size_train}")
        if self.crop_type != "absolute":
            raise ValueError(f"only the official crop type 'absolute' is implemented, got {self.crop_type!r}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) >= 1, got {self.crop_size}")
        if not 0 < self.single_category_max_area <= 1.0:
            raise ValueError(f"single_category_max_area must be in (0, 1], got {self.single_category_max_area}")
        if self.size_divisibility < 0:
            raise ValueError(f"size_divisibility must be >= 0, got {self.size_divisibility}")


def sample_rngs(seed: int, position: int) -> Tuple[np.random.RandomState, random.Random]:
    """The numpy and Python generators of the sample at stream ``position`` of a run seeded ``seed``."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(position) & 0xFFFFFFFFFFFF]).generate_state(2)
    return np.random.RandomState(int(words[0])), random.Random(int(words[1]))


# -- geometry ------------------------------------------------------------------------------------
def _resize_image(image: np.ndarray, newh: int, neww: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))


def _resize_label(label: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """``ResizeTransform.apply_segmentation`` of the float64 label map: torch nearest."""
    tensor = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float64))[None, None]
    return F.interpolate(tensor, (newh, neww), mode="nearest")[0, 0].numpy().astype(np.int64)


def _crop_size(config: AugmentConfig, h: int, w: int) -> Tuple[int, int]:
    return min(config.crop_size[0], h), min(config.crop_size[1], w)


def _crop_window(config: AugmentConfig, label: np.ndarray, ignore_label: int, rng: np.random.RandomState):
    """(y0, x0, crop_h, crop_w): ``RandomCrop_CategoryAreaConstraint.get_transform``."""
    h, w = label.shape
    if config.single_category_max_area >= 1.0:
        croph, cropw = _crop_size(config, h, w)
        y0 = rng.randint(h - croph + 1)
        x0 = rng.randint(w - cropw + 1)
        return int(y0), int(x0), croph, cropw
    for _ in range(10):
        croph, cropw = _crop_size(config, h, w)
        y0 = rng.randint(h - croph + 1)
        x0 = rng.randint(w - cropw + 1)
        labels, cnt = np.unique(label[y0:y0 + croph, x0:x0 + cropw], return_counts=True)
        cnt = cnt[labels != ignore_label]
        if len(cnt) > 1 and np.max(cnt) < np.sum(cnt) * config.single_category_max_area:
            break
    return int(y0), int(x0), croph, cropw


# -- colour (ColorAugSSDTransform) -----------------------------------------------------------------
_HSV_SHIFT = 12
with np.errstate(divide="ignore"):
    _INDEX = np.arange(256, dtype=np.float64)
    # OpenCV's RGB2HSV_b tables: saturate_cast<int>((255 << 12) / i) and ((180 << 12) / (6 i)),
    # rounded half to even (cvRound), 0 at i = 0.
    _SDIV = np.where(_INDEX > 0, np.rint((255 << _HSV_SHIFT) / np.maximum(_INDEX, 1)), 0).astype(np.int64)
    _HDIV = np.where(_INDEX > 0, np.rint((180 << _HSV_SHIFT) / (6.0 * np.maximum(_INDEX, 1))), 0).astype(np.int64)


def bgr_to_hsv(image: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(image, cv2.COLOR_BGR2HSV)`` for uint8 (H in 0..179): OpenCV's integer formula."""
    b, g, r = (image[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(b, g), r)
    vmin = np.minimum(np.minimum(b, g), r)
    diff = v - vmin
    vr = np.where(v == r, -1, 0)
    vg = np.where(v == g, -1, 0)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + (~vg & (r - g + 4 * diff))))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = h + np.where(h < 0, 180, 0)
    return np.stack([np.clip(h, 0, 255), s, v], axis=-1).astype(np.uint8)


_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def hsv_to_bgr(image: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(image, cv2.COLOR_HSV2BGR)`` for uint8 (H in 0..179), within 1 level: OpenCV's
    float ``HSV2RGB_native`` (hscale 6/180, S scaled by 1/255, V in 0..255), rounded half to even."""
    f32 = np.float32
    h = image[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = image[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = image[..., 2].astype(f32)
    h = np.fmod(h, f32(6.0))
    sector = np.floor(h).astype(np.int64)
    h = h - sector.astype(f32)
    outside = (sector < 0) | (sector >= 6)
    sector = np.where(outside, 0, sector)
    h = np.where(outside, f32(0), h).astype(f32)
    one = f32(1.0)
    tab = np.stack([v, v * (one - s), v * (one - s * h), v * (one - s * (one - h))], axis=-1).astype(f32)
    gray = s == 0
    out = np.empty(image.shape, dtype=f32)
    for channel in range(3):
        chosen = np.take_along_axis(tab, _SECTORS[sector, channel][..., None], axis=-1)[..., 0]
        out[..., channel] = np.where(gray, v, chosen)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _convert(img: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    img = img.astype(np.float32) * alpha + beta
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8)


def color_aug_ssd(image_rgb: np.ndarray, rng: random.Random, brightness_delta: int = 32, contrast_low: float = 0.5,
                  contrast_high: float = 1.5, saturation_low: float = 0.5, saturation_high: float = 1.5,
                  hue_delta: int = 18) -> np.ndarray:
    """``ColorAugSSDTransform(img_format="RGB").apply_image``, drawing from ``rng`` as it draws from
    Python's ``random``."""
    img = image_rgb[:, :, [2, 1, 0]]

    def brightness(img):
        if rng.randrange(2):
            return _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
        return img

    def contrast(img):
        if rng.randrange(2):
            return _convert(img, alpha=rng.uniform(contrast_low, contrast_high))
        return img

    def saturation(img):
        if rng.randrange(2):
            img = bgr_to_hsv(img)
            img[:, :, 1] = _convert(img[:, :, 1], alpha=rng.uniform(saturation_low, saturation_high))
            return hsv_to_bgr(img)
        return img

    def hue(img):
        if rng.randrange(2):
            img = bgr_to_hsv(img)
            img[:, :, 0] = (img[:, :, 0].astype(int) + rng.randint(-hue_delta, hue_delta)) % 180
            return hsv_to_bgr(img)
        return img

    img = brightness(img)
    if rng.randrange(2):
        img = hue(saturation(contrast(img)))
    else:
        img = contrast(hue(saturation(img)))
    return np.ascontiguousarray(img[:, :, [2, 1, 0]])


# -- the pipeline ----------------------------------------------------------------------------------
def augment(image: np.ndarray, label: np.ndarray, config: AugmentConfig, ignore_label: int,
            np_rng: np.random.RandomState, py_rng: random.Random) -> Tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB, (H, W) int64 -> the augmented pair (not padded), as the official mapper's
    ``apply_transform_gens``."""
    h, w = label.shape
    if config.min_size_train_sampling == "range":
        size = np_rng.randint(config.min_size_train[0], config.min_size_train[1] + 1)
    else:
        size = np_rng.choice(config.min_size_train)
    if size != 0:
        newh, neww = resize_shortest_edge_shape(h, w, int(size), config.max_size_train)
        image = _resize_image(image, newh, neww)
        label = _resize_label(label, newh, neww)
    if config.crop_enabled:
        y0, x0, croph, cropw = _crop_window(config, label, ignore_label, np_rng)
        image = image[y0:y0 + croph, x0:x0 + cropw]
        label = label[y0:y0 + croph, x0:x0 + cropw]
    if config.color_aug_ssd:
        image = color_aug_ssd(image, py_rng)
    if config.flip and np_rng.uniform(0.0, 1.0, []) < 0.5:
        image = image[:, ::-1]
        label = label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def pad_to_divisibility(image: torch.Tensor, label: torch.Tensor, divisibility: int, ignore_label: int,
                        size: Optional[Sequence[int]] = None):
    """Pad (3, H, W) and (H, W) on the bottom and right: the image with 128, the labels with the
    ignore value; to the next multiple of ``divisibility`` (the official mapper pads to exactly
    ``divisibility``, the same for crops no larger than it, which the official settings give), or to
    ``size`` (H, W) when given."""
    h, w = label.shape[-2:]
    if size is not None:
        target_h, target_w = size
    elif divisibility > 0:
        target_h, target_w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    else:
        return image, label
    padding = [0, target_w - w, 0, target_h - h]
    if padding[1] == 0 and padding[3] == 0:
        return image, label
    return (F.pad(image, padding, value=IMAGE_PAD_VALUE).contiguous(),
            F.pad(label, padding, value=ignore_label).contiguous())
