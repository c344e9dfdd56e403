"""Depthwise KxK convolution followed by a per-pixel LayerNorm over channels (ConvNeXt block head).

``dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps)`` with x (N, C, H, W) returns
(N, H, W, C) contiguous:

    y = conv2d(x, dw_weight, dw_bias, padding=K // 2, groups=C)       # dw_weight (C, 1, K, K), K odd
    out = LayerNorm_C(y.permute(0, 2, 3, 1)) * ln_weight + ln_bias       # eps 1e-6 in ConvNeXt

which is the ConvNeXt block's ``dwconv -> permute(0, 2, 3, 1) -> LayerNorm``; the next op (pwconv1, a
Linear) reads the last dim, so the output is channels-last tokens.

The Triton kernel computes a tile of pixels x all C channels per program: K*K shifted loads of the
input tile (the halo overlap is served by L1/L2, so DRAM sees each input byte about once), fp32
accumulation, the LayerNorm statistics over the C channels in registers, one write of the output.
Input strides are kernel arguments, so contiguous NCHW, channels-last (the fast path: each pixel's C
channels are contiguous, loads are coalesced) and sliced views (rows [start:stop]) are read in place:
x is never copied.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch
from .costs import Cost, nbytes, register_op_cost
from ._examples import normal
from ._autograd import in_layout_of, none_where_not_needed, reference_vjp, save_inputs, zeros_where_missing

OP_NAME = "dwconv_layernorm"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _pixel_tile(tiles_w, tiles_per_image, height, width, channels,
                BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's BLOCK_H x BLOCK_W tile of pixels of one image, all channels: (image, y, x,
    pix_ok, c, c_ok), y and x flattened to BLOCK_H * BLOCK_W pixels."""
    pid = tl.program_id(0)
    image = pid // tiles_per_image
    tile = pid % tiles_per_image
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    y = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
    x = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
    pix_ok = (y < height) & (x < width)
    c = tl.arange(0, BLOCK_C)
    return image, y, x, pix_ok, c, c < channels


