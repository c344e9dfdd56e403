"""Pillow's bilinear resize of uint8 images, bit for bit (SED's official test-time resize).

``pil_bilinear_resize(image, (new_h, new_w))`` with image uint8 (C, H, W), C = 1..4, returns uint8
(C, new_h, new_w) contiguous, equal to

    np.asarray(PIL.Image.fromarray(hwc).resize((new_w, new_h), PIL.Image.BILINEAR))

with hwc = image.permute(1, 2, 0) (image[0] for C = 1). detectron2's ``ResizeTransform.apply_image``
does exactly that to uint8 images, so SED's evaluation and demo see these pixels.

Pillow's algorithm (``src/libImaging/Resample.c``, ``ImagingResampleInner``, Pillow 13), reproduced here:

* Per axis, a table that depends only on (in_size, out_size) (``precompute_coeffs``), in float64:
  ``scale = in_size / out_size``, ``filterscale = max(scale, 1)``, ``support = 1.0 * filterscale``
  (the triangle filter's support 1 widened by the shrink factor: Pillow's bilinear antialiases when
  shrinking); output i reads inputs ``lo .. lo + count - 1`` with ``center = (i + 0.5) * scale``,
  ``lo = max(int(center - support + 0.5), 0)``, ``count = min(int(center + support + 0.5), in_size) - lo``,
  weights ``triangle((lo + j - center + 0.5) * (1 / filterscale))`` divided by their (sequential)
  sum, then fixed point with 22 fractional bits (``normalize_coeffs_8bpc``):
  ``int(0.5 + w * 2**22)`` (``int(-0.5 + ...)`` for w < 0), truncated toward zero.
* A pass (``ImagingResample{Horizontal,Vertical}_8bpc``) computes, per channel, in int32,
  ``clip8((2**21 + sum_j in[lo + j] * k_j) >> 22)``: the rounding half is added before the sum.
* The horizontal pass runs only if the width changes, the vertical pass only if the height
  changes; the first pass's output is stored as uint8 (rounded and clipped) and read by the second.
  Which runs first changes the result. Before Pillow 13 the horizontal pass ran first unless the
  source is more than 100 times taller than wide (``H > 100 * W``, measured on Pillow 12.3);
  Pillow 13 (python-pillow/Pillow#9549; the condition as compiled into Pillow 13.0.0's ``_imaging``)
  runs the vertical pass first when ``H - new_h > max(0, 2 * (W - new_w))``
  (the height shrinks by more than twice as many pixels as the width). Both orders are offered.
  Horizontal first, Pillow runs that pass only on the input rows the vertical pass reads,
  ``lo[0] .. lo[-1] + count[-1] - 1``; for the whole image (no ``box``) that is every row
  (``lo[0] = 0``, and the last output's window reaches the end), so no crop is done here.
* Same size in and out: a copy (``Image.resize`` returns ``self.copy()``).
* C = 2 and C = 4 are Pillow's "LA" and "RGBA" modes, which ``Image.resize`` resizes premultiplied
  (``Convert.c``): the colour channels are multiplied by alpha first, ``t = v * a + 128;
  v' = ((t >> 8) + t) >> 8``, and divided back after, ``v = min(255 * v' // a, 255)`` (unchanged
  where a is 0 or 255). Alpha itself is resized like any channel.

The coefficient tables are computed on the host in float64 exactly as above (cached per size pair,
uploaded once per device). The two passes are one Triton kernel, the axis a compile-time constant:
integer arithmetic in int32 as in Pillow, one 2D tile of one channel per program, input strides as
arguments (a permuted HWC image is read in place). The premultiplication of C = 2, 4 is shared
torch code around the passes.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import dispatch
from .costs import Cost, nbytes, register_op_cost

OP_NAME = "pil_bilinear_resize"
PRECISION_BITS = 32 - 8 - 2  # Pillow's PRECISION_BITS: 8-bit result, 2 bits of headroom
MAX_CHANNELS = 4  # Pillow's 8-bit multi-band images hold at most 4 bands
BLOCK_ROWS, BLOCK_COLS = 8, 128  # one program's tile, in both passes


# ---------------------------------------------------------------------------------------------------
# Coefficient tables (host, float64, as Pillow's precompute_coeffs + normalize_coeffs_8bpc)
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def resample_coefficients(in_size: int, out_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pillow's bilinear resampling table for one axis, in_size -> out_size.

    Returns (lo, coef) on the CPU: lo int32 (out_size,), the first input index each output reads;
    coef int32 (out_size, taps), the fixed-point weights (22 fractional bits) of inputs lo .. lo +
    taps - 1, zero past each output's own count (taps = the largest count). Indices past the input's
    end only ever get a zero weight.
    """
    scale = float(in_size) / out_size  # (double)(in1 - in0) / outSize, box (0, in_size)
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support, widened when shrinking
    inv_filterscale = 1.0 / filterscale  # Pillow multiplies by the inverse (a division rounds differently)
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # astype truncates toward zero, like (int)
    hi = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    count = hi - lo
    taps = int(count.max())
    weights = np.zeros((out_size, taps), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(taps):  # the weights and their sum, in Pillow's order (np.sum would sum pairwise)
        x = ((lo + j).astype(np.float64) - center + 0.5) * inv_filterscale
        w = np.where(j < count, np.maximum(1.0 - np.abs(x), 0.0), 0.0)  # bilinear_filter
        weights[:, j] = w
        total = total + w
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    one = float(1 << PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + weights * one), np.trunc(0.5 + weights * one))
    return (torch.from_numpy(lo.astype(np.int32)), torch.from_numpy(fixed.astype(np.int32)))


