"""dwconv_layernorm: the Triton kernel against depthwise conv2d -> permute -> LayerNorm."""
from __future__ import annotations

import pytest
import torch

from sed_fast.kernels import dwconv_layernorm, dwconv_layernorm_reference
from sed_fast.models.decoder import ConvNextBlock


def _params(channels, kernel_size, dtype, device, generator):
    def make(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=generator) * scale + shift).to(device, dtype)
    return (make(channels, 1, kernel_size, kernel_size, scale=0.1), make(channels, scale=0.1),
            make(channels, scale=0.2, shift=1.0), make(channels, scale=0.1))


def _input(shape, layout, dtype, device, generator):
    n, c, h, w = shape
    x = torch.randn(n + (layout == "row_slice"), c, h, w, generator=generator).to(device, dtype)
    x = x.contiguous() if layout == "contiguous" else x.contiguous(memory_format=torch.channels_last)
    return x[1:] if layout == "row_slice" else x  # the model passes x[start:stop] of a channels-last batch


def _check(out, x, params, eps, dtype, close_like_torch, what):
    reference32 = dwconv_layernorm_reference(x.cpu().float(), *(p.cpu().float() for p in params), eps)
    reference_lowp = dwconv_layernorm_reference(x, *params, eps)
    close_like_torch(out, reference32, reference_lowp, dtype, what)
    assert out.is_contiguous()


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "row_slice"])
@pytest.mark.parametrize("shape", [(2, 32, 7, 11), (1, 64, 6, 9), (1, 128, 5, 6)],
                         ids=lambda s: "N{}-C{}-{}x{}".format(*s))
def test_matches_reference(triton_backend, dtype, shape, layout, generator, poisoned_empty, close_like_torch):
    """C in {32, 64, 128} (SED's blocks), H and W not multiples of the tiles, K=9."""
    device = triton_backend
    x = _input(shape, layout, dtype, device, generator)
    params = _params(shape[1], 9, dtype, device, generator)
    out = dwconv_layernorm(x, *params, eps=1e-6)
    n, c, h, w = shape
    assert out.shape == (n, h, w, c)
    _check(out, x, params, 1e-6, dtype, close_like_torch, f"dwconv_layernorm {shape} {layout}")


@pytest.mark.parametrize("rows", [1, 7, 150], ids=lambda t: f"T{t}")
def test_class_counts(triton_backend, rows, generator, poisoned_empty, close_like_torch):
    """The rows are the classes (B*T): 1, 7 and 150 of them at a small size (K=3 at 150 rows keeps
    the interpreter run short; K=9 is covered above)."""
    device = triton_backend
    kernel_size = 9 if rows < 100 else 3
    x = _input((rows, 32, 3, 4), "channels_last", torch.float16, device, generator)
    params = _params(32, kernel_size, torch.float16, device, generator)
    out = dwconv_layernorm(x, *params)
    _check(out, x, params, 1e-6, torch.float16, close_like_torch, f"dwconv_layernorm T={rows}")


@pytest.mark.parametrize("kernel_size, channels", [(3, 20), (7, 48)], ids=["K3-C20", "K7-C48"])
def test_other_kernel_sizes_and_channels(triton_backend, kernel_size, channels, generator, close_like_torch):
    device = triton_backend
    x = _input((2, channels, 6, 5), "channels_last", torch.float32, device, generator)
    params = _params(channels, kernel_size, torch.float32, device, generator)
    out = dwconv_layernorm(x, *params, eps=1e-5)
    _check(out, x, params, 1e-5, torch.float32, close_like_torch, f"K={kernel_size} C={channels}")


def test_equals_the_convnext_block_head(triton_backend, generator):
    """Same as the reference ConvNextBlock's dwconv -> permute -> norm."""
    device = triton_backend
    block = ConvNextBlock(32).to(device)
    x = torch.randn(3, 32, 8, 7, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block.norm(block.dwconv(x).permute(0, 2, 3, 1))
        out = dwconv_layernorm(x, block.dwconv.weight, block.dwconv.bias, block.norm.weight, block.norm.bias,
                               block.norm.eps)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_model_shapes(triton_backend, generator, close_like_torch):
    device = triton_backend
    x = _input((4, 128, 24, 24), "channels_last", torch.bfloat16, device, generator)
    params = _params(128, 9, torch.bfloat16, device, generator)
    _check(dwconv_layernorm(x, *params), x, params, 1e-6, torch.bfloat16, close_like_torch, "24x24 C=128")


def test_empty_batch():
    params = _params(8, 3, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert dwconv_layernorm(torch.randn(0, 8, 5, 5), *params).shape == (0, 5, 5, 8)


def _bad(what):
    x, (w, b, g, beta) = torch.randn(1, 8, 5, 5), _params(8, 3, torch.float32, "cpu", torch.Generator())
    return {
        "rank": (x[0], w, b, g, beta),
        "even K": (x, torch.randn(8, 1, 4, 4), b, g, beta),
        "weight channels": (x, torch.randn(6, 1, 3, 3), b, g, beta),
        "bias shape": (x, w, torch.randn(7), g, beta),
        "dtype mismatch": (x, w.half(), b, g, beta),
        "unsupported dtype": (x.double(), w.double(), b.double(), g.double(), beta.double()),
    }[what]


@pytest.mark.parametrize("what, error, match", [
    ("rank", ValueError, r"\(N, C, H, W\)"),
    ("even K", ValueError, "K odd"),
    ("weight channels", ValueError, r"\(C, 1, K, K\)"),
    ("bias shape", ValueError, "dw_bias"),
    ("dtype mismatch", TypeError, "dtype"),
    ("unsupported dtype", TypeError, "float32"),
])
def test_bad_inputs(what, error, match):
    with pytest.raises(error, match=match):
        dwconv_layernorm(*_bad(what))


@pytest.mark.interpreter
def test_opcheck(monkeypatch, generator):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 16, 5, 4, generator=generator).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.sed_fast.dwconv_layernorm.default,
                          (x, *_params(16, 3, torch.float32, "cpu", generator), 1e-6))


def test_torch_compile(generator):
    torch._dynamo.reset()
    params = _params(16, 3, torch.float32, "cpu", generator)

    def block_head(x):
        return torch.nn.functional.gelu(dwconv_layernorm(x, *params))

    x = torch.randn(2, 16, 5, 4, generator=generator).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(block_head, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), block_head(x))
