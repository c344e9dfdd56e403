"""Backward of the cosine cost map (``sed_fast::cost_map``): gradients of the image and text features.

With a = img_feats[b, :, pix], u = text[t, p, :], their unit vectors a' = a / max(|a|, eps) and
u' = u / max(|u|, eps), and g = grad_out[b*T + t, p, pix]:

    G_a[b, pix] = sum_{t,p} g * u'        G_u[t, p] = sum_{b,pix} g * a'          (two matmuls)
    grad a = (G_a - a' (G_a . a')) / |a|  (|a| > eps),  G_a / eps otherwise      (normalize's backward)

``sed_fast::cost_map_backward(grad, img_feats, text, channels_last, need_img, need_text)`` returns
(grad img_feats, grad text); a gradient not asked for comes back as an empty (0,) tensor (the
frozen text of training needs none). Backends: ``"torch"``, autograd of
:func:`~sed_fast.kernels.cost_map.cost_map_reference` recomputed from the inputs; ``"triton"``.
The forward saves only its two inputs.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import dispatch
from ._autograd import in_layout_of, reference_vjp, zeros_where_missing
from .cost_map import _cost_map_op, cost_map_reference

OP_NAME = "cost_map_backward"


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch reference: autograd of the reference forward
# ---------------------------------------------------------------------------------------------------
def cost_map_backward_reference(grad: torch.Tensor, img_feats: torch.Tensor, text: torch.Tensor,
                                channels_last: bool = True, need_img: bool = True,
                                need_text: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad img_feats, grad text) by autograd of :func:`cost_map_reference`, in the input dtype."""
    inputs, needs = (img_feats, text), (need_img, need_text)
    grads = reference_vjp(cost_map_reference, grad.to(img_feats.dtype), inputs, needs, channels_last)
    grads = zeros_where_missing(grads, inputs, needs)
    return tuple(in_layout_of(g, t) if need else g for g, t, need in zip(grads, inputs, needs))


# ---------------------------------------------------------------------------------------------------
# The backward op and the forward's autograd formula
# ---------------------------------------------------------------------------------------------------
def _grads_like(img_feats, text, need_img, need_text):
    return (torch.empty_like(img_feats) if need_img else img_feats.new_empty(0),
            torch.empty_like(text) if need_text else text.new_empty(0))


@torch.library.custom_op("sed_fast::cost_map_backward", mutates_args=())
def _cost_map_backward_op(grad: torch.Tensor, img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool,
                          need_img: bool, need_text: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if grad.numel() == 0 or img_feats.numel() == 0:  # nothing reaches the inputs
        grad_img, grad_text = _grads_like(img_feats, text, need_img, need_text)
        return grad_img.zero_(), grad_text.zero_()
    args = (grad, img_feats, text, channels_last, need_img, need_text)
    return tuple(dispatch.resolve(OP_NAME, img_feats.device, args=args)(*args))


@_cost_map_backward_op.register_fake
def _(grad, img_feats, text, channels_last, need_img, need_text):
    return _grads_like(img_feats, text, need_img, need_text)


dispatch.register_impl(OP_NAME, "torch", cost_map_backward_reference)


def _setup_context(ctx, inputs, output):
    img_feats, text, channels_last = inputs
    ctx.save_for_backward(img_feats, text)
    ctx.channels_last = channels_last


def _backward(ctx, grad):
    img_feats, text = ctx.saved_tensors
    need_img, need_text = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_img, grad_text = _cost_map_backward_op(grad, img_feats, text, ctx.channels_last, need_img, need_text)
    return (grad_img if need_img else None), (grad_text if need_text else None), None


_cost_map_op.register_autograd(_backward, setup_context=_setup_context)
