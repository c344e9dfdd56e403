"""pil_bilinear_resize: the Triton passes and the torch reference against Pillow itself, bit for bit."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from sed_fast.kernels import dispatch, pil_bilinear_resize, pil_bilinear_resize_reference
from sed_fast.kernels.pil_bilinear_resize import (OP_NAME, PRECISION_BITS, pil_bilinear_resize_triton,
                                                  installed_pillow_horizontal_first, pillow_horizontal_first,
                                                  resample_coefficients)

POISON = 0xAB  # uint8 cannot hold NaN: outputs start as 0xAB, so a pixel never written shows up


def _pillow(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """PIL.Image.fromarray(hwc).resize((new_w, new_h), BILINEAR) of a uint8 (C, H, W) tensor, as (C, H, W)."""
    hwc = image.cpu().permute(1, 2, 0).contiguous().numpy()
    pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    result = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
    if result.ndim == 2:
        result = result[:, :, None]
    return torch.from_numpy(result.copy()).permute(2, 0, 1).contiguous()


def _image(channels: int, height: int, width: int, layout: str, generator: torch.Generator,
           device="cpu") -> torch.Tensor:
    """Random uint8 (C, H, W): contiguous, or a permuted view of an HWC array (strides (1, W*C, C)),
    or a crop of a larger image (offset start, row stride wider than the width)."""
    if layout == "hwc":
        hwc = torch.randint(0, 256, (height, width, channels), generator=generator, dtype=torch.uint8)
        return hwc.to(device).permute(2, 0, 1)
    if layout == "crop":
        big = torch.randint(0, 256, (channels, height + 3, width + 5), generator=generator, dtype=torch.uint8)
        return big.to(device)[:, 2:2 + height, 3:3 + width]
    return torch.randint(0, 256, (channels, height, width), generator=generator, dtype=torch.uint8).to(device)


@pytest.fixture
def resize_backend(request):
    """Force a backend for this op (the conftest's triton_backend fixture covers the other ops)."""
    def force(name):
        dispatch.set_backend(OP_NAME, name)
    yield force
    dispatch.set_backend(OP_NAME, None)


@pytest.fixture
def poisoned_uint8_empty(monkeypatch):
    """torch.empty / empty_like return 0xAB-filled uint8 tensors: the intermediate between the passes
    starts poisoned too."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(POISON) if t.dtype == torch.uint8 and t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def _assert_equal(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert out.dtype == torch.uint8, f"{what}: dtype {out.dtype}"
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.is_contiguous(), what
    out = out.cpu()
    if not torch.equal(out, expected):
        diff = (out.int() - expected.int()).abs()
        raise AssertionError(f"{what}: {int((diff > 0).sum())} of {diff.numel()} pixels differ from Pillow, "
                             f"by up to {int(diff.max())}")


# (C, H, W, new_h, new_w), small enough for the interpreter (outputs about 64x64 at most).
SMALL_CASES = [
    (3, 17, 23, 40, 51),    # upscale, odd sizes
    (3, 61, 47, 13, 11),    # shrink by more than 4x: wide antialias windows
    (1, 40, 36, 29, 17),    # shrink, 1 channel (mode L)
    (3, 9, 64, 9, 20),      # width only (no vertical pass)
    (3, 64, 9, 20, 9),      # height only (no horizontal pass)
    (1, 1, 300, 7, 640),    # extreme aspect: one row up to 7, 300 columns to 640
    (3, 300, 3, 640, 1),    # extreme aspect: 3 columns to 1, 300 rows to 640
    (3, 1, 1, 5, 3),        # a single pixel
    (3, 5, 4, 1, 1),        # to a single pixel
    (3, 12, 14, 12, 14),    # same size: a copy
    (3, 60, 20, 10, 18),    # Pillow 13 runs the vertical pass first here
    (1, 96, 31, 25, 30),    # vertical first, 1 channel
    (4, 21, 19, 33, 12),    # RGBA: premultiplied alpha
    (2, 18, 22, 7, 30),     # LA: premultiplied alpha
]


def _random_cases(count: int, max_in: int, max_out: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        channels = rng.choice([1, 3, 3, 4])
        cases.append((channels, rng.randint(1, max_in), rng.randint(1, max_in),
                      rng.randint(1, max_out), rng.randint(1, max_out)))
    return cases


def _case_id(case):
    return "C{}-{}x{}-to-{}x{}".format(*case)


@pytest.mark.parametrize("layout", ["contiguous", "hwc"])
@pytest.mark.parametrize("case", SMALL_CASES + _random_cases(16, 80, 48, seed=1), ids=_case_id)
def test_triton_launcher_matches_pillow(device, case, layout, generator, poisoned_uint8_empty):
    channels, height, width, new_h, new_w = case
    image = _image(channels, height, width, layout, generator, device)
    expected = _pillow(image, new_h, new_w)
    out = torch.full((channels, new_h, new_w), POISON, dtype=torch.uint8, device=device)
    order = installed_pillow_horizontal_first(height, width, new_h, new_w)
    result = pil_bilinear_resize_triton(image, new_h, new_w, order, out=out)
    assert result.data_ptr() == out.data_ptr()
    _assert_equal(out, expected, f"triton {case} {layout}")


@pytest.mark.parametrize("case", _random_cases(12, 60, 40, seed=2), ids=_case_id)
def test_triton_op_matches_pillow(device, case, generator, resize_backend, poisoned_uint8_empty):
    """Through the public function and the custom op, on a cropped view."""
    resize_backend("triton")
    channels, height, width, new_h, new_w = case
    image = _image(channels, height, width, "crop", generator, device)
    _assert_equal(pil_bilinear_resize(image, (new_h, new_w)), _pillow(image, new_h, new_w), f"op {case}")


@pytest.mark.parametrize("horizontal_first", [True, False], ids=["horizontal-first", "vertical-first"])
def test_triton_pass_orders(device, horizontal_first, generator, resize_backend):
    """Either order equals Pillow resizing one axis, then the other (one pass each)."""
    resize_backend("triton")
    image = _image(3, 30, 26, "hwc", generator, device)
    new_h, new_w = 11, 37
    if horizontal_first:
        expected = _pillow(_pillow(image, 30, new_w), new_h, new_w)
    else:
        expected = _pillow(_pillow(image, new_h, 26), new_h, new_w)
    out = pil_bilinear_resize(image, (new_h, new_w), horizontal_first=horizontal_first)
    _assert_equal(out, expected, f"order horizontal_first={horizontal_first}")


# ---------------------------------------------------------------------------------------------------
# The torch reference (any device; CPU here), larger and more numerous cases
# ---------------------------------------------------------------------------------------------------
REFERENCE_CASES = SMALL_CASES + [
    (3, 480, 640, 640, 853),     # the official rule's upscale of a VGA photo
    (3, 1080, 1920, 640, 1138),  # the official rule's shrink of a 1080p photo
    (3, 1500, 500, 640, 213),    # tall: Pillow 13 runs the vertical pass first
    (3, 37, 2000, 3, 160),       # extreme shrink (ksize 25 horizontally)
    (4, 200, 150, 97, 311),
] + _random_cases(60, 300, 300, seed=3)


@pytest.mark.parametrize("layout", ["contiguous", "hwc"])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=_case_id)
def test_reference_matches_pillow(case, layout, generator):
    channels, height, width, new_h, new_w = case
    image = _image(channels, height, width, layout, generator)
    order = installed_pillow_horizontal_first(height, width, new_h, new_w)
    out = pil_bilinear_resize_reference(image, new_h, new_w, order)
    _assert_equal(out, _pillow(image, new_h, new_w), f"reference {case} {layout}")


def test_reference_op_and_pass_orders(generator, resize_backend):
    resize_backend("torch")
    image = _image(3, 70, 30, "hwc", generator)
    _assert_equal(pil_bilinear_resize(image, (20, 28)), _pillow(image, 20, 28), "op, the installed Pillow's order")
    horizontal = pil_bilinear_resize(image, (20, 28), horizontal_first=True)
    _assert_equal(horizontal, _pillow(_pillow(image, 70, 28), 20, 28), "horizontal first")
    vertical = pil_bilinear_resize(image, (20, 28), horizontal_first=False)
    _assert_equal(vertical, _pillow(_pillow(image, 20, 30), 20, 28), "vertical first")
    assert not torch.equal(horizontal, vertical), "the two orders should differ here"


@pytest.mark.parametrize("height", [200, 201, 300, 301])
def test_tall_sources_follow_the_installed_pillow(height, generator, resize_backend):
    """Pillow 12 switches to vertical first above a 100:1 aspect ratio: either side of the switch."""
    resize_backend("torch")
    width = height // 100
    image = _image(1, height, width, "hwc", generator)
    for new_h, new_w in ((height // 2, width * 5), (height - 7, width + 9)):
        _assert_equal(pil_bilinear_resize(image, (new_h, new_w)), _pillow(image, new_h, new_w),
                      f"{height}x{width} -> {new_h}x{new_w}")


def test_pillow13_pass_order_rule():
    """Vertical first exactly when H - new_h > max(0, 2 * (W - new_w))."""
    assert pillow_horizontal_first(1080, 1920, 640, 1138)      # landscape shrink
    assert pillow_horizontal_first(1920, 1080, 1138, 640)      # portrait shrink, aspect < 2
    assert not pillow_horizontal_first(1500, 500, 640, 213)    # 860 > 2 * 287
    assert pillow_horizontal_first(100, 50, 80, 40)            # 20 = 2 * 10: not more
    assert not pillow_horizontal_first(100, 50, 79, 40)        # 21 > 20
    assert not pillow_horizontal_first(100, 50, 99, 60)        # height shrinks, width grows
    assert pillow_horizontal_first(100, 50, 200, 10)           # height grows


# ---------------------------------------------------------------------------------------------------
# Coefficient tables
# ---------------------------------------------------------------------------------------------------
def _pillow_coefficients_scalar(in_size: int, out_size: int):
    """precompute_coeffs + normalize_coeffs_8bpc of Resample.c, one output at a time, in Python floats."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    inverse = 1.0 / filterscale
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights, total = [], 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * inverse)
            w = 1.0 - t if t < 1.0 else 0.0
            weights.append(w)
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        fixed = [int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS))
                 for w in weights]
        rows.append((xmin, xmax, fixed))
    return rows


