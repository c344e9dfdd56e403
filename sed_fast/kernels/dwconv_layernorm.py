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
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import dispatch

OP_NAME = "dwconv_layernorm"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _dwconv_layernorm_kernel(
    x_ptr, w_ptr, b_ptr, ln_w_ptr, ln_b_ptr, out_ptr,
    channels, height, width,
    stride_n, stride_c, stride_h, stride_w,
    tiles_w, tiles_per_image, eps,
    KSIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One BLOCK_H x BLOCK_W tile of pixels of one image, all channels."""
    pid = tl.program_id(0)
    image = pid // tiles_per_image
    tile = pid % tiles_per_image
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    y = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
    x = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
    pix_ok = (y < height) & (x < width)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < channels

    x_image = x_ptr + image.to(tl.int64) * stride_n
    channel_offsets = c[None, :] * stride_c
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
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
    acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]

    # LayerNorm over the channels of each pixel (biased variance, like torch).
    mean = tl.sum(acc, axis=1) / channels  # padded channels hold exact zeros
    centered = tl.where(c_ok[None, :], acc - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / channels
    rstd = 1.0 / tl.sqrt(var + eps)
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


# ---------------------------------------------------------------------------------------------------
# Cost model (for benchmarks)
# ---------------------------------------------------------------------------------------------------
def bytes_moved(batch: int, channels: int, height: int, width: int, kernel_size: int = 9,
                element_size: int = 2) -> int:
    """Minimum DRAM traffic: read x once, write the output once, read the parameters.

    element_size * (2*N*C*H*W + C*(K*K + 3))
    """
    return element_size * (2 * batch * channels * height * width + channels * (kernel_size * kernel_size + 3))


def flops(batch: int, channels: int, height: int, width: int, kernel_size: int = 9) -> int:
    """2 per tap multiply-add plus about 8 per output element (bias, LayerNorm): N*C*H*W*(2*K*K + 8)."""
    return batch * channels * height * width * (2 * kernel_size * kernel_size + 8)


def flops_of_call(x: torch.Tensor, dw_weight: torch.Tensor, *args, **kwargs) -> int:
    return flops(*x.shape, kernel_size=dw_weight.shape[-1])


dispatch.register_cost_model(OP_NAME, flops_of_call)
