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

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import dispatch
from ._autograd import in_layout_of, reference_vjp, zeros_where_missing
from ._layout import pixel_strides
from .cost_map import NORM_EPS, _cost_map_op, cost_map_reference

OP_NAME = "cost_map_backward"


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
# The Triton backward: two tiled matmuls with fp32 accumulation into fp32 workspaces G_a (B, h*w, D)
# and G_u (T*P, D) (the size of the inputs, not of the (B*T, P, h, w) map), the unit vectors made on
# the fly from precomputed fp32 inverse norms; then one pass per side through normalize's backward.
@triton.jit(do_not_specialize=["num_classes"])
def _grad_image_kernel(
    grad_ptr, text_ptr, inv_text_ptr, out_ptr,
    num_pixels, num_classes, num_prompts, dim,
    stride_g_row, stride_g_p, stride_g_pix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """G_a[b, pix, d] = sum_{t,p} g[b*T + t, p, pix] * text[t, p, d] / |text[t, p]|."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    image = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # pixels
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # feature channels
    mask_m = offs_m < num_pixels
    mask_n = offs_n < dim
    rows = num_classes * num_prompts
    grad_image = grad_ptr + image.to(tl.int64) * num_classes * stride_g_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rows, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # text rows t*P + p
        mask_k = offs_k < rows
        cls = offs_k // num_prompts
        prompt = offs_k - cls * num_prompts
        g = tl.load(grad_image + (cls.to(tl.int64) * stride_g_row + prompt * stride_g_p)[None, :]
                    + offs_m[:, None].to(tl.int64) * stride_g_pix,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (M, K)
        u = tl.load(text_ptr + offs_k[:, None].to(tl.int64) * dim + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (K, N)
        inv = tl.load(inv_text_ptr + offs_k, mask=mask_k, other=0.0)
        unit = u.to(tl.float32) * inv[:, None]
        if UPCAST_DOT:  # the interpreter multiplies bfloat16 tiles as raw uint16 bits
            acc = tl.dot(g.to(tl.float32), unit.to(u.dtype).to(tl.float32), acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(g, unit.to(u.dtype), acc, input_precision=INPUT_PRECISION)
    out = out_ptr + (image.to(tl.int64) * num_pixels + offs_m[:, None]) * dim + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["num_classes"])
def _grad_text_kernel(
    grad_ptr, img_ptr, inv_img_ptr, out_ptr,
    batch, num_pixels, num_classes, num_prompts, dim,
    stride_g_row, stride_g_p, stride_g_pix,
    stride_img_b, stride_img_d, stride_img_pix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """G_u[t*P + p, d] = sum_{b,pix} g[b*T + t, p, pix] * img[b, d, pix] / |img[b, :, pix]|."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # text rows t*P + p
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # feature channels
    mask_m = offs_m < num_classes * num_prompts
    mask_n = offs_n < dim
    cls = offs_m // num_prompts
    prompt = offs_m - cls * num_prompts
    row_offsets = cls.to(tl.int64) * stride_g_row + prompt * stride_g_p
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for image in range(0, batch):
        image64 = tl.full((), 0, tl.int64) + image  # a Python int under the interpreter
        grad_image = grad_ptr + image64 * num_classes * stride_g_row
        img_image = img_ptr + image64 * stride_img_b
        for k0 in range(0, num_pixels, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # pixels
            mask_k = offs_k < num_pixels
            g = tl.load(grad_image + row_offsets[:, None] + offs_k[None, :].to(tl.int64) * stride_g_pix,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (M, K)
            a = tl.load(img_image + offs_k[:, None] * stride_img_pix + offs_n[None, :] * stride_img_d,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (K, N)
            inv = tl.load(inv_img_ptr + image * num_pixels + offs_k, mask=mask_k, other=0.0)
            unit = a.to(tl.float32) * inv[:, None]
            if UPCAST_DOT:
                acc = tl.dot(g.to(tl.float32), unit.to(a.dtype).to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(g, unit.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    out = out_ptr + offs_m[:, None].to(tl.int64) * dim + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _normalize_backward_kernel(
    x_ptr, g_ptr, out_ptr,
    num_vectors, inner, dim, eps,
    stride_outer, stride_inner, stride_d, stride_out_outer, stride_out_inner, stride_out_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Vector r = (r // inner, r % inner) of x (strided, length dim) with its fp32 upstream gradient
    G[r, :] (contiguous): grad x = G / |x| - x (G . x) / |x|^3, or G / eps where |x| <= eps."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < num_vectors
    outer_index = offs_r // inner
    inner_index = (offs_r - outer_index * inner).to(tl.int64)
    base = outer_index.to(tl.int64) * stride_outer + inner_index * stride_inner
    out_base = outer_index.to(tl.int64) * stride_out_outer + inner_index * stride_out_inner
    g_base = offs_r.to(tl.int64) * dim
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < dim)[None, :]
        x = tl.load(x_ptr + base[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_base[:, None] + offs_d[None, :], mask=mask, other=0.0)
        sq += tl.sum(x * x, axis=1)
        dot += tl.sum(x * g, axis=1)
    norm = tl.sqrt(sq)
    inv = 1.0 / tl.maximum(norm, eps)
    coef = tl.where(norm > eps, dot * inv * inv * inv, 0.0)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < dim)[None, :]
        x = tl.load(x_ptr + base[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_base[:, None] + offs_d[None, :], mask=mask, other=0.0)
        result = g * inv[:, None] - x * coef[:, None]
        tl.store(out_ptr + out_base[:, None] + offs_d[None, :] * stride_out_d, result.to(out_ptr.dtype.element_ty),
                 mask=mask)


def _input_precision(dtype: torch.dtype) -> str:
    # Follow PyTorch's own matmul setting for float32 inputs (TF32 only when it is allowed).
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _normalize_backward(x: torch.Tensor, grad_unit: torch.Tensor, out: torch.Tensor, outer: int, inner: int,
                        strides: Tuple[int, int, int], out_strides: Tuple[int, int, int]) -> None:
    """out = normalize's backward of the vectors of x, given their fp32 gradients; ``strides`` and
    ``out_strides``: (outer, inner, feature) strides of x and out."""
    dim = grad_unit.shape[-1]
    block_d = max(16, min(128, triton.next_power_of_2(dim)))
    block_r = max(1, 2048 // block_d)
    _normalize_backward_kernel[(triton.cdiv(outer * inner, block_r),)](
        x, grad_unit, out, outer * inner, inner, dim, NORM_EPS, *strides, *out_strides,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4, **dispatch.TRITON_LAUNCH_OPTIONS)


def cost_map_backward_triton(grad: torch.Tensor, img_feats: torch.Tensor, text: torch.Tensor,
                             channels_last: bool = True, need_img: bool = True, need_text: bool = True,
                             out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher (same signature as the op; ``out`` lets tests pass NaN-poisoned buffers)."""
    batch, dim, height, width = img_feats.shape
    classes, prompts, _ = text.shape
    num_pixels = height * width
    grad_img, grad_text = out if out is not None else _grads_like(img_feats, text, need_img, need_text)
    grad = grad.to(img_feats.dtype)
    g_strides = pixel_strides(grad)
    if g_strides is None:
        grad = grad.contiguous()
        g_strides = pixel_strides(grad)
    img_strides = pixel_strides(img_feats)
    if img_strides is None:
        img_feats = img_feats.contiguous()
        img_strides = pixel_strides(img_feats)
    text = text.contiguous()
    precision = _input_precision(img_feats.dtype)
    # The unit-vector tiles made in registers cost smaller float32 tiles than the forward's, and 8
    # warps (sm_90, sed-fast compile-report: the forward's 64 x 128 x 64 spilled 1.4-1.8 KB per
    # thread in float32, 64 x 64 x 32 on 4 warps 0.5 KB; on 8 warps none).
    max_k, max_n = (32, 64) if img_feats.dtype == torch.float32 else (64, 128)
    warps = 8
    upcast = dispatch.triton_interpreter_mode() and img_feats.dtype == torch.bfloat16
    with torch.cuda.device(img_feats.device) if img_feats.is_cuda else contextlib.nullcontext():
        if need_img:
            inv_text = 1.0 / torch.linalg.vector_norm(text, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS)
            unit_grad = torch.empty((batch, num_pixels, dim), dtype=torch.float32, device=img_feats.device)
            block_m = max(16, min(64, triton.next_power_of_2(num_pixels)))
            block_n = max(16, min(max_n, triton.next_power_of_2(dim)))
            block_k = max(16, min(max_k, triton.next_power_of_2(classes * prompts)))
            grid = (triton.cdiv(num_pixels, block_m), triton.cdiv(dim, block_n), batch)
            _grad_image_kernel[grid](
                grad, text, inv_text, unit_grad, num_pixels, classes, prompts, dim, *g_strides,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=precision, UPCAST_DOT=upcast,
                num_warps=warps, num_stages=3, **dispatch.TRITON_LAUNCH_OPTIONS)
            target = grad_img if pixel_strides(grad_img) is not None else \
                torch.empty(grad_img.shape, dtype=grad_img.dtype, device=grad_img.device)
            out_strides = pixel_strides(target)
            # Vectors over D at (b, pix): outer b, inner pix.
            _normalize_backward(img_feats, unit_grad, target, batch, num_pixels,
                                (img_strides[0], img_strides[2], img_strides[1]),
                                (out_strides[0], out_strides[2], out_strides[1]))
            if target is not grad_img:
                grad_img.copy_(target)
        if need_text:
            inv_img = 1.0 / torch.linalg.vector_norm(img_feats, dim=1, dtype=torch.float32).clamp_min(NORM_EPS)
            inv_img = inv_img.reshape(batch, num_pixels).contiguous()
            unit_grad = torch.empty((classes * prompts, dim), dtype=torch.float32, device=img_feats.device)
            block_m = max(16, min(64, triton.next_power_of_2(classes * prompts)))
            block_n = max(16, min(max_n, triton.next_power_of_2(dim)))
            block_k = max(16, min(max_k, triton.next_power_of_2(num_pixels)))
            grid = (triton.cdiv(classes * prompts, block_m), triton.cdiv(dim, block_n))
            _grad_text_kernel[grid](
                grad, img_feats, inv_img, unit_grad, batch, num_pixels, classes, prompts, dim, *g_strides,
                *img_strides,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=precision, UPCAST_DOT=upcast,
                num_warps=warps, num_stages=3, **dispatch.TRITON_LAUNCH_OPTIONS)
            if not grad_text.is_contiguous():
                raise ValueError("the text gradient must be contiguous")
            _normalize_backward(text, unit_grad, grad_text, 1, classes * prompts, (0, dim, 1), (0, dim, 1))
    return grad_img, grad_text


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
dispatch.register_impl(OP_NAME, "triton", cost_map_backward_triton)


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
