"""class_attention's "cpu" backend (the kernel's algorithm shaped for CPUs) against the reference."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from sed_fast.kernels import class_attention, class_attention_reference, dispatch

from test_class_attention import _offsets, _official_per_segment, _qkv_views

cpu_module = sys.modules["sed_fast.kernels.class_attention"]


@pytest.fixture
def cpu_backend():
    dispatch.set_backend("class_attention", "cpu")
    yield
    dispatch.set_backend("class_attention", None)


def _check(out, q, k, v, offsets, num_heads, dtype, close_like_torch, what):
    reference32 = class_attention_reference(q.float(), k.float(), v.float(), offsets, num_heads)
    reference_lowp = class_attention_reference(q, k, v, offsets, num_heads)
    close_like_torch(out, reference32, reference_lowp, dtype, what)
    assert out.is_contiguous()


def test_auto_picks_it_on_cpu_only():
    q = torch.randn(3, 4, 8)
    args = (q, q, q, _offsets([3], "cpu"), 2)
    if not (dispatch.triton_interpreter_mode() and dispatch.triton_interpreter_on()):
        assert dispatch.resolve_name("class_attention", "cpu", args) == "cpu"
    assert "CPU tensors" in dispatch.backend("class_attention", "cpu").unavailable(torch.device("cuda"))


@pytest.mark.parametrize("classes", [1, 7, 150], ids=lambda t: f"T{t}")
def test_matches_reference(cpu_backend, dtype, classes, generator, poisoned_empty, close_like_torch):
    q, k, v = _qkv_views(classes, 13, 32, dtype, "cpu", generator)
    offsets = _offsets([classes], "cpu")
    out = class_attention(q, k, v, offsets, num_heads=4)
    _check(out, q, k, v, offsets, 4, dtype, close_like_torch, f"cpu class_attention T={classes}")


@pytest.mark.parametrize("channels, heads", [(64, 4), (128, 4), (24, 3), (5, 1)], ids=lambda x: str(x))
def test_head_dims(cpu_backend, channels, heads, generator, poisoned_empty, close_like_torch):
    q, k, v = _qkv_views(9, 11, channels, torch.float32, "cpu", generator)
    offsets = _offsets([4, 5], "cpu")
    out = class_attention(q, k, v, offsets, num_heads=heads)
    _check(out, q, k, v, offsets, heads, torch.float32, close_like_torch, f"cpu class_attention C={channels}")


def test_segments_equal_each_image_alone(cpu_backend, dtype, generator, poisoned_empty):
    """Ragged batch with empty segments: each equals the official code on that image alone (float64)."""
    lengths = [3, 0, 1, 7, 0]
    q, k, v = _qkv_views(sum(lengths), 10, 32, dtype, "cpu", generator)
    out = class_attention(q, k, v, _offsets(lengths, "cpu"), num_heads=4)
    assert not torch.isnan(out).any()
    expected = _official_per_segment(q, k, v, lengths, 4)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert ((out.double() - expected).norm() / expected.norm()).item() <= tolerance


def test_pixel_chunks_and_strided_inputs(cpu_backend, monkeypatch, generator, poisoned_empty, close_like_torch):
    """A state budget of a few pixels makes many pixel chunks with a ragged last one; q, k, v are
    sliced views of one qkv tensor (as the model passes them) and one has a channel stride."""
    monkeypatch.setattr(cpu_module, "CPU_STATE_BYTES", 3 * 32 * 8 * 4)  # 3 pixels per chunk at C=32, d=8
    q, k, v = _qkv_views(6, 17, 32, torch.float32, "cpu", generator)
    q, k, v = q[:, 2:16], k[:, 2:16], v[:, 2:16]
    k_channel_strided = torch.randn(6, 14, 64, generator=generator)[:, :, ::2]
    offsets = _offsets([2, 4], "cpu")
    for key in (k, k_channel_strided):
        out = class_attention(q, key, v, offsets, num_heads=4)
        expected = class_attention_reference(q.contiguous(), key.contiguous(), v.contiguous(), offsets, 4)
        close_like_torch(out, expected, None, torch.float32, "cpu class_attention, chunked and strided")


def test_large_inputs_keep_fp32_state(cpu_backend, generator, close_like_torch):
    """847 classes in bfloat16 at model-like magnitudes: the float32 state keeps it as accurate as torch."""
    q, k, v = (3 * t for t in _qkv_views(847, 5, 32, torch.bfloat16, "cpu", generator))
    offsets = _offsets([847], "cpu")
    _check(class_attention(q, k, v, offsets, num_heads=4), q, k, v, offsets, 4, torch.bfloat16, close_like_torch,
           "cpu class_attention T=847")


def test_eps_and_int64_offsets(cpu_backend, generator):
    q, k, v = _qkv_views(5, 4, 16, torch.float32, "cpu", generator)
    offsets = _offsets([5], "cpu").long()
    out = class_attention(q, k, v, offsets, num_heads=2, eps=1e-3)
    torch.testing.assert_close(out, class_attention_reference(q, k, v, offsets, num_heads=2, eps=1e-3),
                               rtol=1e-5, atol=1e-6)


def test_rejects_offsets_that_do_not_cover_the_rows():
    q = torch.randn(5, 3, 8)
    with pytest.raises(ValueError, match="class_offsets must rise"):
        cpu_module.class_attention_cpu(q, q, q, torch.tensor([0, 4], dtype=torch.int32), num_heads=2)


def test_positive_feature_is_elu_plus_one():
    x = torch.cat([torch.linspace(-30, 30, 10001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"),
                                                                   float("-inf")])])
    torch.testing.assert_close(cpu_module._positive_feature(x), F.elu(x) + 1, rtol=2e-7, atol=1e-7)
