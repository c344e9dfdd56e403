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

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import dispatch
from ._autograd import reference_vjp, zeros_where_missing
from .class_attention import _channel_contiguous, _class_attention_op, class_attention_reference

OP_NAME = "class_attention_backward"


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_pixels", "stride_qt", "stride_kt", "stride_vt", "stride_gt"])
def _class_attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, grad_ptr, offsets_ptr, dq_ptr, dk_ptr, dv_ptr,
    num_pixels, eps,
    stride_qt, stride_qp, stride_kt, stride_kp, stride_vt, stride_vp, stride_gt, stride_gp, stride_ot, stride_op,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (pixel blocks, heads, images), the forward's. Three passes over the image's classes:
    KV and ksum (the forward's first pass, recomputed); per class the q gradient, accumulating
    dKV and dksum; per class the k and v gradients. All state in fp32, in the forward's (pixel, i, j)
    layout: k, q and their gradients as (P, d, 1), v, the upstream gradient and dv as (P, 1, d)."""
    pid_p = tl.program_id(0)
    head = tl.program_id(1)
    image = tl.program_id(2)
    first = tl.load(offsets_ptr + image).to(tl.int64)
    length = tl.load(offsets_ptr + image + 1) - tl.load(offsets_ptr + image)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    pix = offs_p[:, None, None]
    col_i = head * HEAD_DIM + offs_d[None, :, None]   # (1, d, 1)
    col_j = head * HEAD_DIM + offs_d[None, None, :]   # (1, 1, d)
    pix_ok = pix < num_pixels
    mask_i = pix_ok & (offs_d[None, :, None] < HEAD_DIM)
    mask_j = pix_ok & (offs_d[None, None, :] < HEAD_DIM)

    # Pass 1: KV and ksum.
    kv = tl.zeros((BLOCK_P, BLOCK_D, BLOCK_D), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_P, BLOCK_D, 1), dtype=tl.float32)
    for step in range(0, length):
        row64 = first + step
        k = tl.load(k_ptr + row64 * stride_kt + pix * stride_kp + col_i, mask=mask_i, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row64 * stride_vt + pix * stride_vp + col_j, mask=mask_j, other=0.0).to(tl.float32)
        k = tl.where(mask_i, tl.where(k > 0, k + 1.0, tl.exp(k)), 0.0)
        ksum += k
        kv += k * v

    # Pass 2: grad q_t; dKV = sum_t phi(q_t) (x) dnum_t, dksum = sum_t phi(q_t) dden_t.
    dkv = tl.zeros((BLOCK_P, BLOCK_D, BLOCK_D), dtype=tl.float32)
    dksum = tl.zeros((BLOCK_P, BLOCK_D, 1), dtype=tl.float32)
    for step in range(0, length):
        row64 = first + step
        q = tl.load(q_ptr + row64 * stride_qt + pix * stride_qp + col_i, mask=mask_i, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + row64 * stride_gt + pix * stride_gp + col_j, mask=mask_j, other=0.0).to(tl.float32)
        positive = q > 0
        exp_q = tl.exp(tl.where(positive, 0.0, q))
        phi = tl.where(mask_i, tl.where(positive, q + 1.0, exp_q), 0.0)
        den = tl.sum(phi * ksum, axis=1, keep_dims=True) + eps           # (P, 1, 1)
        out = tl.sum(phi * kv, axis=1, keep_dims=True) / den              # (P, 1, d)
        dnum = g / den                                                    # (P, 1, d)
        dden = -tl.sum(g * out, axis=2, keep_dims=True) / den             # (P, 1, 1)
        dphi = tl.sum(kv * dnum, axis=2, keep_dims=True) + ksum * dden    # (P, d, 1)
        dq = dphi * tl.where(positive, 1.0, exp_q)
        tl.store(dq_ptr + row64 * stride_ot + pix * stride_op + col_i, dq.to(dq_ptr.dtype.element_ty), mask=mask_i)
        dkv += phi * dnum
        dksum += phi * dden

    # Pass 3: grad k_s = (dKV v_s + dksum) phi'(k_s), grad v_s = dKV^T phi(k_s).
    for step in range(0, length):
        row64 = first + step
        k = tl.load(k_ptr + row64 * stride_kt + pix * stride_kp + col_i, mask=mask_i, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row64 * stride_vt + pix * stride_vp + col_j, mask=mask_j, other=0.0).to(tl.float32)
        positive = k > 0
        exp_k = tl.exp(tl.where(positive, 0.0, k))
        phi = tl.where(mask_i, tl.where(positive, k + 1.0, exp_k), 0.0)
        dphi = tl.sum(dkv * v, axis=2, keep_dims=True) + dksum            # (P, d, 1)
        dk = dphi * tl.where(positive, 1.0, exp_k)
        dv = tl.sum(dkv * phi, axis=1, keep_dims=True)                    # (P, 1, d)
        tl.store(dk_ptr + row64 * stride_ot + pix * stride_op + col_i, dk.to(dk_ptr.dtype.element_ty), mask=mask_i)
        tl.store(dv_ptr + row64 * stride_ot + pix * stride_op + col_j, dv.to(dv_ptr.dtype.element_ty), mask=mask_j)


def _pick_blocks(num_pixels: int, head_dim: int):
    """Half the forward's pixels per program: KV and dKV are both live in the second pass."""
    block_d = triton.next_power_of_2(head_dim)
    block_p = max(1, 4096 // (block_d * block_d))
    return min(block_p, triton.next_power_of_2(num_pixels)), block_d


def class_attention_backward_triton(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    class_offsets: torch.Tensor, num_heads: int = 4, eps: float = 1e-6,
                                    out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher (same signature as the op; ``out`` lets tests pass NaN-poisoned buffers)."""
    total, pixels, channels = q.shape
    q, k, v = _channel_contiguous(q), _channel_contiguous(k), _channel_contiguous(v)
    grad = _channel_contiguous(grad.to(q.dtype))
    offsets = class_offsets if class_offsets.dtype == torch.int32 else class_offsets.to(torch.int32)
    dq, dk, dv = out if out is not None else _grads_like(q)
    if any(t.stride() != dq.stride() or t.stride(-1) != 1 for t in (dk, dv)):
        raise ValueError("the three gradients must share channel-contiguous strides")
    num_images = offsets.shape[0] - 1
    if total == 0 or num_images == 0:
        return dq, dk, dv
    head_dim = channels // num_heads
    block_p, block_d = _pick_blocks(pixels, head_dim)
    grid = (triton.cdiv(pixels, block_p), num_heads, num_images)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _class_attention_backward_kernel[grid](
            q, k, v, grad, offsets, dq, dk, dv,
            pixels, float(eps),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            grad.stride(0), grad.stride(1), dq.stride(0), dq.stride(1),
            HEAD_DIM=head_dim, BLOCK_P=block_p, BLOCK_D=block_d,
            num_warps=8,  # the forward's reason: latency-bound class loops want resident warps
            **dispatch.TRITON_LAUNCH_OPTIONS,
        )
    return dq, dk, dv


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
dispatch.register_impl(OP_NAME, "triton", class_attention_backward_triton)


def _setup_context(ctx, inputs, output):
    q, k, v, class_offsets, num_heads, eps = inputs
    ctx.save_for_backward(q, k, v, class_offsets)
    ctx.num_heads, ctx.eps = num_heads, eps


def _backward(ctx, grad):
    grads = _class_attention_backward_op(grad, *ctx.saved_tensors, ctx.num_heads, ctx.eps)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None, None, None)


_class_attention_op.register_autograd(_backward, setup_context=_setup_context)
