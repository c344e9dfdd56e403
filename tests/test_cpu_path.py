"""The CPU path: the official resize through Pillow's own code (bit-equal to the torch reference)."""
import importlib

import pytest
import torch

from sed_fast.kernels import dispatch
from sed_fast.kernels.pil_bilinear_resize import (installed_pillow_horizontal_first, pil_bilinear_resize,
                                                  pil_bilinear_resize_cpu, pil_bilinear_resize_reference)

resize_module = importlib.import_module("sed_fast.kernels.pil_bilinear_resize")  # the module, not the function
CASES = [(1, 37, 53, 20, 29), (2, 40, 31, 77, 12), (3, 480, 640, 640, 853), (3, 300, 100, 128, 43),
         (4, 61, 97, 61, 50), (3, 50, 60, 25, 60), (3, 9, 7, 9, 7)]


@pytest.mark.parametrize("hwc", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_cpu_backend_equals_the_reference_in_both_orders(case, hwc):
    channels, height, width, new_h, new_w = case
    gen = torch.Generator().manual_seed(sum(case))
    image = torch.randint(0, 256, (height, width, channels) if hwc else (channels, height, width),
                          dtype=torch.uint8, generator=gen)
    image = image.permute(2, 0, 1) if hwc else image
    for horizontal_first in (True, False):
        expected = pil_bilinear_resize_reference(image, new_h, new_w, horizontal_first)
        out = pil_bilinear_resize_cpu(image, new_h, new_w, horizontal_first)
        assert out.dtype == torch.uint8 and out.is_contiguous() and out.shape == expected.shape
        assert torch.equal(out, expected), (case, hwc, horizontal_first)


def test_the_op_uses_pillow_on_cpu_in_the_installed_order(monkeypatch):
    calls = []
    real = resize_module.pil_bilinear_resize_pillow
    monkeypatch.setattr(resize_module, "pil_bilinear_resize_pillow", lambda *a: calls.append(a) or real(*a))
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    assert dispatch.resolve_name("pil_bilinear_resize", "cpu", (image, 64, 85, True)) == "torch"
    out = pil_bilinear_resize(image, (64, 85))
    assert len(calls) == 1 and torch.equal(out, pil_bilinear_resize_reference(
        image, 64, 85, installed_pillow_horizontal_first(90, 120, 64, 85)))
    pil_bilinear_resize(image, (64, 85), horizontal_first=not installed_pillow_horizontal_first(90, 120, 64, 85))
    assert len(calls) == 1  # the other order: Pillow cannot give it, the torch passes do
