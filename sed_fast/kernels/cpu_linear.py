"""``F.linear`` on CPU through oneDNN's matmul instead of the BLAS ``addmm`` uses (MKL in the PyPI wheels).

On a 2-core AMD EPYC (Zen 5, AVX-512) MKL's float32 GEMM runs SED's linear shapes at 40-60% of
the speed of ONNX Runtime's (``benchmarks/cpu_gemm_libraries.py``), and oneDNN's is 1.3-2.7x
faster than MKL's on the encoder's MLPs: the image encoder takes 1.1 s instead of 1.9 s at 768 px.
The same values up to the summation order (float32 rounding).

:func:`linear` routes one call, :func:`onednn_linear_mode` every ``F.linear`` made inside it
(modules built by timm and open_clip, like the image encoder). Routed only where it is a plain
inference matmul: CPU, float32 operands, autograd not recording, not being traced by
torch.compile / torch.export (Inductor has its own handling of this op), oneDNN present and
found to agree with ``F.linear`` once per process; ``SED_FAST_ONEDNN_LINEAR=0`` turns it off.
Everything else goes to ``F.linear`` unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..base.envvars import env_value
from .costs import Cost, matmul_flops, nbytes, register_op_cost

_state = {"usable": None}  # None: not probed yet


def onednn_linear_usable() -> bool:
    """Whether oneDNN's linear exists here and equals ``F.linear`` on a small random case (probed once)."""
    if _state["usable"] is None:
        try:
            generator = torch.Generator().manual_seed(0)
            x, weight = torch.randn(37, 3, 24, generator=generator), torch.randn(40, 24, generator=generator)
            bias = torch.randn(40, generator=generator)
            with torch.no_grad():
                got = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
                _state["usable"] = bool(torch.backends.mkldnn.is_available()) and torch.allclose(
                    got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        except Exception:  # noqa: BLE001 - no such op in this torch build, or it fails: use F.linear
            _state["usable"] = False
    return _state["usable"]


def onednn_linear_enabled() -> bool:
    """Whether calls may go to oneDNN at all: not switched off, not being traced, oneDNN usable."""
    return env_value("SED_FAST_ONEDNN_LINEAR") and not torch.compiler.is_compiling() and onednn_linear_usable()


def routed(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`linear` sends this call to oneDNN."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and x.dim() >= 1 and (bias is None or bias.dtype == torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and onednn_linear_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN when :func:`routed`."""
    if routed(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _OneDNNLinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # what nn.Linear calls (F.linear is torch._C._nn.linear)
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


def onednn_linear_mode(device: torch.device):
    """A context in which every ``F.linear`` (``nn.Linear``) call goes through :func:`linear`;
    a no-op context off the CPU or when oneDNN is not used."""
    if torch.device(device).type != "cpu" or not onednn_linear_enabled():
        return contextlib.nullcontext()
    return _OneDNNLinearMode()


# Cost model: the routed calls are matmuls that torch's counter has no formula for (it counts the
# addmm of F.linear), so the fast model's linears would vanish from FlopCounterMode without it.
def linear_cost(x: torch.Tensor, *args, **kwargs) -> Cost:
    """mkldnn::_linear_pointwise: 2 * rows * in * out FLOPs, as torch counts F.linear's addmm; reads
    x, the weight and bias once, writes the output once. Both overloads: ``(x, weight, bias, attr,
    scalars, algorithm)`` and ``.binary``'s ``(x, other, weight, bias, attr)``."""
    binary = len(args) >= 4 and isinstance(args[0], torch.Tensor) and isinstance(args[3], str)
    weight, bias = (args[1], args[2]) if binary else (args[0], args[1] if len(args) > 1 else None)
    out_features, in_features = weight.shape[0], weight.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    return Cost(matmul_flops(rows, in_features, out_features),
                nbytes(x, weight, bias, args[0] if binary else None) + rows * out_features * x.element_size())


register_op_cost("mkldnn::_linear_pointwise", linear_cost)
