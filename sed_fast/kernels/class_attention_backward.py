"""Backward of the linear class attention (``sed_fast::class_attention``).

Per image, pixel and head, with phi(x) = elu(x) + 1, KV = sum_s phi(k_s) (x) v_s,
ksum = sum_s phi(k_s), den_t = phi(q_t) . ksum + eps, out_t = phi(q_t) KV / den_t and g_t = grad out_t:

    dnum_t = g_t / den_t                  dden_t = -(g_t . out_t) / den_t
    grad phi(q_t) = KV dnum_t + ksum dden_t
    dKV = sum_t phi(q_t) (x) dnum_t       dksum = sum_t phi(q_t) dden_t
    grad phi(k_s) = dKV v_s + dksum       grad v_s = dKV^T phi(k_s)
    grad x = grad phi(x) * (1 if x > 0 else exp(x))

``sed_fast::class_attention_backward(grad, q, k, v, class_offsets, num_heads, eps)`` returns
(grad q, grad k, grad v), contiguous (total_T, P, C). Backends: ``"torch"``, autograd of
:func:`~sed_fast.kernels.class_attention.class_attention_reference` recomputed from the inputs;
``"triton"``. The forward saves only q, k, v and the offsets.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import dispatch
from ._autograd import reference_vjp, zeros_where_missing
from .class_attention import _class_attention_op, class_attention_reference

OP_NAME = "class_attention_backward"


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch reference: autograd of the reference forward
# ---------------------------------------------------------------------------------------------------
def class_attention_backward_reference(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       class_offsets: torch.Tensor, num_heads: int = 4,
                                       eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad q, grad k, grad v) by autograd of :func:`class_attention_reference`, in the input dtype."""
    inputs, needs = (q, k, v), (True, True, True)

    def forward(q_, k_, v_):
        return class_attention_reference(q_, k_, v_, class_offsets, num_heads, eps)

    grads = reference_vjp(forward, grad.to(q.dtype), inputs, needs)
    return tuple(g.contiguous() for g in zeros_where_missing(grads, inputs, needs))


# ---------------------------------------------------------------------------------------------------
# The backward op and the forward's autograd formula
# ---------------------------------------------------------------------------------------------------
def _grads_like(q):
    return tuple(q.new_empty(q.shape) for _ in range(3))  # contiguous


@torch.library.custom_op("sed_fast::class_attention_backward", mutates_args=())
def _class_attention_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 class_offsets: torch.Tensor, num_heads: int,
                                 eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.numel() == 0:
        return tuple(g.zero_() for g in _grads_like(q))
    args = (grad, q, k, v, class_offsets, num_heads, eps)
    return tuple(dispatch.resolve(OP_NAME, q.device, args=args)(*args))


@_class_attention_backward_op.register_fake
def _(grad, q, k, v, class_offsets, num_heads, eps):
    return _grads_like(q)


dispatch.register_impl(OP_NAME, "torch", class_attention_backward_reference)


def _setup_context(ctx, inputs, output):
    q, k, v, class_offsets, num_heads, eps = inputs
    ctx.save_for_backward(q, k, v, class_offsets)
    ctx.num_heads, ctx.eps = num_heads, eps


def _backward(ctx, grad):
    grads = _class_attention_backward_op(grad, *ctx.saved_tensors, ctx.num_heads, ctx.eps)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None, None, None)


_class_attention_op.register_autograd(_backward, setup_context=_setup_context)
