"""kernels.cpu_linear: F.linear through oneDNN on CPU, against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sed_fast.kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_linear_usable(), reason="this torch build has no usable "
                                "oneDNN linear (then F.linear runs: nothing to test)")


@pytest.mark.parametrize("shape, out_features", [((37, 24), 40), ((2, 5, 7, 33), 17), ((1, 128), 512), ((0, 8), 3)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_equals_f_linear(shape, out_features, with_bias, generator):
    x = torch.randn(*shape, generator=generator)
    weight = torch.randn(out_features, shape[-1], generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    assert cpu_linear.routed(x, weight, bias)
    out = cpu_linear.linear(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.dtype == torch.float32 and out.shape == expected.shape
    if out.numel():
        assert ((out.double() - expected).norm() / expected.norm()).item() <= 1e-6


def test_strided_inputs(generator):
    """A channel-strided input and a permuted (channels-last) one, as the encoder passes them."""
    weight, bias = torch.randn(16, 32, generator=generator), torch.randn(16, generator=generator)
    for x in (torch.randn(3, 5, 64, generator=generator)[..., ::2],
              torch.randn(2, 32, 5, 7, generator=generator).permute(0, 2, 3, 1)):
        torch.testing.assert_close(cpu_linear.linear(x, weight, bias), F.linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-5)


def test_what_is_not_routed(monkeypatch, generator):
    x, weight = torch.randn(4, 8, generator=generator), torch.randn(3, 8, generator=generator)
    assert not cpu_linear.routed(x.bfloat16(), weight.bfloat16())
    assert not cpu_linear.routed(x.double(), weight.double())
    with torch.enable_grad():
        assert not cpu_linear.routed(x.requires_grad_(), weight)
    assert cpu_linear.routed(x.detach(), weight)
    monkeypatch.setenv("SED_FAST_ONEDNN_LINEAR", "0")
    assert not cpu_linear.routed(x.detach(), weight)
    assert isinstance(cpu_linear.onednn_linear_mode("cpu"), type(cpu_linear.contextlib.nullcontext()))


def test_gradients_flow_through_the_unrouted_path(generator):
    x = torch.randn(4, 8, generator=generator, requires_grad=True)
    layer = nn.Linear(8, 3)
    with cpu_linear.onednn_linear_mode("cpu"):
        layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, 8))


def test_mode_routes_nn_linear_and_only_inside(monkeypatch, generator):
    calls = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    mlp = nn.Sequential(nn.Linear(24, 96), nn.GELU(), nn.Linear(96, 24)).eval()
    x = torch.randn(2, 9, 11, 24, generator=generator)
    with torch.no_grad():
        expected = mlp(x)
        assert not calls
        with cpu_linear.onednn_linear_mode("cpu"):
            got = mlp(x)
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(cpu_linear.onednn_linear_mode("meta"), type(cpu_linear.contextlib.nullcontext()))


def test_torch_compile_keeps_f_linear(generator):
    """Inductor cannot lower the oneDNN op with a weight that is an input: traced calls stay F.linear."""
    torch._dynamo.reset()
    x, weight = torch.randn(5, 8, generator=generator), torch.randn(3, 8, generator=generator)
    compiled = torch.compile(lambda a, w: cpu_linear.linear(a, w) * 2, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x, weight), F.linear(x, weight) * 2)


def test_probe_failure_falls_back(monkeypatch, generator):
    monkeypatch.setitem(cpu_linear._state, "usable", False)
    x, weight = torch.randn(4, 8, generator=generator), torch.randn(3, 8, generator=generator)
    assert not cpu_linear.routed(x, weight)
    torch.testing.assert_close(cpu_linear.linear(x, weight), F.linear(x, weight))