@functools.lru_cache(maxsize=256)
def _coefficients_on(in_size: int, out_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    lo, coef = resample_coefficients(in_size, out_size)
    return lo.to(device), coef.to(device)


# ---------------------------------------------------------------------------------------------------
# Alpha premultiplication ("LA" / "RGBA": Pillow resizes "La" / "RGBa")
# ---------------------------------------------------------------------------------------------------
def premultiply_alpha(image: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W), alpha last -> contiguous uint8 (C, H, W): colour * alpha / 255, rounded as
    Pillow's MULDIV255 (``t = v * a + 128; ((t >> 8) + t) >> 8``); alpha unchanged."""
    alpha = image[-1:].to(torch.int32)
    t = image[:-1].to(torch.int32) * alpha + 128
    colour = ((t >> 8) + t) >> 8
    return torch.cat([colour.to(torch.uint8), image[-1:]], dim=0)


def unpremultiply_alpha(image: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`premultiply_alpha` as Pillow's ``rgba2rgbA`` / ``la2lA``: colour = min(255 *
    colour // alpha, 255), unchanged where alpha is 0 or 255. Writes ``out`` when given."""
    alpha = image[-1:].to(torch.int32)
    colour = image[:-1].to(torch.int32)
    divided = torch.clamp((255 * colour) // torch.where(alpha == 0, 1, alpha), max=255)
    colour = torch.where((alpha == 0) | (alpha == 255), colour, divided)
    result = torch.cat([colour.to(torch.uint8), image[-1:]], dim=0)
    if out is None:
        return result
    return out.copy_(result)


def _has_alpha(channels: int) -> bool:
    return channels in (2, 4)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _resample_pass_kernel(
    in_ptr, out_ptr, lo_ptr, coef_ptr,
    out_height, out_width, in_size, taps,
    stride_c, stride_h, stride_w,
    tiles_w, tiles_per_channel,
    HORIZONTAL: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """One BLOCK_Y x BLOCK_X tile of one channel of out (C, out_height, out_width) contiguous, one of
    Pillow's passes over in (C, rows, cols); ``in_size`` is the length of the axis it resamples:
    along W (HORIZONTAL) out[c, y, x] = clip8((2^21 + sum_j in[c, y, lo[x] + j] * coef[x, j]) >> 22),
    along H out[c, y, x] = clip8((2^21 + sum_j in[c, lo[y] + j, x] * coef[y, j]) >> 22)."""
    pid = tl.program_id(0)
    channel = pid // tiles_per_channel
    tile = pid % tiles_per_channel
    y = (tile // tiles_w) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    x = (tile % tiles_w) * BLOCK_X + tl.arange(0, BLOCK_X)
    y_ok = y < out_height
    x_ok = x < out_width
    ok = y_ok[:, None] & x_ok[None, :]
    if HORIZONTAL:
        out_index, out_index_ok = x, x_ok
        fixed_offsets = (y.to(tl.int64) * stride_h)[:, None]  # the rows, read as they are
    else:
        out_index, out_index_ok = y, y_ok
        fixed_offsets = (x.to(tl.int64) * stride_w)[None, :]  # the columns, read as they are
    lo = tl.load(lo_ptr + out_index, mask=out_index_ok, other=0)
    channel_start = in_ptr + channel.to(tl.int64) * stride_c + fixed_offsets
    acc = tl.full((BLOCK_Y, BLOCK_X), 1 << 21, tl.int32)  # Pillow's ss = 1 << (PRECISION_BITS - 1)
    for j in range(taps):
        weight = tl.load(coef_ptr + out_index * taps + j, mask=out_index_ok, other=0)
        source = tl.minimum(lo + j, in_size - 1)  # past an output's own count the weight is 0
        if HORIZONTAL:
            pixels = tl.load(channel_start + (source * stride_w)[None, :], mask=ok, other=0)
            acc += pixels.to(tl.int32) * weight[None, :]
        else:
            pixels = tl.load(channel_start + (source.to(tl.int64) * stride_h)[:, None], mask=ok, other=0)
            acc += pixels.to(tl.int32) * weight[:, None]
    value = tl.minimum(tl.maximum(acc >> 22, 0), 255)  # clip8(ss) = clip(ss >> PRECISION_BITS)
    offsets = (channel.to(tl.int64) * out_height + y[:, None]) * out_width + x[None, :]
    tl.store(out_ptr + offsets, value.to(tl.uint8), mask=ok)


def _resample_pass_triton(image: torch.Tensor, out: torch.Tensor, lo: torch.Tensor, coef: torch.Tensor,
                          horizontal: bool) -> None:
    """out (C, rows, cols) <- image (C, H, W) resampled along W (``horizontal``) or along H; lo and
    coef index that axis of image."""
    channels, out_height, out_width = out.shape
    tiles_w = triton.cdiv(out_width, BLOCK_COLS)
    tiles_per_channel = triton.cdiv(out_height, BLOCK_ROWS) * tiles_w
    _resample_pass_kernel[(channels * tiles_per_channel,)](
        image, out, lo, coef,
        out_height, out_width, image.shape[2 if horizontal else 1], coef.shape[1],
        image.stride(0), image.stride(1), image.stride(2),
        tiles_w, tiles_per_channel,
        HORIZONTAL=horizontal, BLOCK_Y=BLOCK_ROWS, BLOCK_X=BLOCK_COLS, num_warps=4,
        **dispatch.TRITON_LAUNCH_OPTIONS,
    )


def _output_like(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    return torch.empty((image.shape[0], new_h, new_w), dtype=torch.uint8, device=image.device)


def _pillow_orders_passes() -> bool:
    """True when the installed Pillow (13 or newer) chooses the pass order by the sizes."""
    try:
        import PIL
        return int(PIL.__version__.split(".")[0]) >= 13
    except (ImportError, ValueError):
        return True


INSTALLED_PILLOW_ORDERS_PASSES = _pillow_orders_passes()


def pillow_horizontal_first(height: int, width: int, new_h: int, new_w: int) -> bool:
    """Pillow 13's pass order for a whole-image resize: the vertical pass runs first when the height
    shrinks by more than twice as many pixels as the width does, ``H - new_h > max(0, 2 * (W - new_w))``;
    otherwise the horizontal pass runs first (as it always did before Pillow 13). The order changes
    the result: the first pass's output is rounded to uint8 before the second pass reads it."""
    return not (height - new_h > 0 and height - new_h > 2 * (width - new_w))


def resample_passes(height: int, width: int, new_h: int, new_w: int, horizontal_first: bool):
    """The passes to run, in order: "h" (along W) when the width changes, "v" when the height does."""
    passes = (["h"] if new_w != width else []) + (["v"] if new_h != height else [])
    return passes if horizontal_first else passes[::-1]


def pil_bilinear_resize_triton(image: torch.Tensor, new_h: int, new_w: int, horizontal_first: bool = True,
                               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton launcher (same signature as the op; ``out`` lets tests pass a poisoned buffer).

    image uint8 (C, H, W), any strides; returns ``out``, uint8 (C, new_h, new_w) contiguous.
    """
    channels, height, width = image.shape
    if out is None:
        out = _output_like(image, new_h, new_w)
    if not out.is_contiguous() or tuple(out.shape) != (channels, new_h, new_w) or out.dtype != torch.uint8:
        raise ValueError(f"out must be a contiguous uint8 ({channels}, {new_h}, {new_w}) tensor")
    if (new_h, new_w) == (height, width):
        return out.copy_(image)
    alpha = _has_alpha(channels)
    source = premultiply_alpha(image) if alpha else image
    passes = resample_passes(height, width, new_h, new_w, horizontal_first)
    with torch.cuda.device(image.device) if image.is_cuda else contextlib.nullcontext():
        for index, which in enumerate(passes):
            rows = source.shape[1] if which == "h" else new_h
            cols = new_w if which == "h" else source.shape[2]
            last = index == len(passes) - 1
            # The last pass writes ``out`` unless the alpha division still has to follow.
            target = out if last and not alpha else torch.empty((channels, rows, cols), dtype=torch.uint8,
                                                                device=image.device)
            coefficients = (_coefficients_on(width, new_w, image.device) if which == "h"
                            else _coefficients_on(height, new_h, image.device))
            _resample_pass_triton(source, target, *coefficients, horizontal=which == "h")
            source = target
    if alpha:
        unpremultiply_alpha(source, out=out)
    return out


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch reference
# ---------------------------------------------------------------------------------------------------
def resample_pass_reference(image: torch.Tensor, lo: torch.Tensor, coef: torch.Tensor, dim: int) -> torch.Tensor:
    """One of Pillow's 8-bit passes along ``dim`` of image uint8 (C, H, W), vectorised over all outputs:
    one gather and one int32 multiply-add per tap."""
    size = image.shape[dim]
    shape = list(image.shape)
    shape[dim] = lo.shape[0]
    weight_shape = [1, 1, 1]
    weight_shape[dim] = lo.shape[0]
    acc = torch.full(shape, 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    for j in range(coef.shape[1]):
        source = torch.clamp(lo + j, max=size - 1).to(torch.int64)
        acc += image.index_select(dim, source).to(torch.int32) * coef[:, j].reshape(weight_shape)
    return torch.clamp(acc >> PRECISION_BITS, 0, 255).to(torch.uint8)


def pil_bilinear_resize_reference(image: torch.Tensor, new_h: int, new_w: int,
                                  horizontal_first: bool = True) -> torch.Tensor:
    """Pillow's fixed-point bilinear resize in plain PyTorch (any device): uint8 (C, H, W) ->
    uint8 (C, new_h, new_w) contiguous; ``horizontal_first`` orders the two passes."""
    channels, height, width = image.shape
    if (new_h, new_w) == (height, width):
        return image.clone(memory_format=torch.contiguous_format)
    alpha = _has_alpha(channels)
    result = premultiply_alpha(image) if alpha else image
    for which in resample_passes(height, width, new_h, new_w, horizontal_first):
        if which == "h":
            result = resample_pass_reference(result, *_coefficients_on(width, new_w, image.device), dim=2)
        else:
            result = resample_pass_reference(result, *_coefficients_on(height, new_h, image.device), dim=1)
    if alpha:
        result = unpremultiply_alpha(result)
    return result.contiguous()


# ---------------------------------------------------------------------------------------------------
# CPU: Pillow itself
# ---------------------------------------------------------------------------------------------------
_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def pillow12_horizontal_first(height: int, width: int) -> bool:
    """Pillow 12's pass order: horizontal first unless the source is more than 100 times taller than
    wide (measured against Pillow 12.3 over random sizes: the switch is exactly at ``H > 100 * W``)."""
    return not height > 100 * width


def installed_pillow_horizontal_first(height: int, width: int, new_h: int, new_w: int) -> bool:
    """The pass order of the Pillow installed here for this resize."""
    if INSTALLED_PILLOW_ORDERS_PASSES:
        return pillow_horizontal_first(height, width, new_h, new_w)
    return pillow12_horizontal_first(height, width)


def pillow_can_run(image: torch.Tensor, new_h: int, new_w: int, horizontal_first: bool) -> bool:
    """True when Pillow's own resize gives this call's result: a CPU image and the installed Pillow's
    pass order (or a single pass, where the order does not matter)."""
    channels, height, width = image.shape
    if image.device.type != "cpu" or channels not in _PIL_MODES:
        return False
    return (height == new_h or width == new_w
            or horizontal_first == installed_pillow_horizontal_first(height, width, new_h, new_w))


def pil_bilinear_resize_pillow(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """``Image.fromarray(hwc).resize((new_w, new_h), BILINEAR)`` of a CPU uint8 (C, H, W) image:
    Pillow's own C code, several times faster than the torch passes on CPU (bit-equal by definition)."""
    from PIL import Image

    channels = image.shape[0]
    array = image.permute(1, 2, 0).contiguous().numpy()
    pil_image = Image.fromarray(array[:, :, 0] if channels == 1 else array)  # L, LA, RGB or RGBA
    resized = np.asarray(pil_image.resize((new_w, new_h), Image.BILINEAR))
    if channels == 1:
        resized = resized[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def pil_bilinear_resize_cpu(image: torch.Tensor, new_h: int, new_w: int,
                            horizontal_first: bool = True) -> torch.Tensor:
    """The "torch" backend: Pillow's own resize where it gives the asked result (CPU, the installed
    Pillow's pass order), else the plain PyTorch reference."""
    if pillow_can_run(image, new_h, new_w, horizontal_first):
        if (new_h, new_w) == tuple(image.shape[1:]):
            return image.clone(memory_format=torch.contiguous_format)
        return pil_bilinear_resize_pillow(image, new_h, new_w)
    return pil_bilinear_resize_reference(image, new_h, new_w, horizontal_first)


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("sed_fast::pil_bilinear_resize", mutates_args=())
def _pil_bilinear_resize_op(image: torch.Tensor, new_h: int, new_w: int, horizontal_first: bool) -> torch.Tensor:
    args = (image, new_h, new_w, horizontal_first)
    return dispatch.resolve(OP_NAME, image.device, args=args)(*args)


@_pil_bilinear_resize_op.register_fake
def _(image, new_h, new_w, horizontal_first):
    return _output_like(image, new_h, new_w)


dispatch.register_impl(OP_NAME, "torch", pil_bilinear_resize_cpu)
dispatch.register_impl(OP_NAME, "triton", pil_bilinear_resize_triton)


def _check_inputs(image, size) -> Tuple[int, int]:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"pil_bilinear_resize expects a tensor image, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"pil_bilinear_resize expects a uint8 image (Pillow's 8-bit modes), got {image.dtype}")
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"image must have 1 to {MAX_CHANNELS} channels (L, LA, RGB, RGBA), got C={channels}")
    if height == 0 or width == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    if not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"size must be (new_h, new_w), got {size!r}")
    new_h, new_w = size
    for name, value in (("new_h", new_h), ("new_w", new_w)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"size must hold integers, got {name}={value!r}")
        if value < 1:
            raise ValueError(f"size must be at least 1x1, got {name}={value}")
    return int(new_h), int(new_w)


def pil_bilinear_resize(image: torch.Tensor, size: Sequence[int],
                        horizontal_first: Optional[bool] = None) -> torch.Tensor:
    """Resize like ``PIL.Image.fromarray(hwc).resize((new_w, new_h), PIL.Image.BILINEAR)``, bit for bit.

    Args:
        image: uint8 (C, H, W), C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA); any strides (a permuted HWC
            image is read in place), any device.
        size: (new_h, new_w), each >= 1. Up- and downscaling (Pillow's bilinear antialiases when shrinking).
        horizontal_first: the order of the two passes, which changes some pixels by one level when
            both dimensions change. None (default): that of the Pillow installed here, so the result
            equals what detectron2 computes on this machine (Pillow >= 13: :func:`pillow_horizontal_first`;
            before 13, such as the Pillow of the original SED evaluation: horizontal first); True:
            always horizontal first; False: always vertical first.

    Returns:
        uint8 (C, new_h, new_w) contiguous, a new tensor (a copy when the size is unchanged).
    """
    new_h, new_w = _check_inputs(image, size)
    if horizontal_first is None:
        horizontal_first = installed_pillow_horizontal_first(image.shape[1], image.shape[2], new_h, new_w)
    return _pil_bilinear_resize_op(image, new_h, new_w, bool(horizontal_first))


# ---------------------------------------------------------------------------------------------------
# Cost model (FLOPs as torch.utils.flop_counter counts the reference: fixed-point blends are
# elementwise and count none; least bytes moved)
# ---------------------------------------------------------------------------------------------------
def cost(image: torch.Tensor, new_h: int, new_w: int, horizontal_first: bool = True) -> Cost:
    """sed_fast::pil_bilinear_resize: no FLOPs; reads the uint8 image once, writes the resized one once."""
    return Cost(0, nbytes(image) + image.shape[0] * new_h * new_w * image.element_size())


register_op_cost(f"sed_fast::{OP_NAME}", cost)


# ---------------------------------------------------------------------------------------------------
# Example inputs (doctor, benchmarks, compile report, tests)
# ---------------------------------------------------------------------------------------------------
#: Shapes of :func:`example_inputs`: "small", and "model": the official test-time resize of a
#: 1920x1080 photo to a 640 shortest edge.
EXAMPLE_SHAPES = {"small": dict(height=37, width=53, new_h=20, new_w=29),
                  "model": dict(height=1080, width=1920, new_h=640, new_w=1138)}


def example_inputs(device="cpu", dtype: torch.dtype = torch.uint8, size: str = "small",
                   generator: Optional[torch.Generator] = None, empty: bool = False,
                   **shape) -> Tuple[torch.Tensor, int, int, bool]:
    """Arguments of one ``sed_fast::pil_bilinear_resize``
    call (as its reference and backends take them): ``(image, new_h, new_w, horizontal_first)``:
    a random uint8 RGB image (a view of an HWC array, as a decoded photo is; the dtype is always
    uint8) and the pass order the installed Pillow uses for these sizes."""
    s = dict(EXAMPLE_SHAPES[size], **shape)
    generator = generator or torch.Generator().manual_seed(0)
    hwc = (s["height"], s["width"], 3)
    image = torch.empty(hwc, dtype=torch.uint8) if empty else torch.randint(0, 256, hwc, dtype=torch.uint8,
                                                                             generator=generator)
    first = installed_pillow_horizontal_first(s["height"], s["width"], s["new_h"], s["new_w"])
    return image.to(device).permute(2, 0, 1), s["new_h"], s["new_w"], first
