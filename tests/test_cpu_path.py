"""The CPU path: the official resize through Pillow's own code (bit-equal to the torch reference); a
16-bit model on a CPU that would emulate it is warned about."""
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
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would make Triton the CPU backend
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


@pytest.mark.parametrize("flags, dtype, warns", [
    ({"avx2", "fma"}, torch.bfloat16, True),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, False),
    ({"avx2", "amx_tile", "amx_bf16"}, torch.bfloat16, False),
    ({"avx2", "avx512_bf16"}, torch.float16, True),
    ({"asimd", "bf16"}, torch.bfloat16, False),  # Arm's Features line
    (None, torch.bfloat16, False),  # no /proc/cpuinfo: unknown, no warning
])
def test_16_bit_on_a_cpu_without_its_instructions_is_warned_about(flags, dtype, warns, monkeypatch):
    import warnings

    from sed_fast import api
    from sed_fast.base import cpu_features

    monkeypatch.setattr(cpu_features, "_all_flags", lambda: None if flags is None else frozenset(flags))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        api._warn_if_emulated(dtype)
    slow = [w for w in caught if issubclass(w.category, api.SlowDtypeWarning)]
    assert bool(slow) == warns
    if warns:
        assert "emulated" in str(slow[0].message) and "float32 is faster" in str(slow[0].message)


def test_build_sed_warns_about_an_emulated_dtype_on_cpu_only(monkeypatch):
    import warnings

    import sed_fast
    from sed_fast import api
    from sed_fast.base import cpu_features

    monkeypatch.setattr(cpu_features, "_all_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(api.SlowDtypeWarning, match="bfloat16 on this CPU is emulated"):
        sed_fast.build_sed("b", impl="reference", device="cpu", dtype=torch.bfloat16, clip_resolution=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sed_fast.build_sed("b", impl="reference", device="cpu", dtype=torch.float32, clip_resolution=64)
    assert not [w for w in caught if issubclass(w.category, api.SlowDtypeWarning)]


def test_the_cpu_flags_are_read_from_proc_cpuinfo(tmp_path, monkeypatch):
    from sed_fast.base import cpu_features

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    cpu_features._all_flags.cache_clear()
    try:
        assert cpu_features.cpu_flags() == ("avx2", "avx512f", "avx512_bf16")
        assert cpu_features.has_native_16bit(torch.bfloat16) is True
        assert cpu_features.has_native_16bit(torch.float16) is False
        assert cpu_features.has_native_16bit(torch.float32) is None
    finally:
        monkeypatch.undo()
        cpu_features._all_flags.cache_clear()
