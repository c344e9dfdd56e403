"""Linear attention across the classes at each pixel, on ragged per-image class sets.

``class_attention(q, k, v, class_offsets, num_heads=4, eps=1e-6)``: q, k, v (total_T, P, C) with
C = num_heads * d; ``class_offsets`` int32 (B+1,): image b owns rows [off[b], off[b+1]) (varlen
attention style; after category rejection every image keeps its own number of classes). For each
image, pixel p and head h, with phi(x) = elu(x) + 1 and L the image's class count:

    out_t = (phi(q_t) @ KV) / (phi(q_t) . ksum + eps),   KV = sum_s phi(k_s) (x) v_s,  ksum = sum_s phi(k_s)

which is the official SED ``LinearAttention`` ("Transformers are RNNs"): its ``v / L`` and ``* L``
cancel exactly in real arithmetic (the kernel keeps fp32 state, so it does not need them to avoid
fp16 overflow).

The Triton kernel: grid (pixel blocks, heads, images). A program streams its image's classes twice,
one class per step (the loop bound is read from ``class_offsets``: no recompilation per L): first
accumulating KV (BLOCK_P x d x d) and ksum in fp32 registers, then applying them to each q_t and
writing out_t. Tiles are loaded directly in the 3D (pixel, i, j) layout of the state (k, q as
(P, d, 1), v, out as (P, 1, d)): 2D tiles broadcast into it would convert layouts through shared
memory at every class step (16-40 barriers in the SASS on sm_90, against 3). q, k and v are read once per
pass; they may be strided views (e.g. the ``qkv.split(C, dim=-1)`` of one (total_T, P, 3C) tensor):
the row and pixel strides go to the kernel, only the channel stride must be 1 (else it is copied).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from .costs import Cost, nbytes, register_op_cost
from ._examples import normal
from ._autograd import none_where_not_needed, reference_vjp, save_inputs, zeros_where_missing

OP_NAME = "class_attention"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _head_block(offsets_ptr, num_pixels, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's pixels, head and image in the (pixel, i, j) layout (see the module docstring):
    (first, length) of the image's class rows, the pixel index (P, 1, 1), the head's channels as
    i (1, d, 1) and as j (1, 1, d), and their masks."""
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
    return first, length, pix, col_i, col_j, mask_i, mask_j


@triton.jit
def _phi(x, mask):
    """phi(x) = elu(x) + 1, 0 where masked out, and exp(x): phi's slope where x <= 0 (it is 1 where
    x > 0; taken where it is used, since made here it would hold registers through the sums)."""
    exp_x = tl.exp(x)
    return tl.where(mask, tl.where(x > 0, x + 1.0, exp_x), 0.0), exp_x


@triton.jit
def _key_value_sums(k_tile, v_tile, stride_kt, stride_vt, first, length, mask_i, mask_j,
                    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """KV = sum_s phi(k_s) (x) v_s (P, d, d) and ksum = sum_s phi(k_s) (P, d, 1) over the image's
    class rows, in fp32; k_tile and v_tile point at row 0 of the block's k (P, d, 1) and v (P, 1, d)."""
    kv = tl.zeros((BLOCK_P, BLOCK_D, BLOCK_D), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_P, BLOCK_D, 1), dtype=tl.float32)
    for step in range(0, length):
        row64 = first + step
        k = tl.load(k_tile + row64 * stride_kt, mask=mask_i, other=0.0).to(tl.float32)  # (P, d, 1)
        v = tl.load(v_tile + row64 * stride_vt, mask=mask_j, other=0.0).to(tl.float32)  # (P, 1, d)
        phi, _ = _phi(k, mask_i)
        ksum += phi
        kv += phi * v
    return kv, ksum


