"""Cosine cost map between image features and prompt-templated text features.

``cost_map(img_feats, text, channels_last=True)``: img_feats (B, D, h, w), text (T, P, D) shared by
the batch -> (B*T, P, h, w) with

    out[b*T + t, p, y, x] = dot(normalize(img_feats[b, :, y, x]), normalize(text[t, p, :]))

(``F.normalize`` semantics: x / max(||x||, 1e-12)). This is the official SED
``einsum('bchw,btpc->bpthw')`` of the L2-normalised features rearranged 'B P T H W -> (B T) P H W',
what the decoder's conv1 reads. With ``channels_last=True`` the result is in channels-last memory
order (B*T, h, w, P), so conv1 (cuDNN, channels-last) reads it without a permute pass.

The Triton kernel is one tiled matmul per image: pixels (M) x flattened class-prompt rows T*P (N)
over D (K), fp32 accumulation. Both L2 norms are accumulated from the same tiles the matmul loads
(no extra pass over memory) and applied to the fp32 accumulator before the single store, which goes
straight into the requested layout. The class count T only changes the grid: no recompilation.

Layouts: img_feats may be contiguous NCHW or channels-last (any strides where h and w flatten
into one pixel axis); other layouts, and a non-contiguous ``text``, are copied first.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from .costs import Cost, matmul_flops, nbytes, register_op_cost
from ._layout import pixel_strides
from ._examples import normal
from ._autograd import in_layout_of, none_where_not_needed, reference_vjp, save_inputs, zeros_where_missing

OP_NAME = "cost_map"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NORM_EPS = 1e-12  # F.normalize's default


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _block(axis: tl.constexpr, BLOCK: tl.constexpr, size):
    """This program's block along grid axis ``axis``: its offsets and their mask (< size)."""
    offs = tl.program_id(axis) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < size


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b, in fp32 with UPCAST_DOT (the interpreter multiplies bfloat16 tiles as raw uint16 bits)."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    else:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["num_classes"])
def _cost_map_kernel(
    img_ptr, text_ptr, out_ptr,
    num_pixels, num_classes, num_prompts, dim,
    stride_img_b, stride_img_d, stride_img_pix,
    stride_out_row, stride_out_p, stride_out_pix,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # Grid: (pixel blocks, class-prompt row blocks, images); pixel blocks vary fastest so that the
    # programs sharing one text tile run together and hit it in L2.
    offs_m, mask_m = _block(0, BLOCK_M, num_pixels)  # pixels y*w + x
    offs_n, mask_n = _block(1, BLOCK_N, num_classes * num_prompts)  # text rows t*P + p
    image = tl.program_id(2)

    img_base = img_ptr + image.to(tl.int64) * stride_img_b
    text_rows = text_ptr + offs_n.to(tl.int64) * dim

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    img_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    text_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < dim
        a = tl.load(img_base + offs_m[:, None] * stride_img_pix + offs_k[None, :] * stride_img_d,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (M, K)
        b = tl.load(text_rows[None, :] + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (K, N)
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        img_sq += tl.sum(a32 * a32, axis=1)
        text_sq += tl.sum(b32 * b32, axis=0)
        acc = _dot(a, b, acc, INPUT_PRECISION, UPCAST_DOT)

    inv_img = 1.0 / tl.maximum(tl.sqrt(img_sq), 1e-12)
    inv_text = 1.0 / tl.maximum(tl.sqrt(text_sq), 1e-12)
    cosine = acc * inv_img[:, None] * inv_text[None, :]

    # Row n = t*P + p of image b goes to output row b*T + t, channel p.
    cls = offs_n // num_prompts
    prompt = offs_n - cls * num_prompts
    out_row = image.to(tl.int64) * num_classes + cls.to(tl.int64)
    out_offs = (out_row[None, :] * stride_out_row + prompt[None, :] * stride_out_p
                + offs_m[:, None].to(tl.int64) * stride_out_pix)
    tl.store(out_ptr + out_offs, cosine.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _pick_blocks(num_pixels: int, num_rows: int, dim: int):
    """Tile sizes: powers of two >= 16 (tl.dot), as large as the problem allows."""
    block_m = max(16, min(64, triton.next_power_of_2(num_pixels)))
    block_n = max(16, min(128, triton.next_power_of_2(num_rows)))
    block_k = max(16, min(64, triton.next_power_of_2(dim)))
    return block_m, block_n, block_k


def _output_like(img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool) -> torch.Tensor:
    batch, _, height, width = img_feats.shape
    classes, prompts, _ = text.shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((batch * classes, prompts, height, width), dtype=img_feats.dtype,
                       device=img_feats.device, memory_format=memory_format)


def cost_map_triton(img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool = True,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton launcher (same signature as the op; ``out`` lets tests pass a NaN-poisoned buffer)."""
    batch, dim, height, width = img_feats.shape
    classes, prompts, _ = text.shape
    strides = pixel_strides(img_feats)
    if strides is None:
        img_feats = img_feats.contiguous()
        strides = pixel_strides(img_feats)
    text = text.contiguous()
    if out is None:
        out = _output_like(img_feats, text, channels_last)
    num_pixels = height * width
    # (B*T, P, h, w): the row stride, the prompt stride, the pixel stride (h and w flatten).
    stride_row, stride_p, _, stride_pix = out.stride()
    if height > 1 and out.stride(2) != width * stride_pix:
        raise ValueError("out must be contiguous or channels_last")

    block_m, block_n, block_k = _pick_blocks(num_pixels, classes * prompts, dim)
    fp32_input = img_feats.dtype == torch.float32
    # Follow PyTorch's own matmul setting for float32 inputs (TF32 only when it is allowed).
    input_precision = "tf32" if fp32_input and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if not fp32_input:
        input_precision = "tf32"  # ignored for 16-bit inputs
    grid = (triton.cdiv(num_pixels, block_m), triton.cdiv(classes * prompts, block_n), batch)
    with torch.cuda.device(img_feats.device) if img_feats.is_cuda else contextlib.nullcontext():
        _cost_map_kernel[grid](
            img_feats, text, out,
            num_pixels, classes, prompts, dim,
            strides[0], strides[1], strides[2],
            stride_row, stride_p, stride_pix,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            INPUT_PRECISION=input_precision,
            UPCAST_DOT=dispatch.triton_interpreter_mode() and img_feats.dtype == torch.bfloat16,
            num_warps=4 if block_m * block_n <= 4096 else 8, num_stages=3,
            **dispatch.TRITON_LAUNCH_OPTIONS,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch reference
# ---------------------------------------------------------------------------------------------------
def cost_map_reference(img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """The official computation, in the input dtype: normalise both sides, then the cosine einsum.

    img_feats (B, D, h, w), text (T, P, D) -> (B*T, P, h, w), channels-last memory if asked. The
    classes go in chunks of at most :data:`REFERENCE_TEXT_CHUNK_BYTES` of text, written straight
    into the output, so the memory beyond the output is bounded whatever T (the normalised text
    of 5000 classes alone is 1 GB in float32).
    """
    batch, _, height, width = img_feats.shape
    classes, prompts, dim = text.shape
    img = F.normalize(img_feats, dim=1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((batch * classes, prompts, height, width), dtype=img_feats.dtype, device=img_feats.device,
                      memory_format=memory_format)
    per_class = out.view(batch, classes, prompts, height, width) if not channels_last else None
    step = max(1, REFERENCE_TEXT_CHUNK_BYTES // max(1, prompts * dim * text.element_size()))
    for first in range(0, classes, step):
        txt = F.normalize(text[first:first + step], dim=-1)
        corr = torch.einsum("bchw,tpc->btphw", img, txt)  # (B, t, P, h, w)
        if per_class is not None:
            per_class[:, first:first + step] = corr
        else:  # channels-last rows: write each image's block of rows
            for b in range(batch):
                out[b * classes + first:b * classes + first + corr.shape[1]] = corr[b]
    return out


#: Text bytes the reference cost map normalises at a time (see :func:`cost_map_reference`).
REFERENCE_TEXT_CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("sed_fast::cost_map", mutates_args=())
def _cost_map_op(img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    if img_feats.shape[0] * img_feats.shape[2] * img_feats.shape[3] * text.shape[1] == 0:
        return _output_like(img_feats, text, channels_last)  # B = 0, h*w = 0 or P = 0: nothing to do
    args = (img_feats, text, channels_last)
    return dispatch.resolve(OP_NAME, img_feats.device, args=args)(*args)


@_cost_map_op.register_fake
def _(img_feats, text, channels_last=True):
    return _output_like(img_feats, text, channels_last)


dispatch.register_impl(OP_NAME, "torch", cost_map_reference)
dispatch.register_impl(OP_NAME, "triton", cost_map_triton)


def _check_inputs(img_feats: torch.Tensor, text: torch.Tensor) -> None:
    if not isinstance(img_feats, torch.Tensor) or not isinstance(text, torch.Tensor):
        raise TypeError("cost_map expects tensors img_feats and text")
    if img_feats.dim() != 4:
        raise ValueError(f"img_feats must be (B, D, h, w), got shape {tuple(img_feats.shape)}")
    if text.dim() != 3:
        raise ValueError(f"text must be (T, P, D), got shape {tuple(text.shape)}")
    if img_feats.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"cost_map supports float32, bfloat16, float16; got {img_feats.dtype}")
    if text.dtype != img_feats.dtype:
        raise TypeError(f"img_feats and text must have the same dtype, got {img_feats.dtype} and {text.dtype}")
    if text.device != img_feats.device:
        raise ValueError(f"img_feats and text must be on the same device, got {img_feats.device} and {text.device}")
    if text.shape[2] != img_feats.shape[1]:
        raise ValueError(f"feature dims differ: img_feats has D={img_feats.shape[1]}, text has D={text.shape[2]}")
    if text.shape[0] == 0:
        raise ValueError("text has T = 0 classes")
    if text.shape[2] == 0:
        raise ValueError("feature dim D = 0: the cosine is undefined")


def cost_map(img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """Cosine similarity of every pixel feature with every (class, prompt) text feature.

    Args:
        img_feats: (B, D, h, w) image features, float32 / bfloat16 / float16.
        text: (T, P, D) text features shared by the batch, same dtype and device.
        channels_last: return channels-last memory (what conv1 reads) instead of contiguous.

    Returns:
        (B*T, P, h, w) in the input dtype, row b*T + t for class t of image b.
    """
    _check_inputs(img_feats, text)
    return _cost_map_op(img_feats, text, channels_last)


# ===================================================================================================
# The backward op
# ===================================================================================================
# Backward of the cosine cost map (``sed_fast::cost_map``): gradients of the image and text features.
#
# With a = img_feats[b, :, pix], u = text[t, p, :], their unit vectors a' = a / max(|a|, eps) and
# u' = u / max(|u|, eps), and g = grad_out[b*T + t, p, pix]:
#
#     G_a[b, pix] = sum_{t,p} g * u'        G_u[t, p] = sum_{b,pix} g * a'          (two matmuls)
#     grad a = (G_a - a' (G_a . a')) / |a|  (|a| > eps),  G_a / eps otherwise      (normalize's backward)
#
# ``sed_fast::cost_map_backward(grad, img_feats, text, channels_last, need_img, need_text)`` returns
# (grad img_feats, grad text); a gradient not asked for comes back as an empty (0,) tensor (the
# frozen text of training needs none). Backends: ``"torch"``, autograd of
# :func:`~sed_fast.kernels.cost_map.cost_map_reference` recomputed from the inputs; ``"triton"``.
# The forward saves only its two inputs.

BACKWARD_OP_NAME = "cost_map_backward"


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
    offs_m, mask_m = _block(0, BLOCK_M, num_pixels)  # pixels
    offs_n, mask_n = _block(1, BLOCK_N, dim)  # feature channels
    image = tl.program_id(2)
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
        acc = _dot(g, unit.to(u.dtype), acc, INPUT_PRECISION, UPCAST_DOT)
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
    offs_m, mask_m = _block(0, BLOCK_M, num_classes * num_prompts)  # text rows t*P + p
    offs_n, mask_n = _block(1, BLOCK_N, dim)  # feature channels
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
            acc = _dot(g, unit.to(a.dtype), acc, INPUT_PRECISION, UPCAST_DOT)
    out = out_ptr + offs_m[:, None].to(tl.int64) * dim + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _vector_chunk(x_ptr, g_ptr, base, g_base, mask_r, d0, dim, stride_d, BLOCK_D: tl.constexpr):
    """Features d0 .. d0 + BLOCK_D of the block's vectors: (their offsets, mask, x in fp32, G)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d < dim)[None, :]
    x = tl.load(x_ptr + base[:, None] + offs_d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + g_base[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return offs_d, mask, x, g


@triton.jit
def _normalize_backward_kernel(
    x_ptr, g_ptr, out_ptr,
    num_vectors, inner, dim, eps,
    stride_outer, stride_inner, stride_d, stride_out_outer, stride_out_inner, stride_out_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Vector r = (r // inner, r % inner) of x (strided, length dim) with its fp32 upstream gradient
    G[r, :] (contiguous): grad x = G / |x| - x (G . x) / |x|^3, or G / eps where |x| <= eps."""
    offs_r, mask_r = _block(0, BLOCK_R, num_vectors)
    outer_index = offs_r // inner
    inner_index = (offs_r - outer_index * inner).to(tl.int64)
    base = outer_index.to(tl.int64) * stride_outer + inner_index * stride_inner
    out_base = outer_index.to(tl.int64) * stride_out_outer + inner_index * stride_out_inner
    g_base = offs_r.to(tl.int64) * dim
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d, mask, x, g = _vector_chunk(x_ptr, g_ptr, base, g_base, mask_r, d0, dim, stride_d, BLOCK_D)
        sq += tl.sum(x * x, axis=1)
        dot += tl.sum(x * g, axis=1)
    norm = tl.sqrt(sq)
    inv = 1.0 / tl.maximum(norm, eps)
    coef = tl.where(norm > eps, dot * inv * inv * inv, 0.0)
    for d0 in range(0, dim, BLOCK_D):
        offs_d, mask, x, g = _vector_chunk(x_ptr, g_ptr, base, g_base, mask_r, d0, dim, stride_d, BLOCK_D)
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
    return tuple(dispatch.resolve(BACKWARD_OP_NAME, img_feats.device, args=args)(*args))


@_cost_map_backward_op.register_fake
def _(grad, img_feats, text, channels_last, need_img, need_text):
    return _grads_like(img_feats, text, need_img, need_text)


dispatch.register_impl(BACKWARD_OP_NAME, "torch", cost_map_backward_reference)
dispatch.register_impl(BACKWARD_OP_NAME, "triton", cost_map_backward_triton)


def _backward(ctx, grad):
    need_img, need_text = ctx.needs_input_grad[:2]
    grads = _cost_map_backward_op(grad, *ctx.saved_tensors, *ctx.constants, need_img, need_text)
    return (*none_where_not_needed(grads, (need_img, need_text)), None)


_cost_map_op.register_autograd(_backward, setup_context=save_inputs)


# ---------------------------------------------------------------------------------------------------
# Cost model (FLOPs as torch.utils.flop_counter counts the reference; least bytes moved)
# ---------------------------------------------------------------------------------------------------
def flops(batch: int, dim: int, height: int, width: int, classes: int, prompts: int) -> int:
    """The cosine matmul: 2 * B*h*w * T*P * D (the norms are elementwise: not counted)."""
    return matmul_flops(batch * height * width, dim, classes * prompts)


def bytes_moved(batch: int, dim: int, height: int, width: int, classes: int, prompts: int,
                element_size: int = 2) -> int:
    """Read img_feats and text once, write the map once: element_size * (B*D*h*w + T*P*D + B*T*P*h*w)."""
    return element_size * (batch * dim * height * width + classes * prompts * dim
                           + batch * classes * prompts * height * width)


def cost(img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool = True) -> Cost:
    """sed_fast::cost_map: see :func:`flops` and :func:`bytes_moved`."""
    batch, dim, height, width = img_feats.shape
    return Cost(flops(batch, dim, height, width, text.shape[0], text.shape[1]),
                bytes_moved(batch, dim, height, width, text.shape[0], text.shape[1], img_feats.element_size()))


def backward_cost(grad: torch.Tensor, img_feats: torch.Tensor, text: torch.Tensor, channels_last: bool,
                  need_img: bool, need_text: bool) -> Cost:
    """sed_fast::cost_map_backward: one matmul the forward's size per gradient asked for; reads grad
    and both inputs, writes the gradients asked for."""
    batch, dim, height, width = img_feats.shape
    forward = flops(batch, dim, height, width, text.shape[0], text.shape[1])
    written = (nbytes(img_feats) if need_img else 0) + (nbytes(text) if need_text else 0)
    return Cost(forward * (int(bool(need_img)) + int(bool(need_text))), nbytes(grad, img_feats, text) + written)


register_op_cost(f"sed_fast::{OP_NAME}", cost)
register_op_cost(f"sed_fast::{BACKWARD_OP_NAME}", backward_cost)


# ---------------------------------------------------------------------------------------------------
# Example inputs (doctor, benchmarks, compile report, tests)
# ---------------------------------------------------------------------------------------------------
#: Shapes of :func:`example_inputs`: "small" runs anywhere in milliseconds; "model" is SED-B at a
#: 768x768 input (24x24 cost map, D = 640, P = 80 prompts, ADE-150).
EXAMPLE_SHAPES = {"small": dict(batch=2, dim=48, height=5, width=7, classes=3, prompts=4),
                  "model": dict(batch=1, dim=640, height=24, width=24, classes=150, prompts=80)}


def example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                   generator: Optional[torch.Generator] = None, empty: bool = False,
                   **shape) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Arguments of one ``sed_fast::cost_map``
    call (as its reference and backends take them): (img_feats, text, channels_last): random normal
    values (generator, else seed 0) at EXAMPLE_SHAPES[size], any entry overridden by shape."""
    s = dict(EXAMPLE_SHAPES[size], **shape)
    generator = generator or torch.Generator().manual_seed(0)
    img = normal((s["batch"], s["dim"], s["height"], s["width"]), generator, device, dtype, empty)
    text = normal((s["classes"], s["prompts"], s["dim"]), generator, device, dtype, empty)
    return img, text, True


def backward_example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                            generator: Optional[torch.Generator] = None, empty: bool = False,
                   **shape) -> tuple:
    """Arguments of one ``sed_fast::cost_map_backward`` call, ``(grad, img_feats, text, channels_last,
    need_img, need_text)``, both gradients asked for; the map's gradient in channels-last rows."""
    generator = generator or torch.Generator().manual_seed(0)
    img, text, channels_last = example_inputs(device, dtype, size, generator, empty, **shape)
    grad = normal((img.shape[0] * text.shape[0], text.shape[1], *img.shape[2:]), generator, device, dtype, empty)
    return (grad.contiguous(memory_format=torch.channels_last), img, text, channels_last, True, True)
