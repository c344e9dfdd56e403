"""The official test-time resize: detectron2's ResizeShortestEdge(640, max_size=2560) shape rule and pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sed_fast.inputs.preprocess import OFFICIAL_MAX_SIZE, OFFICIAL_SHORT_EDGE, official_resize, official_resize_shape


def test_official_constants():
    assert (OFFICIAL_SHORT_EDGE, OFFICIAL_MAX_SIZE) == (640, 2560)


@pytest.mark.parametrize("height, width, expected", [
    (400, 500, (640, 800)),      # upscale: 640 / 400 = 1.6
    (1080, 1920, (640, 1138)),   # 1920 * 640 / 1080 = 1137.78
    (3000, 4000, (640, 853)),    # downscale: 853.33
    (333, 250, (852, 640)),      # portrait, odd: 333 * 2.56 = 852.48
    (700, 700, (640, 640)),      # square (the h >= w branch)
    (256, 257, (640, 643)),      # 257 * 2.5 = 642.5 exactly: rounds half up
    (257, 256, (643, 640)),
    (100, 1000, (256, 2560)),    # 640 x 6400 capped at 2560: x 0.4
    (4000, 500, (2560, 320)),    # 5120 x 640 capped: x 0.5
    (1, 2000, (1, 2560)),        # capped to 1.28 x 2560
    (1, 1, (640, 640)),
    (640, 2560, (640, 2560)),    # exactly at the cap: not capped
    (639, 2560, (639, 2560)),    # 640 x 2564.006 capped: x 0.998437 -> 639.0 x 2560.0
])
def test_shape_rule(height, width, expected):
    assert official_resize_shape(height, width) == expected


def test_shape_rule_other_settings():
    assert official_resize_shape(480, 640, short_edge=512, max_size=1024) == (512, 683)  # 682.67
    assert official_resize_shape(100, 1000, short_edge=512, max_size=1024) == (102, 1024)  # 102.4
    with pytest.raises(ValueError, match="at least 1x1"):
        official_resize_shape(0, 10)


def _pillow_hwc(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    hwc = image.permute(1, 2, 0).contiguous().numpy()
    return torch.from_numpy(np.asarray(Image.fromarray(hwc).resize((new_w, new_h), Image.BILINEAR)).copy())


@pytest.mark.parametrize("height, width", [(50, 70), (41, 29), (700, 300)])
def test_official_resize_uint8_equals_pillow(height, width):
    generator = torch.Generator().manual_seed(height)
    hwc = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    image = hwc.permute(2, 0, 1)  # an HWC photo, viewed as (3, H, W)
    out = official_resize(image)
    new_h, new_w = official_resize_shape(height, width)
    assert out.dtype == torch.uint8 and out.shape == (3, new_h, new_w) and out.is_contiguous()
    assert torch.equal(out.permute(1, 2, 0), _pillow_hwc(image, new_h, new_w))


def test_official_resize_uint8_small_settings_and_pass_order():
    """A tall image shrunk (Pillow 13 runs the vertical pass first); horizontal_first=True is the older order."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 300, 90), generator=generator, dtype=torch.uint8)
    new_h, new_w = official_resize_shape(300, 90, short_edge=30, max_size=200)
    assert (new_h, new_w) == (100, 30)
    out = official_resize(image, short_edge=30, max_size=200)
    assert torch.equal(out.permute(1, 2, 0), _pillow_hwc(image, new_h, new_w))
    legacy = official_resize(image, short_edge=30, max_size=200, horizontal_first=True)
    step = _pillow_hwc(image, 300, new_w).permute(2, 0, 1)
    assert torch.equal(legacy.permute(1, 2, 0), _pillow_hwc(step, new_h, new_w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_official_resize_float_equals_interpolate(dtype):
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 45, 60, generator=generator) * 255).to(dtype)
    out = official_resize(image)
    expected = F.interpolate(image[None], size=(640, 853), mode="bilinear", align_corners=False)[0]
    assert out.dtype == dtype and out.shape == (3, 640, 853)
    assert torch.equal(out, expected)


def test_official_resize_float_does_not_antialias():
    """Shrinking a float image is plain bilinear interpolation (detectron2's float path), not Pillow's filter."""
    image = torch.arange(3 * 1280 * 1600, dtype=torch.float32).reshape(3, 1280, 1600) % 7
    out = official_resize(image)
    expected = F.interpolate(image[None], size=(640, 800), mode="bilinear", align_corners=False,
                             antialias=False)[0]
    antialiased = F.interpolate(image[None], size=(640, 800), mode="bilinear", align_corners=False,
                                antialias=True)[0]
    assert torch.equal(out, expected) and not torch.equal(out, antialiased)


@pytest.mark.parametrize("image, error, match", [
    (torch.zeros(3, 4, 4, dtype=torch.int32), TypeError, "uint8 or floating"),
    (torch.zeros(4, 4, dtype=torch.uint8), ValueError, r"\(C, H, W\)"),
    (np.zeros((4, 4, 3), np.uint8), TypeError, "tensor"),
])
def test_official_resize_bad_inputs(image, error, match):
    with pytest.raises(error, match=match):
        official_resize(image)