@triton.jit(do_not_specialize=["num_pixels", "stride_qt", "stride_kt", "stride_vt", "stride_ot"])
def _class_attention_kernel(
    q_ptr, k_ptr, v_ptr, offsets_ptr, out_ptr,
    num_pixels, eps,
    stride_qt, stride_qp, stride_kt, stride_kp, stride_vt, stride_vp, stride_ot, stride_op,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    first, length, pix, col_i, col_j, mask_i, mask_j = _head_block(offsets_ptr, num_pixels,
                                                                   HEAD_DIM, BLOCK_P, BLOCK_D)
    q_tile = q_ptr + pix * stride_qp + col_i
    out_tile = out_ptr + pix * stride_op + col_j

    # Pass 1: KV = sum_s phi(k_s) (x) v_s and ksum = sum_s phi(k_s), per pixel, in fp32.
    kv, ksum = _key_value_sums(k_ptr + pix * stride_kp + col_i, v_ptr + pix * stride_vp + col_j,
                               stride_kt, stride_vt, first, length, mask_i, mask_j, BLOCK_P, BLOCK_D)

    # Pass 2: out_t = (phi(q_t) @ KV) / (phi(q_t) . ksum + eps).
    for step in range(0, length):
        row64 = first + step
        q = tl.load(q_tile + row64 * stride_qt, mask=mask_i, other=0.0).to(tl.float32)  # (P, d, 1)
        q, _ = _phi(q, mask_i)
        numerator = tl.sum(q * kv, axis=1, keep_dims=True)                # (P, 1, d)
        denominator = tl.sum(q * ksum, axis=1, keep_dims=True) + eps      # (P, 1, 1)
        out = numerator / denominator
        tl.store(out_tile + row64 * stride_ot, out.to(out_ptr.dtype.element_ty), mask=mask_j)


def _pick_blocks(num_pixels: int, head_dim: int):
    """About 8K fp32 of KV state per program: 8 pixels at d=32, 32 at d=16, 128 at d=8."""
    block_d = triton.next_power_of_2(head_dim)
    block_p = max(1, 8192 // (block_d * block_d))
    block_p = min(block_p, triton.next_power_of_2(num_pixels))
    return block_p, block_d


def _channel_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def class_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, class_offsets: torch.Tensor,
                           num_heads: int = 4, eps: float = 1e-6,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton launcher (same signature as the op; ``out`` lets tests pass a NaN-poisoned buffer)."""
    total, pixels, channels = q.shape
    q, k, v = _channel_contiguous(q), _channel_contiguous(k), _channel_contiguous(v)
    offsets = class_offsets if class_offsets.dtype == torch.int32 else class_offsets.to(torch.int32)
    if out is None:
        out = torch.empty((total, pixels, channels), dtype=q.dtype, device=q.device)
    num_images = offsets.shape[0] - 1
    if total == 0 or num_images == 0:
        return out
    head_dim = channels // num_heads
    block_p, block_d = _pick_blocks(pixels, head_dim)
    grid = (triton.cdiv(pixels, block_p), num_heads, num_images)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _class_attention_kernel[grid](
            q, k, v, offsets, out,
            pixels, float(eps),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_P=block_p, BLOCK_D=block_d,
            # 8 warps: the class loops are latency-bound (Triton does not pipeline their loads), so
            # resident warps matter; 8 warps take 80-102 registers each (16 warps per SM), 4 would
            # take 166-230 (8-12 per SM); no spills either way (sed-fast compile-report).
            num_warps=8,
            **dispatch.TRITON_LAUNCH_OPTIONS,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch reference
# ---------------------------------------------------------------------------------------------------
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The official multi-head linear attention ("Transformers are RNNs"), elu+1 feature map.

    q, k, v: (N, L, H, D) with N independent sequences (pixels) of length L (classes).
    valid: optional (L,) bool, the positions that are real (a static kept-class budget pads the
    sequence): only they are keys and values, and the length is their count, so the valid rows
    equal those of the unpadded sequence. Rows at padded positions are meaningless.
    """
    q = F.elu(q) + 1
    k = F.elu(k) + 1
    if valid is None:
        length = v.size(1)
        v = v / length  # the official code scales values down (fp16 overflow) and back up below
        kv = torch.einsum("nshd,nshv->nhdv", k, v)
        z = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    else:
        # Padding is dropped from KV and the key sum by a 0/1 weight per position (padding rows are
        # finite: computed from real ones). Not by masking k: with k masked, Inductor's vectorised
        # CPU code for the export wrote past a buffer (torch 2.14, a 3-row budget).
        weight = valid.to(v.dtype)
        length = weight.sum().clamp(min=1)
        v = v * (weight / length).view(1, -1, 1, 1)
        kv = torch.einsum("nshd,nshv->nhdv", k, v)
        z = 1 / (torch.einsum("nlhd,nhd->nlh", q, torch.einsum("nshd,s->nhd", k, weight)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, z) * length


def _segment_bounds(class_offsets: torch.Tensor, total: int) -> list:
    """``class_offsets`` on the host (one sync), checked to rise from 0 to ``total``."""
    bounds = [int(b) for b in class_offsets.tolist()]
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"class_offsets must rise from 0 to total_T={total}, got {bounds}")
    return bounds


def class_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, class_offsets: torch.Tensor,
                              num_heads: int = 4, eps: float = 1e-6) -> torch.Tensor:
    """The official einsum linear attention (``decoder.linear_attention``), one image at a time.

    Reads ``class_offsets`` on the host (one sync); checks that the segments tile [0, total_T).
    """
    total, pixels, channels = q.shape
    head_dim = channels // num_heads
    bounds = _segment_bounds(class_offsets, total)
    out = torch.empty((total, pixels, channels), dtype=q.dtype, device=q.device)
    for first, end in zip(bounds, bounds[1:]):
        if first == end:
            continue

        def per_pixel(t: torch.Tensor) -> torch.Tensor:  # (L, P, C) -> (N=P, L, H, d)
            return t[first:end].transpose(0, 1).reshape(pixels, end - first, num_heads, head_dim)

        attended = linear_attention(per_pixel(q), per_pixel(k), per_pixel(v), eps)  # (P, L, H, d)
        out[first:end] = attended.reshape(pixels, end - first, channels).transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# CPU implementation
# ---------------------------------------------------------------------------------------------------
#: KV state per pixel chunk of the CPU implementation: small enough to stay in a core's L2 while
#: every class is added into it.
CPU_STATE_BYTES = 1 << 19


def _positive_feature(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 as exp(min(x, 0)) + max(x, 0): equal up to rounding (exp(x) against expm1(x) + 1),
    and about 10x faster on CPU, where ``F.elu`` is not vectorised."""
    return x.clamp(max=0).exp_().add_(x.clamp(min=0))


def class_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, class_offsets: torch.Tensor,
                        num_heads: int = 4, eps: float = 1e-6) -> torch.Tensor:
    """The kernel's algorithm in PyTorch, shaped for a CPU: per image and chunk of pixels, KV is
    built one class at a time (a broadcast multiply-add into cache-resident state) and applied one
    key channel at a time, in float32. The reference's batched (d x L) @ (L x d) products, one per
    pixel and head, are 3-6x slower on CPU, and so is its full-size transposed copy of q, k, v.
    """
    total, pixels, channels = q.shape
    head_dim = channels // num_heads
    bounds = _segment_bounds(class_offsets, total)
    out = torch.empty((total, pixels, channels), dtype=q.dtype, device=q.device)
    step = max(1, CPU_STATE_BYTES // (channels * head_dim * 4))
    for first, end in zip(bounds, bounds[1:]):
        classes = end - first
        if classes == 0:
            continue
        for p0 in range(0, pixels, step):
            p1 = min(pixels, p0 + step)
            n = p1 - p0

            def chunk(t: torch.Tensor) -> torch.Tensor:  # (L, n, H, d) float32
                return t[first:end, p0:p1].float().reshape(classes, n, num_heads, head_dim)

            qc, kc, vc = _positive_feature(chunk(q)), _positive_feature(chunk(k)), chunk(v)
            kv = torch.zeros((n, num_heads, head_dim, head_dim), dtype=torch.float32, device=q.device)
            for s in range(classes):
                kv.addcmul_(kc[s].unsqueeze(-1), vc[s].unsqueeze(-2))
            ksum = kc.sum(dim=0)                                                  # (n, H, d)
            numerator = qc[..., 0:1] * kv[:, :, 0]                                # (L, n, H, d)
            for i in range(1, head_dim):
                numerator.addcmul_(qc[..., i:i + 1], kv[:, :, i])
            denominator = (qc * ksum).sum(dim=-1, keepdim=True).add_(eps)
            out[first:end, p0:p1] = numerator.div_(denominator).view(classes, n, channels)
    return out


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("sed_fast::class_attention", mutates_args=())
def _class_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, class_offsets: torch.Tensor,
                        num_heads: int = 4, eps: float = 1e-6) -> torch.Tensor:
    if q.numel() == 0:  # total_T = 0 or P = 0: nothing to do
        return q.new_empty(q.shape)
    args = (q, k, v, class_offsets, num_heads, eps)
    return dispatch.resolve(OP_NAME, q.device, args=args)(*args)


@_class_attention_op.register_fake
def _(q, k, v, class_offsets, num_heads=4, eps=1e-6):
    return q.new_empty(q.shape)  # contiguous


dispatch.register_impl(OP_NAME, "torch", class_attention_reference)
dispatch.register_impl(OP_NAME, "triton", class_attention_triton)
dispatch.register_impl(OP_NAME, "cpu", class_attention_cpu)


def _check_inputs(q, k, v, class_offsets, num_heads) -> None:
    for name, value in (("q", q), ("k", k), ("v", v), ("class_offsets", class_offsets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"class_attention: {name} must be a tensor, got {type(value).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be (total_T, P, C), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"class_attention supports float32, bfloat16, float16; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if class_offsets.dim() != 1 or class_offsets.shape[0] < 2:
        raise ValueError(f"class_offsets must be (B+1,) with B >= 1, got shape {tuple(class_offsets.shape)}")
    if class_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"class_offsets must be int32 (or int64), got {class_offsets.dtype}")
    for name, value in (("k", k), ("v", v), ("class_offsets", class_offsets)):
        if value.device != q.device:
            raise ValueError(f"class_attention: {name} is on {value.device}, q is on {q.device}")
    if not isinstance(num_heads, int) or num_heads < 1 or q.shape[2] % num_heads != 0:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing C={q.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("class_attention needs C > 0 channels")


def class_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, class_offsets: torch.Tensor,
                    num_heads: int = 4, eps: float = 1e-6) -> torch.Tensor:
    """Multi-head linear attention across classes at every pixel, per image (ragged classes).

    Args:
        q, k, v: (total_T, P, C), float32 / bfloat16 / float16, C = num_heads * d. Row and pixel
            strides are free (views of one (total_T, P, 3C) tensor are read in place); a channel
            stride other than 1 costs a copy.
        class_offsets: (B+1,) int32 on the same device; image b owns rows [off[b], off[b+1]).
            Must rise from 0 to total_T (checked by the reference only: checking it on the device
            path would need a host sync). Empty segments are allowed.
        num_heads: heads; eps: added to the normaliser.

    Returns:
        (total_T, P, C) contiguous, in the input dtype (empty when total_T = 0 or P = 0).
    """
    _check_inputs(q, k, v, class_offsets, num_heads)
    return _class_attention_op(q, k, v, class_offsets, num_heads, float(eps))


# ===================================================================================================
# The backward op
# ===================================================================================================
# Backward of the linear class attention (``sed_fast::class_attention``).
#
# Per image, pixel and head, with phi(x) = elu(x) + 1, KV = sum_s phi(k_s) (x) v_s,
# ksum = sum_s phi(k_s), den_t = phi(q_t) . ksum + eps, out_t = phi(q_t) KV / den_t and g_t = grad out_t:
#
#     dnum_t = g_t / den_t                  dden_t = -(g_t . out_t) / den_t
#     grad phi(q_t) = KV dnum_t + ksum dden_t
#     dKV = sum_t phi(q_t) (x) dnum_t       dksum = sum_t phi(q_t) dden_t
#     grad phi(k_s) = dKV v_s + dksum       grad v_s = dKV^T phi(k_s)
#     grad x = grad phi(x) * (1 if x > 0 else exp(x))
#
# ``sed_fast::class_attention_backward(grad, q, k, v, class_offsets, num_heads, eps)`` returns
# (grad q, grad k, grad v), contiguous (total_T, P, C). Backends: ``"torch"``, autograd of
# :func:`~sed_fast.kernels.class_attention.class_attention_reference` recomputed from the inputs;
# ``"triton"``. The forward saves only q, k, v and the offsets.

BACKWARD_OP_NAME = "class_attention_backward"


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
    first, length, pix, col_i, col_j, mask_i, mask_j = _head_block(offsets_ptr, num_pixels,
                                                                   HEAD_DIM, BLOCK_P, BLOCK_D)

    # Pass 1: KV and ksum.
    kv, ksum = _key_value_sums(k_ptr + pix * stride_kp + col_i, v_ptr + pix * stride_vp + col_j,
                               stride_kt, stride_vt, first, length, mask_i, mask_j, BLOCK_P, BLOCK_D)

    # Pass 2: grad q_t; dKV = sum_t phi(q_t) (x) dnum_t, dksum = sum_t phi(q_t) dden_t.
    dkv = tl.zeros((BLOCK_P, BLOCK_D, BLOCK_D), dtype=tl.float32)
    dksum = tl.zeros((BLOCK_P, BLOCK_D, 1), dtype=tl.float32)
    for step in range(0, length):
        row64 = first + step
        q = tl.load(q_ptr + row64 * stride_qt + pix * stride_qp + col_i, mask=mask_i, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + row64 * stride_gt + pix * stride_gp + col_j, mask=mask_j, other=0.0).to(tl.float32)
        phi, exp_q = _phi(q, mask_i)
        den = tl.sum(phi * ksum, axis=1, keep_dims=True) + eps           # (P, 1, 1)
        out = tl.sum(phi * kv, axis=1, keep_dims=True) / den              # (P, 1, d)
        dnum = g / den                                                    # (P, 1, d)
        dden = -tl.sum(g * out, axis=2, keep_dims=True) / den             # (P, 1, 1)
        dphi = tl.sum(kv * dnum, axis=2, keep_dims=True) + ksum * dden    # (P, d, 1)
        dq = dphi * tl.where(q > 0, 1.0, exp_q)
        tl.store(dq_ptr + row64 * stride_ot + pix * stride_op + col_i, dq.to(dq_ptr.dtype.element_ty), mask=mask_i)
        dkv += phi * dnum
        dksum += phi * dden

    # Pass 3: grad k_s = (dKV v_s + dksum) phi'(k_s), grad v_s = dKV^T phi(k_s).
    for step in range(0, length):
        row64 = first + step
        k = tl.load(k_ptr + row64 * stride_kt + pix * stride_kp + col_i, mask=mask_i, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row64 * stride_vt + pix * stride_vp + col_j, mask=mask_j, other=0.0).to(tl.float32)
        phi, exp_k = _phi(k, mask_i)
        dphi = tl.sum(dkv * v, axis=2, keep_dims=True) + dksum            # (P, d, 1)
        dk = dphi * tl.where(k > 0, 1.0, exp_k)
        dv = tl.sum(dkv * phi, axis=1, keep_dims=True)                    # (P, 1, d)
        tl.store(dk_ptr + row64 * stride_ot + pix * stride_op + col_i, dk.to(dk_ptr.dtype.element_ty), mask=mask_i)
        tl.store(dv_ptr + row64 * stride_ot + pix * stride_op + col_j, dv.to(dv_ptr.dtype.element_ty), mask=mask_j)


def _pick_backward_blocks(num_pixels: int, head_dim: int):
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
    block_p, block_d = _pick_backward_blocks(pixels, head_dim)
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
    return tuple(dispatch.resolve(BACKWARD_OP_NAME, q.device, args=args)(*args))


@_class_attention_backward_op.register_fake
def _(grad, q, k, v, class_offsets, num_heads, eps):
    return _grads_like(q)


dispatch.register_impl(BACKWARD_OP_NAME, "torch", class_attention_backward_reference)
dispatch.register_impl(BACKWARD_OP_NAME, "triton", class_attention_backward_triton)


def _backward(ctx, grad):
    grads = _class_attention_backward_op(grad, *ctx.saved_tensors, *ctx.constants)  # q, k, v
    return (*none_where_not_needed(grads, ctx.needs_input_grad), None, None, None)


_class_attention_op.register_autograd(_backward, setup_context=save_inputs)


# ---------------------------------------------------------------------------------------------------
# Cost model (FLOPs as torch.utils.flop_counter counts the reference; least bytes moved)
# ---------------------------------------------------------------------------------------------------
def flops(total_classes: int, pixels: int, channels: int, num_heads: int = 4) -> int:
    """The linear form's three contractions per pixel and head: KV = K^T V and Q KV (2 * T*d*d each)
    and the normaliser Q . sum(K) (2 * T*d): 4 * T*P*C*d + 2 * T*P*C, d = C / num_heads."""
    head_dim = channels // num_heads
    return 4 * total_classes * pixels * channels * head_dim + 2 * total_classes * pixels * channels


def bytes_moved(total_classes: int, pixels: int, channels: int, element_size: int = 2) -> int:
    """Read q, k, v once, write out once: 4 * total_T*P*C * element_size."""
    return 4 * total_classes * pixels * channels * element_size


def cost(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, class_offsets: torch.Tensor,
         num_heads: int = 4, eps: float = 1e-6) -> Cost:
    """sed_fast::class_attention: see :func:`flops` and :func:`bytes_moved`."""
    return Cost(flops(*q.shape, num_heads=num_heads),
                bytes_moved(*q.shape, element_size=q.element_size()) + nbytes(class_offsets))


def backward_cost(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  class_offsets: torch.Tensor, num_heads: int, eps: float) -> Cost:
    """sed_fast::class_attention_backward: each of the forward's contractions gives two gradients of
    its size (2x the forward); reads grad, q, k, v, writes dq, dk, dv."""
    return Cost(2 * flops(*q.shape, num_heads=num_heads), nbytes(grad, q, k, v, class_offsets) + 3 * nbytes(q))


register_op_cost(f"sed_fast::{OP_NAME}", cost)
register_op_cost(f"sed_fast::{BACKWARD_OP_NAME}", backward_cost)


# ---------------------------------------------------------------------------------------------------
# Example inputs (doctor, benchmarks, compile report, tests)
# ---------------------------------------------------------------------------------------------------
#: Shapes of :func:`example_inputs`: "small" (two images with 2 and 3 classes) and "model": SED-B's
#: first decoder level at 768 px (24x24 pixels, C = 128), 150 classes of one image.
EXAMPLE_SHAPES = {"small": dict(classes=(2, 3), pixels=12, channels=32, num_heads=4),
                  "model": dict(classes=(150,), pixels=24 * 24, channels=128, num_heads=4)}


def example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                   generator: Optional[torch.Generator] = None, empty: bool = False, **shape) -> tuple:
    """Arguments of one ``sed_fast::class_attention``
    call (as its reference and backends take them): ``(q, k, v, class_offsets, num_heads, eps)``:
    q, k, v views of one fused (total_T, P, 3C) projection as the fast decoder gives them, random
    normal (seed 0 unless ``generator``); ``shape["classes"]`` is the classes per image."""
    s = dict(EXAMPLE_SHAPES[size], **shape)
    generator = generator or torch.Generator().manual_seed(0)
    classes = tuple(s["classes"])
    channels = s["channels"]
    qkv = normal((sum(classes), s["pixels"], 3 * channels), generator, device, dtype, empty)
    q, k, v = qkv.split(channels, dim=-1)
    offsets = torch.tensor([0, *itertools.accumulate(classes)], dtype=torch.int32, device=device)
    return q, k, v, offsets, s["num_heads"], 1e-6


def backward_example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                            generator: Optional[torch.Generator] = None, empty: bool = False, **shape) -> tuple:
    """Arguments of one ``sed_fast::class_attention_backward`` call: ``(grad, *forward arguments)``."""
    generator = generator or torch.Generator().manual_seed(0)
    args = example_inputs(device, dtype, size, generator, empty, **shape)
    return (normal(args[0].shape, generator, device, dtype, empty), *args)