@pytest.mark.parametrize("sizes", [(7, 3), (3, 7), (1080, 640), (1920, 1138), (300, 1), (1, 640), (5, 5), (97, 31)],
                         ids=lambda s: f"{s[0]}-to-{s[1]}")
def test_coefficients_match_a_scalar_transcription(sizes):
    in_size, out_size = sizes
    lo, coef = resample_coefficients(in_size, out_size)
    assert lo.dtype == torch.int32 and coef.dtype == torch.int32 and coef.shape[0] == out_size
    rows = _pillow_coefficients_scalar(in_size, out_size)
    for index, (xmin, count, fixed) in enumerate(rows):
        assert int(lo[index]) == xmin, (index, int(lo[index]), xmin)
        assert coef[index, :count].tolist() == fixed, index
        assert not coef[index, count:].any(), index
    # The horizontal pass needs no row crop: the vertical windows cover rows 0 .. in_size - 1.
    assert rows[0][0] == 0 and rows[-1][0] + rows[-1][1] == in_size


# ---------------------------------------------------------------------------------------------------
# Behaviour and errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_same_size_is_a_copy(backend, resize_backend, generator, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if not dispatch.triton_interpreter_mode():
            pytest.skip("Triton is in compiled mode in this process")
    resize_backend(backend)
    image = _image(3, 6, 5, "hwc", generator)
    out = pil_bilinear_resize(image, (6, 5))
    assert torch.equal(out, image) and out.is_contiguous() and out.data_ptr() != image.data_ptr()