@triton.jit
def _dwconv_tile(x_ptr, w_ptr, b_ptr, image, y, x, pix_ok, c, c_ok, height, width,
                 stride_n, stride_c, stride_h, stride_w,
                 KSIZE: tl.constexpr, BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise conv plus its bias at the tile's pixels, (pixels, channels) in fp32."""
    x_image = x_ptr + image.to(tl.int64) * stride_n
    channel_offsets = c[None, :] * stride_c
    acc = tl.zeros((BLOCK_PIX, BLOCK_C), dtype=tl.float32)
    # One loop over the K*K taps, not two static ranges: unrolled, the 81 tile loads need more
    # registers than sm_90 has (21-27 KB of spills per thread in 16-bit); as a loop, 72-94
    # registers and no spills (sed-fast compile-report).
    for tap_index in range(KSIZE * KSIZE):
        ky = tap_index // KSIZE
        kx = tap_index - ky * KSIZE
        in_y = y + (ky - KSIZE // 2)
        in_x = x + (kx - KSIZE // 2)
        ok = pix_ok & (in_y >= 0) & (in_y < height) & (in_x >= 0) & (in_x < width)  # zero padding
        vals = tl.load(x_image + (in_y * stride_h + in_x * stride_w)[:, None] + channel_offsets,
                       mask=ok[:, None] & c_ok[None, :], other=0.0)
        tap = tl.load(w_ptr + c * (KSIZE * KSIZE) + tap_index, mask=c_ok, other=0.0)
        acc += vals.to(tl.float32) * tap.to(tl.float32)[None, :]
    return acc + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _layernorm_statistics(acc, c_ok, channels, eps):
    """(acc - mean, 1 / std) over the channels of each pixel (biased variance, like torch); the
    centred values are 0 in the padded channels."""
    mean = tl.sum(acc, axis=1) / channels  # padded channels hold exact zeros
    centered = tl.where(c_ok[None, :], acc - mean[:, None], 0.0)
    return centered, 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / channels + eps)


@triton.jit
def _dwconv_layernorm_kernel(
    x_ptr, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, out_ptr,
    channels, height, width,
    stride_n, stride_c, stride_h, stride_w,
    tiles_w, tiles_per_image, eps,
    KSIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One BLOCK_H x BLOCK_W tile of pixels of one image, all channels."""
    image, y, x, pix_ok, c, c_ok = _pixel_tile(tiles_w, tiles_per_image, height, width, channels,
                                               BLOCK_H, BLOCK_W, BLOCK_C)
    acc = _dwconv_tile(x_ptr, w_ptr, b_ptr, image, y, x, pix_ok, c, c_ok, height, width,
                       stride_n, stride_c, stride_h, stride_w, KSIZE, BLOCK_H * BLOCK_W, BLOCK_C)
    centered, rstd = _layernorm_statistics(acc, c_ok, channels, eps)
    ln_w = tl.load(ln_w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    result = centered * rstd[:, None] * ln_w[None, :] + ln_b[None, :]

    # Output (N, H, W, C) contiguous: the tile's pixels x channels, channels fastest.
    out_rows = (image.to(tl.int64) * height + y) * width + x
    tl.store(out_ptr + out_rows[:, None] * channels + c[None, :], result.to(out_ptr.dtype.element_ty),
             mask=pix_ok[:, None] & c_ok[None, :])


def _pick_blocks(channels: int, width: int):
    """(BLOCK_H, BLOCK_W, BLOCK_C): all channels, about 4096 fp32 accumulators per program."""
    block_c = max(16, triton.next_power_of_2(channels))
    block_pixels = max(16, 4096 // block_c)
    block_w = min(block_pixels, 32, max(4, triton.next_power_of_2(width)))
    return block_pixels // block_w, block_w, block_c


def _output_like(x: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    return torch.empty((batch, height, width, channels), dtype=x.dtype, device=x.device)


def dwconv_layernorm_triton(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                            ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton launcher (same signature as the op; ``out`` lets tests pass a NaN-poisoned buffer)."""
    batch, channels, height, width = x.shape
    kernel_size = dw_weight.shape[-1]
    if out is None:
        out = _output_like(x)
    if not out.is_contiguous():
        raise ValueError("out must be a contiguous (N, H, W, C) tensor")
    if out.numel() == 0:
        return out
    # Parameters are tiny; contiguous() is a no-op for nn.Conv2d / nn.LayerNorm parameters.
    dw_weight, dw_bias = dw_weight.contiguous(), dw_bias.contiguous()
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    block_h, block_w, block_c = _pick_blocks(channels, width)
    tiles_w = triton.cdiv(width, block_w)
    tiles_per_image = triton.cdiv(height, block_h) * tiles_w
    grid = (batch * tiles_per_image,)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _dwconv_layernorm_kernel[grid](
            x, dw_weight, dw_bias, ln_weight, ln_bias, out,
            channels, height, width,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            tiles_w, tiles_per_image, eps,
            KSIZE=kernel_size, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
            num_warps=4,
            **dispatch.TRITON_LAUNCH_OPTIONS,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch reference
# ---------------------------------------------------------------------------------------------------
def dwconv_layernorm_reference(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                               ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The ConvNeXt block's computation, in the input dtype: depthwise conv2d, permute, LayerNorm."""
    channels, kernel_size = x.shape[1], dw_weight.shape[-1]
    y = F.conv2d(x, dw_weight, dw_bias, padding=kernel_size // 2, groups=channels)
    y = F.layer_norm(y.permute(0, 2, 3, 1), (channels,), ln_weight, ln_bias, eps)
    return y.contiguous()


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("sed_fast::dwconv_layernorm", mutates_args=())
def _dwconv_layernorm_op(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, ln_weight: torch.Tensor,
                         ln_bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if x.numel() == 0:  # N = 0 or H*W = 0: nothing to do
        batch, channels, height, width = x.shape
        return x.new_empty((batch, height, width, channels))
    args = (x, dw_weight, dw_bias, ln_weight, ln_bias, eps)
    return dispatch.resolve(OP_NAME, x.device, args=args)(*args)


@_dwconv_layernorm_op.register_fake
def _(x, dw_weight, dw_bias, ln_weight, ln_bias, eps=1e-6):
    return _output_like(x)


dispatch.register_impl(OP_NAME, "torch", dwconv_layernorm_reference)
dispatch.register_impl(OP_NAME, "triton", dwconv_layernorm_triton)


def _check_inputs(x, dw_weight, dw_bias, ln_weight, ln_bias) -> None:
    tensors = {"x": x, "dw_weight": dw_weight, "dw_bias": dw_bias, "ln_weight": ln_weight, "ln_bias": ln_bias}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dwconv_layernorm expects a tensor {name}, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if channels == 0:
        raise ValueError("x has C = 0 channels")
    if dw_weight.dim() != 4 or dw_weight.shape[0] != channels or dw_weight.shape[1] != 1 \
            or dw_weight.shape[2] != dw_weight.shape[3] or dw_weight.shape[2] % 2 == 0:
        raise ValueError(f"dw_weight must be (C, 1, K, K) with C={channels} and K odd, "
                         f"got shape {tuple(dw_weight.shape)}")
    for name in ("dw_bias", "ln_weight", "ln_bias"):
        if tuple(tensors[name].shape) != (channels,):
            raise ValueError(f"{name} must be ({channels},), got shape {tuple(tensors[name].shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dwconv_layernorm supports float32, bfloat16, float16; got {x.dtype}")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def dwconv_layernorm(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, ln_weight: torch.Tensor,
                     ln_bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Depthwise KxK conv (padding K//2, groups=C) then LayerNorm over C at each pixel.

    Args:
        x: (N, C, H, W), any strides (channels-last is the fast layout); read in place, never copied.
        dw_weight: (C, 1, K, K), K odd; dw_bias, ln_weight, ln_bias: (C,). Same dtype/device as x.
        eps: LayerNorm epsilon (1e-6 in ConvNeXt).

    Returns:
        (N, H, W, C) contiguous, in x's dtype (fp32 math inside).
    """
    _check_inputs(x, dw_weight, dw_bias, ln_weight, ln_bias)
    return _dwconv_layernorm_op(x, dw_weight, dw_bias, ln_weight, ln_bias, float(eps))


# ===================================================================================================
# The backward op
# ===================================================================================================
# Backward of the depthwise conv + LayerNorm (``sed_fast::dwconv_layernorm``).
#
# With y = conv(x) + dw_bias (depthwise KxK, zero padding), per pixel xhat = (y - mean_C y) * rstd and
# out = xhat * ln_weight + ln_bias, and g = grad_out (N, H, W, C):
#
#     grad ln_bias = sum_pix g              grad ln_weight = sum_pix g * xhat
#     dy = rstd * (g*ln_weight - mean_C(g*ln_weight) - xhat * mean_C(g*ln_weight*xhat))
#     grad dw_bias = sum_pix dy             grad dw_weight[c, tap] = sum_pix dy[c, pix] * x[c, pix + tap]
#     grad x[c, pix] = sum_tap dy[c, pix - tap] * dw_weight[c, tap]            (the transposed conv)
#
# ``sed_fast::dwconv_layernorm_backward(grad, x, dw_weight, dw_bias, ln_weight, ln_bias, eps)``
# returns the five gradients, each with the strides of ``torch.empty_like`` of its input. Backends:
# ``"torch"``, autograd of :func:`~sed_fast.kernels.dwconv_layernorm.dwconv_layernorm_reference`
# recomputed from the inputs; ``"triton"``. The forward saves only its inputs (the reference's
# autograd would also keep the conv output y, an (N, C, H, W) tensor).

BACKWARD_OP_NAME = "dwconv_layernorm_backward"


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
# Three kernels: (1) per tile of pixels x all channels, the forward recomputed (conv, statistics),
# the LayerNorm's backward to dy, written to an fp32 (N, H, W, C) workspace (transient: the same
# size as grad x), and per-tile partial sums of the affine and conv-bias gradients; (2) grad x, the
# transposed conv of dy; (3) the conv-weight gradient, one tap per program over a chunk of rows,
# partial sums per chunk. Partials are summed by torch (tiny: tiles x C and chunks x K*K x C).
@triton.jit
def _layernorm_backward_kernel(
    x_ptr, w_ptr, b_ptr, ln_w_ptr, g_ptr, dy_ptr, partial_ptr,
    channels, height, width,
    stride_n, stride_c, stride_h, stride_w,
    stride_gn, stride_gh, stride_gw, stride_gc,
    tiles_w, tiles_per_image, eps,
    KSIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    image, y, x, pix_ok, c, c_ok = _pixel_tile(tiles_w, tiles_per_image, height, width, channels,
                                               BLOCK_H, BLOCK_W, BLOCK_C)
    mask = pix_ok[:, None] & c_ok[None, :]

    # The forward's conv and statistics, recomputed.
    acc = _dwconv_tile(x_ptr, w_ptr, b_ptr, image, y, x, pix_ok, c, c_ok, height, width,
                       stride_n, stride_c, stride_h, stride_w, KSIZE, BLOCK_H * BLOCK_W, BLOCK_C)
    centered, rstd = _layernorm_statistics(acc, c_ok, channels, eps)
    xhat = centered * rstd[:, None]

    g = tl.load(g_ptr + image.to(tl.int64) * stride_gn + (y * stride_gh + x * stride_gw)[:, None]
                + c[None, :] * stride_gc, mask=mask, other=0.0).to(tl.float32)
    ln_w = tl.load(ln_w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    gw = g * ln_w[None, :]
    mean_gw = tl.sum(gw, axis=1) / channels
    mean_gw_xhat = tl.sum(gw * xhat, axis=1) / channels
    dy = tl.where(mask, (gw - mean_gw[:, None] - xhat * mean_gw_xhat[:, None]) * rstd[:, None], 0.0)

    rows = (image.to(tl.int64) * height + y) * width + x
    tl.store(dy_ptr + rows[:, None] * channels + c[None, :], dy, mask=mask)
    partial = partial_ptr + tl.program_id(0).to(tl.int64) * 3 * channels + c
    tl.store(partial, tl.sum(g * xhat, axis=0), mask=c_ok)             # ln_weight
    tl.store(partial + channels, tl.sum(g, axis=0), mask=c_ok)         # ln_bias
    tl.store(partial + 2 * channels, tl.sum(dy, axis=0), mask=c_ok)    # dw_bias


@triton.jit
def _conv_backward_input_kernel(
    dy_ptr, w_ptr, dx_ptr,
    channels, height, width,
    stride_n, stride_c, stride_h, stride_w,
    tiles_w, tiles_per_image,
    KSIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad x[pix] = sum_tap dy[pix - tap offset] * w[tap]: the forward's loop over taps, mirrored."""
    image, y, x, pix_ok, c, c_ok = _pixel_tile(tiles_w, tiles_per_image, height, width, channels,
                                               BLOCK_H, BLOCK_W, BLOCK_C)
    dy_image = dy_ptr + image.to(tl.int64) * height * width * channels
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
    for tap_index in range(KSIZE * KSIZE):
        ky = tap_index // KSIZE
        kx = tap_index - ky * KSIZE
        out_y = y - (ky - KSIZE // 2)
        out_x = x - (kx - KSIZE // 2)
        ok = pix_ok & (out_y >= 0) & (out_y < height) & (out_x >= 0) & (out_x < width)
        vals = tl.load(dy_image + ((out_y * width + out_x) * channels)[:, None] + c[None, :],
                       mask=ok[:, None] & c_ok[None, :], other=0.0)
        tap = tl.load(w_ptr + c * (KSIZE * KSIZE) + tap_index, mask=c_ok, other=0.0)
        acc += vals * tap.to(tl.float32)[None, :]
    tl.store(dx_ptr + image.to(tl.int64) * stride_n + (y * stride_h + x * stride_w)[:, None] + c[None, :] * stride_c,
             acc.to(dx_ptr.dtype.element_ty), mask=pix_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_backward_weight_kernel(
    dy_ptr, x_ptr, partial_ptr,
    batch, channels, height, width, rows_per_chunk,
    stride_n, stride_c, stride_h, stride_w,
    KSIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """partial[chunk, tap, c] = sum over the chunk's rows and pixels of dy[pix, c] * x[pix + tap, c]."""
    tap_index = tl.program_id(0)  # fastest: the programs of one chunk read the same rows from L2
    chunk = tl.program_id(1)
    ky = tap_index // KSIZE
    kx = tap_index - ky * KSIZE
    c = tl.arange(0, BLOCK_C)
    c_ok = c < channels
    num_pixels = height * width
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    first = chunk * rows_per_chunk
    for row in range(first, tl.minimum(first + rows_per_chunk, batch)):
        row64 = tl.full((), 0, tl.int64) + row  # a Python int under the interpreter
        dy_row = dy_ptr + row64 * num_pixels * channels
        x_row = x_ptr + row64 * stride_n
        for p0 in range(0, num_pixels, BLOCK_P):
            pix = p0 + tl.arange(0, BLOCK_P)
            y = pix // width
            x = pix - y * width
            in_y = y + (ky - KSIZE // 2)
            in_x = x + (kx - KSIZE // 2)
            ok = (pix < num_pixels) & (in_y >= 0) & (in_y < height) & (in_x >= 0) & (in_x < width)
            mask = ok[:, None] & c_ok[None, :]
            d = tl.load(dy_row + (pix * channels)[:, None] + c[None, :], mask=mask, other=0.0)
            v = tl.load(x_row + (in_y * stride_h + in_x * stride_w)[:, None] + c[None, :] * stride_c,
                        mask=mask, other=0.0)
            acc += d * v.to(tl.float32)
    tl.store(partial_ptr + (chunk.to(tl.int64) * KSIZE * KSIZE + tap_index) * channels + c,
             tl.sum(acc, axis=0), mask=c_ok)


#: Row chunks of the weight-gradient kernel: enough programs (x K*K taps) to fill a GPU, few partials.
WEIGHT_CHUNKS = 64


def dwconv_layernorm_backward_triton(grad: torch.Tensor, x: torch.Tensor, dw_weight: torch.Tensor,
                                     dw_bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                                     eps: float = 1e-6, out: Optional[Tuple[torch.Tensor, ...]] = None
                                     ) -> Tuple[torch.Tensor, ...]:
    """Triton launcher (same signature as the op; ``out`` lets tests pass NaN-poisoned buffers)."""
    batch, channels, height, width = x.shape
    kernel_size = dw_weight.shape[-1]
    taps = kernel_size * kernel_size
    grads = out if out is not None else _grads_like(x, dw_weight, dw_bias, ln_weight, ln_bias)
    grad_x = grads[0]
    grad = grad.to(x.dtype)
    dw_weight, dw_bias, ln_weight = dw_weight.contiguous(), dw_bias.contiguous(), ln_weight.contiguous()
    device = x.device
    block_h, block_w, block_c = _pick_blocks(channels, width)
    tiles_w = triton.cdiv(width, block_w)
    tiles_per_image = triton.cdiv(height, block_h) * tiles_w
    programs = batch * tiles_per_image
    dy = torch.empty((batch, height, width, channels), dtype=torch.float32, device=device)
    partials = torch.empty((programs, 3, channels), dtype=torch.float32, device=device)
    chunks = min(batch, WEIGHT_CHUNKS)
    rows_per_chunk = triton.cdiv(batch, chunks)
    chunks = triton.cdiv(batch, rows_per_chunk)
    weight_partials = torch.empty((chunks, taps, channels), dtype=torch.float32, device=device)
    block_p = max(16, min(4096 // block_c, triton.next_power_of_2(height * width)))
    x_strides = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
    with torch.cuda.device(device) if x.is_cuda else contextlib.nullcontext():
        _layernorm_backward_kernel[(programs,)](
            x, dw_weight, dw_bias, ln_weight, grad, dy, partials,
            channels, height, width, *x_strides,
            grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
            tiles_w, tiles_per_image, eps,
            KSIZE=kernel_size, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
            num_warps=4, **dispatch.TRITON_LAUNCH_OPTIONS)
        _conv_backward_input_kernel[(programs,)](
            dy, dw_weight, grad_x, channels, height, width,
            grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3),
            tiles_w, tiles_per_image,
            KSIZE=kernel_size, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c,
            num_warps=4, **dispatch.TRITON_LAUNCH_OPTIONS)
        _conv_backward_weight_kernel[(taps, chunks)](
            dy, x, weight_partials, batch, channels, height, width, rows_per_chunk, *x_strides,
            KSIZE=kernel_size, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=4, **dispatch.TRITON_LAUNCH_OPTIONS)
    sums = partials.sum(0)
    grads[1].copy_(weight_partials.sum(0).t().reshape(channels, 1, kernel_size, kernel_size))
    grads[2].copy_(sums[2])
    grads[3].copy_(sums[0])
    grads[4].copy_(sums[1])
    return tuple(grads)


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
    return tuple(dispatch.resolve(BACKWARD_OP_NAME, x.device, args=args)(*args))


@_dwconv_layernorm_backward_op.register_fake
def _(grad, x, dw_weight, dw_bias, ln_weight, ln_bias, eps):
    return _grads_like(x, dw_weight, dw_bias, ln_weight, ln_bias)


dispatch.register_impl(BACKWARD_OP_NAME, "torch", dwconv_layernorm_backward_reference)
dispatch.register_impl(BACKWARD_OP_NAME, "triton", dwconv_layernorm_backward_triton)


def _backward(ctx, grad):
    grads = _dwconv_layernorm_backward_op(grad, *ctx.saved_tensors, *ctx.constants)
    return (*none_where_not_needed(grads, ctx.needs_input_grad), None)


_dwconv_layernorm_op.register_autograd(_backward, setup_context=save_inputs)


# ---------------------------------------------------------------------------------------------------
# Cost model (FLOPs as torch.utils.flop_counter counts the reference; least bytes moved)
# ---------------------------------------------------------------------------------------------------
def flops(batch: int, channels: int, height: int, width: int, kernel_size: int = 9) -> int:
    """The depthwise convolution: 2 * N*C*H*W * K*K (bias and LayerNorm are elementwise: not counted)."""
    return 2 * batch * channels * height * width * kernel_size * kernel_size


def bytes_moved(batch: int, channels: int, height: int, width: int, kernel_size: int = 9,
                element_size: int = 2) -> int:
    """Read x and the parameters once, write the tokens once: element_size * (2*N*C*H*W + C*(K*K + 3))."""
    return element_size * (2 * batch * channels * height * width + channels * (kernel_size * kernel_size + 3))


def cost(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor, ln_weight: torch.Tensor,
         ln_bias: torch.Tensor, eps: float = 1e-6) -> Cost:
    """sed_fast::dwconv_layernorm: see :func:`flops` and :func:`bytes_moved`."""
    return Cost(flops(*x.shape, kernel_size=dw_weight.shape[-1]),
                bytes_moved(*x.shape, kernel_size=dw_weight.shape[-1], element_size=x.element_size()))


def backward_cost(grad: torch.Tensor, x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                  ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6) -> Cost:
    """sed_fast::dwconv_layernorm_backward: two depthwise convolutions the forward's size (grad x,
    grad weight); reads grad, x and the parameters, writes the five gradients.

    torch's counter over autograd of the reference says (1 + C) times the forward: its
    convolution_backward formula leaves out the groups for the weight gradient. The true count is 2x."""
    params = (dw_weight, dw_bias, ln_weight, ln_bias)
    return Cost(2 * flops(*x.shape, kernel_size=dw_weight.shape[-1]),
                nbytes(grad, x, *params) + nbytes(x, *params))


register_op_cost(f"sed_fast::{OP_NAME}", cost)
register_op_cost(f"sed_fast::{BACKWARD_OP_NAME}", backward_cost)


# ---------------------------------------------------------------------------------------------------
# Example inputs (doctor, benchmarks, compile report, tests)
# ---------------------------------------------------------------------------------------------------
#: Shapes of :func:`example_inputs`: "small" (C = 32: a width every backend takes, the CUDA kernel
#: 32, 64 or 128) and "model": SED-B's first decoder level at 768 px, 150 classes.
EXAMPLE_SHAPES = {"small": dict(batch=3, channels=32, height=7, width=9, kernel_size=9),
                  "model": dict(batch=150, channels=128, height=24, width=24, kernel_size=9)}


def example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                   generator: Optional[torch.Generator] = None, empty: bool = False, **shape) -> tuple:
    """Arguments of one ``sed_fast::dwconv_layernorm``
    call (as its reference and backends take them): ``(x, dw_weight, dw_bias, ln_weight, ln_bias,
    eps)``: x channels-last as the decoder gives it, weights scaled like a trained block's (seed 0
    unless ``generator``), at ``EXAMPLE_SHAPES[size]`` with any entry overridden by ``shape``."""
    s = dict(EXAMPLE_SHAPES[size], **shape)
    generator = generator or torch.Generator().manual_seed(0)
    channels, k = s["channels"], s["kernel_size"]

    def rand(*dims):
        return torch.randn(*dims, generator=generator)

    x = normal((s["batch"], channels, s["height"], s["width"]), generator, device, dtype, empty).contiguous(
        memory_format=torch.channels_last)
    return (x, (rand(channels, 1, k, k) / k).to(device, dtype), rand(channels).to(device, dtype),
            (1 + 0.1 * rand(channels)).to(device, dtype), (0.1 * rand(channels)).to(device, dtype), 1e-6)


def backward_example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                            generator: Optional[torch.Generator] = None, empty: bool = False, **shape) -> tuple:
    """Arguments of one ``sed_fast::dwconv_layernorm_backward`` call: ``(grad, *forward arguments)``,
    the gradient of the (N, H, W, C) tokens."""
    generator = generator or torch.Generator().manual_seed(0)
    args = example_inputs(device, dtype, size, generator, empty, **shape)
    n, c, h, w = args[0].shape
    return (normal((n, h, w, c), generator, device, dtype, empty), *args)
