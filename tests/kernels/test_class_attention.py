"""class_attention: the Triton kernel against the official einsum linear attention, per segment."""
from __future__ import annotations

import pytest
import torch

from sed_fast.kernels import class_attention, class_attention_reference
from sed_fast.models.decoder import linear_attention


def _offsets(lengths, device):
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _qkv_views(rows, pixels, channels, dtype, device, generator):
    """q, k, v as the model makes them: the three views qkv.split(C, dim=-1) of one (R, P, 3C) tensor."""
    qkv = torch.randn(rows, pixels, 3 * channels, generator=generator).to(device, dtype)
    return qkv.split(channels, dim=-1)


def _official_per_segment(q, k, v, lengths, num_heads, eps=1e-6):
    """The official LinearAttention run on each image alone, in float64: (L, P, C) -> (P, L, H, d)."""
    rows, pixels, channels = q.shape
    head_dim = channels // num_heads
    outputs, first = [], 0
    for length in lengths:
        def per_pixel(t):
            return t[first:first + length].double().cpu().transpose(0, 1).reshape(pixels, length, num_heads, head_dim)
        if length:
            out = linear_attention(per_pixel(q), per_pixel(k), per_pixel(v), eps)
            outputs.append(out.reshape(pixels, length, channels).transpose(0, 1))
        first += length
    return torch.cat(outputs)


def _check(out, q, k, v, offsets, num_heads, dtype, close_like_torch, what):
    reference32 = class_attention_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), offsets.cpu(), num_heads)
    reference_lowp = class_attention_reference(q, k, v, offsets, num_heads)
    close_like_torch(out, reference32, reference_lowp, dtype, what)
    assert out.is_contiguous()


@pytest.mark.parametrize("classes", [1, 7, 150], ids=lambda t: f"T{t}")
def test_matches_reference(triton_backend, dtype, classes, generator, poisoned_empty, close_like_torch):
    """One image; C=32 with 4 heads (d=8), 13 pixels (not a multiple of the pixel block)."""
    device = triton_backend
    q, k, v = _qkv_views(classes, 13, 32, dtype, device, generator)
    offsets = _offsets([classes], device)
    out = class_attention(q, k, v, offsets, num_heads=4)
    _check(out, q, k, v, offsets, 4, dtype, close_like_torch, f"class_attention T={classes}")


@pytest.mark.parametrize("channels", [64, 128], ids=lambda c: f"C{c}")
def test_head_dims_16_and_32(triton_backend, channels, generator, poisoned_empty, close_like_torch):
    device = triton_backend
    q, k, v = _qkv_views(9, 11, channels, torch.float32, device, generator)
    offsets = _offsets([4, 5], device)
    out = class_attention(q, k, v, offsets, num_heads=4)
    _check(out, q, k, v, offsets, 4, torch.float32, close_like_torch, f"class_attention C={channels}")


def test_segments_equal_each_image_alone(triton_backend, dtype, generator, poisoned_empty):
    """Ragged batch (lengths 3, 0, 1, 7, 0): each segment equals the official code run on that image
    alone; empty segments are allowed and write nothing."""
    device = triton_backend
    lengths = [3, 0, 1, 7, 0]
    q, k, v = _qkv_views(sum(lengths), 10, 32, dtype, device, generator)
    out = class_attention(q, k, v, _offsets(lengths, device), num_heads=4)
    assert not torch.isnan(out).any()
    expected = _official_per_segment(q, k, v, lengths, 4)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    relative = ((out.double().cpu() - expected).norm() / expected.norm()).item()
    assert relative <= tolerance


def test_vocabulary_size_847(triton_backend, generator, poisoned_empty, close_like_torch):
    device = triton_backend
    q, k, v = _qkv_views(847, 3, 32, torch.bfloat16, device, generator)
    offsets = _offsets([847], device)
    out = class_attention(q, k, v, offsets, num_heads=4)
    _check(out, q, k, v, offsets, 4, torch.bfloat16, close_like_torch, "class_attention T=847")


