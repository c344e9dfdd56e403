"""dwconv_layernorm backward: the Triton kernels against autograd of conv2d -> permute -> LayerNorm."""
from __future__ import annotations

import importlib

import pytest
import torch

from sed_fast.kernels import dwconv_layernorm
from sed_fast.kernels.dwconv_layernorm import dwconv_layernorm_backward_reference, dwconv_layernorm_backward_triton

# The op's module (the package attribute of the same name is the function).
backward_module = importlib.import_module("sed_fast.kernels.dwconv_layernorm")

NAMES = ("x", "dw_weight", "dw_bias", "ln_weight", "ln_bias")


def _inputs(shape, kernel_size, layout, dtype, device, generator, grad_layout="contiguous"):
    n, c, h, w = shape

    def make(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=generator) * scale + shift).to(device, dtype)

    x = make(n + (layout == "row_slice"), c, h, w)
    x = x.contiguous() if layout == "contiguous" else x.contiguous(memory_format=torch.channels_last)
    x = x[1:] if layout == "row_slice" else x
    params = (make(c, 1, kernel_size, kernel_size, scale=0.2), make(c, scale=0.1), make(c, scale=0.2, shift=1.0),
              make(c, scale=0.1))
    grad = make(n, h, w, c) if grad_layout == "contiguous" else make(n, c, h, w).permute(0, 2, 3, 1)
    return grad, x, params


def _check(got, grad, x, params, eps, dtype, close_like_torch, what):
    expected32 = dwconv_layernorm_backward_reference(grad.cpu().float(), x.cpu().float(),
                                                     *(p.cpu().float() for p in params), eps)
    expected_lowp = dwconv_layernorm_backward_reference(grad, x, *params, eps)
    for name, g, e32, elp, t in zip(NAMES, got, expected32, expected_lowp, (x, *params)):
        close_like_torch(g, e32, elp, dtype, f"{what} grad {name}")
        assert g.stride() == torch.empty_like(t).stride(), f"{what} grad {name}: strides {g.stride()}"


def test_matches_autograd_of_the_reference(triton_backend, dtype, generator, poisoned_empty, close_like_torch):
    """Channels-last x (the model's layout), C=24, 5x7 pixels (not multiples of the tiles), K=5."""
    device = triton_backend
    grad, x, params = _inputs((2, 24, 5, 7), 5, "channels_last", dtype, device, generator)
    got = dwconv_layernorm_backward_triton(grad, x, *params, 1e-6)
    _check(got, grad, x, params, 1e-6, dtype, close_like_torch, f"{dtype}")


@pytest.mark.parametrize("layout", ["contiguous", "row_slice"])
def test_input_layouts_and_a_strided_gradient(triton_backend, layout, generator, poisoned_empty, close_like_torch):
    """Contiguous NCHW and a row slice of a channels-last batch (x[start:stop], as the model chunks);
    an upstream gradient that is a permuted view, not a contiguous (N, H, W, C) tensor."""
    device = triton_backend
    grad, x, params = _inputs((2, 12, 4, 6), 3, layout, torch.float32, device, generator, grad_layout="permuted")
    got = dwconv_layernorm_backward_triton(grad, x, *params, 1e-5)
    _check(got, grad, x, params, 1e-5, torch.float32, close_like_torch, layout)


def test_nine_by_nine_taps(triton_backend, generator, poisoned_empty, close_like_torch):
    """SED's K=9 with C=32, on an image smaller than the taps' reach."""
    device = triton_backend
    grad, x, params = _inputs((1, 32, 4, 5), 9, "channels_last", torch.float16, device, generator)
    got = dwconv_layernorm_backward_triton(grad, x, *params, 1e-6)
    _check(got, grad, x, params, 1e-6, torch.float16, close_like_torch, "K=9")


def test_rows_in_chunks(triton_backend, monkeypatch, generator, poisoned_empty, close_like_torch):
    """More rows (classes) than weight-gradient chunks: 5 rows in 2 chunks hold 3 and 2 rows
    (as 171 rows do in 64 chunks of 3, the last of 3 - 2; kept small for the interpreter)."""
    device = triton_backend
    monkeypatch.setattr(backward_module, "WEIGHT_CHUNKS", 2)
    grad, x, params = _inputs((5, 16, 2, 3), 3, "channels_last", torch.bfloat16, device, generator)
    got = dwconv_layernorm_backward_triton(grad, x, *params, 1e-6)
    _check(got, grad, x, params, 1e-6, torch.bfloat16, close_like_torch, "5 rows in 2 chunks")


def test_through_the_op(triton_backend, generator, close_like_torch):
    device = triton_backend
    grad, x, params = _inputs((2, 8, 3, 4), 3, "channels_last", torch.float32, device, generator)
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    got = torch.autograd.grad(dwconv_layernorm(*leaves), leaves, grad)
    expected = dwconv_layernorm_backward_reference(grad, x, *params)
    for name, g, e in zip(NAMES, got, expected):
        close_like_torch(g, e, None, torch.float32, f"through the op: {name}")


@pytest.mark.slow
def test_model_shapes(triton_backend, generator, close_like_torch):
    device = triton_backend
    grad, x, params = _inputs((4, 128, 24, 24), 9, "channels_last", torch.bfloat16, device, generator)
    _check(dwconv_layernorm_backward_triton(grad, x, *params, 1e-6), grad, x, params, 1e-6, torch.bfloat16,
           close_like_torch, "24x24 C=128")
