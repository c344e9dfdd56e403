"""class_attention backward: the Triton kernel against autograd of the reference linear attention."""
from __future__ import annotations

import pytest
import torch

from sed_fast.kernels import class_attention
from sed_fast.kernels.class_attention import class_attention_backward_reference, class_attention_backward_triton


def _offsets(lengths, device):
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def _inputs(lengths, pixels, channels, dtype, device, generator):
    """q, k, v as the model makes them (views of one fused projection) and an upstream gradient."""
    rows = sum(lengths)
    qkv = torch.randn(rows, pixels, 3 * channels, generator=generator).to(device, dtype)
    grad = torch.randn(rows, pixels, channels, generator=generator).to(device, dtype)
    return (grad, *qkv.split(channels, dim=-1), _offsets(lengths, device))


def _check(got, inputs, num_heads, dtype, close_like_torch, what):
    grad, q, k, v, offsets = inputs
    expected32 = class_attention_backward_reference(*(t.cpu().float() for t in (grad, q, k, v)), offsets.cpu(),
                                                    num_heads)
    expected_lowp = class_attention_backward_reference(grad, q, k, v, offsets, num_heads)
    for name, g, e32, elp in zip("qkv", got, expected32, expected_lowp):
        close_like_torch(g, e32, elp, dtype, f"{what} grad {name}")
        assert g.is_contiguous()


@pytest.mark.parametrize("lengths", [[2], [3, 0, 4]], ids=["T2", "ragged-3-0-4"])
def test_matches_autograd_of_the_reference(triton_backend, dtype, lengths, generator, poisoned_empty,
                                          close_like_torch):
    """C=32, 4 heads (d=8), 13 pixels (not a multiple of the pixel block), an empty segment. (Not one
    class alone: then out = v up to eps, and the q gradient is rounding noise.)"""
    device = triton_backend
    inputs = _inputs(lengths, 13, 32, dtype, device, generator)
    got = class_attention_backward_triton(*inputs, num_heads=4)
    _check(got, inputs, 4, dtype, close_like_torch, f"lengths {lengths}")


@pytest.mark.parametrize("channels, heads", [(64, 4), (40, 4)], ids=["d16", "d10"])
def test_other_head_dims(triton_backend, channels, heads, generator, poisoned_empty, close_like_torch):
    """d = 16 (SED's middle level) and d = 10 (not a power of two: padded lanes)."""
    device = triton_backend
    inputs = _inputs([2, 3], 5, channels, torch.float32, device, generator)
    got = class_attention_backward_triton(*inputs, num_heads=heads)
    _check(got, inputs, heads, torch.float32, close_like_torch, f"C={channels}")


def test_large_negative_and_positive_inputs(triton_backend, generator, close_like_torch):
    """elu's two branches and exp of very negative inputs (phi -> 0, near-zero denominators + eps)."""
    device = triton_backend
    grad, q, k, v, offsets = _inputs([5], 6, 16, torch.float32, device, generator)
    q, k = q * 6, k * 6
    got = class_attention_backward_triton(grad, q, k, v, offsets, num_heads=2)
    _check(got, (grad, q, k, v, offsets), 2, torch.float32, close_like_torch, "scaled")


def test_through_the_op(triton_backend, generator, close_like_torch):
    device = triton_backend
    grad, q, k, v, offsets = _inputs([2, 4], 7, 16, torch.float32, device, generator)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(class_attention(*leaves, offsets, num_heads=4), leaves, grad)
    expected = class_attention_backward_reference(grad, q, k, v, offsets, 4)
    for g, e in zip(got, expected):
        close_like_torch(g, e, None, torch.float32, "through the op")


@pytest.mark.slow
def test_model_shapes(triton_backend, generator, close_like_torch):
    device = triton_backend
    inputs = _inputs([20], 576, 128, torch.bfloat16, device, generator)
    _check(class_attention_backward_triton(*inputs, num_heads=4), inputs, 4, torch.bfloat16, close_like_torch,
           "T=20 P=576 C=128")
