"""Backward of the depthwise conv + LayerNorm (``sed_fast::dwconv_layernorm``).

With y = conv(x) + dw_bias (depthwise KxK, zero padding), per pixel xhat = (y - mean_C y) * rstd and
out = xhat * ln_weight + ln_bias, and g = grad_out (N, H, W, C):

    grad ln_bias = sum_pix g              grad ln_weight = sum_pix g * xhat
    dy = rstd * (g*ln_weight - mean_C(g*ln_weight) - xhat * mean_C(g*ln_weight*xhat))
    grad dw_bias = sum_pix dy             grad dw_weight[c, tap] = sum_pix dy[c, pix] * x[c, pix + tap]
    grad x[c, pix] = sum_tap dy[c, pix - tap] * dw_weight[c, tap]            (the transposed conv)

``sed_fast::dwconv_layernorm_backward(grad, x, dw_weight, dw_bias, ln_weight, ln_bias, eps)``
returns the five gradients, each with the strides of ``torch.empty_like`` of its input. Backends:
``"torch"``, autograd of :func:`~sed_fast.kernels.dwconv_layernorm.dwconv_layernorm_reference`
recomputed from the inputs; ``"triton"``. The forward saves only its inputs (the reference's
autograd would also keep the conv output y, an (N, C, H, W) tensor).
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import dispatch
from ._autograd import in_layout_of, reference_vjp, zeros_where_missing
from .dwconv_layernorm import _dwconv_layernorm_op, dwconv_layernorm_reference

OP_NAME = "dwconv_layernorm_backward"


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch reference: autograd of the reference forward
# ---------------------------------------------------------------------------------------------------
def dwconv_layernorm_backward_reference(grad: torch.Tensor, x: torch.Tensor, dw_weight: torch.Tensor,
                                        dw_bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                        eps: float = 1e-6) -> Tuple[torch.Tensor, ...]:
    """The five gradients by autograd of :func:`dwconv_layernorm_reference`, in the input dtype."""
    inputs = (x, dw_weight, dw_bias, ln_weight, ln_bias)
    needs = (True,) * 5
    grads = reference_vjp(dwconv_layernorm_reference, grad.to(x.dtype), inputs, needs, eps)
    return tuple(in_layout_of(g, t) for g, t in zip(zeros_where_missing(grads, inputs, needs), inputs))


# ---------------------------------------------------------------------------------------------------
# The backward op and the forward's autograd formula
# ---------------------------------------------------------------------------------------------------
def _grads_like(*inputs):
    return tuple(torch.empty_like(t) for t in inputs)


@torch.library.custom_op("sed_fast::dwconv_layernorm_backward", mutates_args=())
def _dwconv_layernorm_backward_op(grad: torch.Tensor, x: torch.Tensor, dw_weight: torch.Tensor,
                                  dw_bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                  eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
    if x.numel() == 0:  # no pixel: every gradient is zero
        return tuple(g.zero_() for g in _grads_like(x, dw_weight, dw_bias, ln_weight, ln_bias))
    args = (grad, x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    return tuple(dispatch.resolve(OP_NAME, x.device, args=args)(*args))


@_dwconv_layernorm_backward_op.register_fake
def _(grad, x, dw_weight, dw_bias, ln_weight, ln_bias, eps):
    return _grads_like(x, dw_weight, dw_bias, ln_weight, ln_bias)


dispatch.register_impl(OP_NAME, "torch", dwconv_layernorm_backward_reference)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.eps = inputs[5]


def _backward(ctx, grad):
    grads = _dwconv_layernorm_backward_op(grad, *ctx.saved_tensors, ctx.eps)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


_dwconv_layernorm_op.register_autograd(_backward, setup_context=_setup_context)