def test_numpy_integer_sizes(generator):
    image = _image(1, 9, 8, "contiguous", generator)
    out = pil_bilinear_resize(image, (np.int64(4), np.int32(5)))
    _assert_equal(out, _pillow(image, 4, 5), "numpy sizes")


@pytest.mark.parametrize("image, size, error, match", [
    (torch.zeros(3, 4, 4), (2, 2), TypeError, "uint8"),
    (torch.zeros(4, 4, dtype=torch.uint8), (2, 2), ValueError, r"\(C, H, W\)"),
    (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (2, 2), ValueError, r"\(C, H, W\)"),
    (torch.zeros(5, 4, 4, dtype=torch.uint8), (2, 2), ValueError, "1 to 4 channels"),
    (torch.zeros(0, 4, 4, dtype=torch.uint8), (2, 2), ValueError, "1 to 4 channels"),
    (torch.zeros(3, 0, 4, dtype=torch.uint8), (2, 2), ValueError, "empty"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), (0, 2), ValueError, "at least 1x1"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), (2, -1), ValueError, "at least 1x1"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), (2.0, 2), TypeError, "integers"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), (2,), ValueError, r"\(new_h, new_w\)"),
    (np.zeros((3, 4, 4), np.uint8), (2, 2), TypeError, "tensor"),
])
def test_bad_inputs(image, size, error, match):
    with pytest.raises(error, match=match):
        pil_bilinear_resize(image, size)


def test_launcher_rejects_a_wrong_out():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="out must be"):
        pil_bilinear_resize_triton(image, 2, 3, True, out=torch.empty(3, 3, 2, dtype=torch.uint8))


@pytest.mark.interpreter
def test_opcheck(monkeypatch, generator):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    image = _image(3, 7, 6, "hwc", generator)
    torch.library.opcheck(torch.ops.sed_fast.pil_bilinear_resize.default, (image, 5, 9, True))


def test_torch_compile(generator, resize_backend):
    resize_backend("torch")
    torch._dynamo.reset()

    def preprocess(image):
        return pil_bilinear_resize(image, (9, 13)).float() / 255

    image = _image(3, 11, 8, "contiguous", generator)
    compiled = torch.compile(preprocess, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(image), preprocess(image), rtol=0, atol=0)