@pytest.mark.slow
def test_model_shapes(triton_backend, generator, close_like_torch):
    device = triton_backend
    q, k, v = _qkv_views(150, 576, 128, torch.float16, device, generator)
    offsets = _offsets([100, 50], device)
    out = class_attention(q, k, v, offsets, num_heads=4)
    _check(out, q, k, v, offsets, 4, torch.float16, close_like_torch, "class_attention 24x24")


def test_strided_and_non_contiguous_inputs(triton_backend, generator, close_like_torch):
    """Row/pixel strides are read in place (sliced pixel range of the split views, as the model's
    pixel chunks make them); a channel stride other than 1 is copied first."""
    device = triton_backend
    q, k, v = _qkv_views(6, 12, 32, torch.float32, device, generator)
    q, k, v = q[:, 2:9], k[:, 2:9], v[:, 2:9]
    k_channel_strided = torch.randn(6, 7, 64, generator=generator).to(device)[:, :, ::2]
    offsets = _offsets([2, 4], device)
    for key in (k, k_channel_strided):
        out = class_attention(q, key, v, offsets, num_heads=4)
        expected = class_attention_reference(q.contiguous(), key.contiguous(), v.contiguous(), offsets, 4)
        close_like_torch(out, expected, None, torch.float32, "strided")


def test_int64_offsets_and_eps(triton_backend, generator):
    device = triton_backend
    q, k, v = _qkv_views(5, 4, 16, torch.float32, device, generator)
    offsets = _offsets([5], device).long()
    out = class_attention(q, k, v, offsets, num_heads=2, eps=1e-3)
    expected = class_attention_reference(q, k, v, offsets, num_heads=2, eps=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_empty_inputs():
    q = torch.randn(0, 4, 8)
    assert class_attention(q, q, q, torch.zeros(3, dtype=torch.int32), num_heads=2).shape == (0, 4, 8)


def test_reference_rejects_offsets_that_do_not_cover_the_rows():
    q = torch.randn(5, 3, 8)
    with pytest.raises(ValueError, match="class_offsets must rise"):
        class_attention_reference(q, q, q, torch.tensor([0, 4], dtype=torch.int32), num_heads=2)


@pytest.mark.parametrize("make, error, match", [
    (lambda q: (q[0], q[0], q[0], torch.tensor([0, 3], dtype=torch.int32), 4), ValueError, r"\(total_T, P, C\)"),
    (lambda q: (q, q[:, :2], q, torch.tensor([0, 3], dtype=torch.int32), 4), ValueError, "same shape"),
    (lambda q: (q, q.half(), q, torch.tensor([0, 3], dtype=torch.int32), 4), TypeError, "same dtype"),
    (lambda q: (q.double(), q.double(), q.double(), torch.tensor([0, 3], dtype=torch.int32), 4), TypeError,
     "supports float32"),
    (lambda q: (q, q, q, torch.tensor([0.0, 3.0]), 4), TypeError, "int32"),
    (lambda q: (q, q, q, torch.tensor([3], dtype=torch.int32), 4), ValueError, r"\(B\+1,\)"),
    (lambda q: (q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3), ValueError, "dividing C"),
    (lambda q: (q, q, q, torch.tensor([0, 3], dtype=torch.int32), 0), ValueError, "dividing C"),
])
def test_bad_inputs(make, error, match):
    q = torch.randn(3, 5, 8)
    q_, k_, v_, offsets, heads = make(q)
    with pytest.raises(error, match=match):
        class_attention(q_, k_, v_, offsets, num_heads=heads)


@pytest.mark.interpreter
def test_opcheck(monkeypatch, generator):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (t.contiguous() for t in _qkv_views(5, 3, 16, torch.float32, "cpu", generator))
    torch.library.opcheck(torch.ops.sed_fast.class_attention.default,
                          (q, k, v, _offsets([2, 0, 3], "cpu"), 4, 1e-6))


def test_torch_compile(generator):
    torch._dynamo.reset()

    def block(x, offsets):
        q, k, v = x.split(16, dim=-1)
        return x[..., :16] + class_attention(q, k, v, offsets, num_heads=4)

    x = torch.randn(5, 3, 48, generator=generator)
    offsets = _offsets([2, 3], "cpu")
    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x, offsets), block(x, offsets))
