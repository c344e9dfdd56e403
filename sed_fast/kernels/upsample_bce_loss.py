"""The SED training loss, fused: bilinear upsampling, one-hot targets, BCE-with-logits, mean.

``upsample_bce_loss(logits, labels, ignore_value)``: logits (B, T, h, w), labels (B, H, W) int64 ->
the scalar

    mean over (b, t, y, x) of BCEWithLogits(u[b, t, y, x], labels[b, y, x] == t)
    u = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)

where an ignored pixel (``labels == ignore_value``) has all-zero targets: the official SED loss
(``sed_model.py``), without materialising u or the targets (at 171 classes and 768x768, ~400 MB
each per image). Since the targets are one-hot, the sum is ``sum softplus(u) - sum u[label]``;
the gradient is ``(sigmoid(u) - onehot) / N`` taken back through the bilinear weights.

Backends: ``torch`` (any device; float64 too): over chunks of classes of one image at a time, at
most :data:`CHUNK_BYTES` of upsampled logits; ``triton``: one program per tile of output pixels
and image, looping over the classes (the 4 source logits of each pixel read from L2), partial sums
per program; the backward recomputes u and scatters ``(sigmoid(u) - onehot) / N`` onto the 4
source logits with float32 atomics. ``upsample_bce_loss_reference`` is the official formula.
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
from ._autograd import save_inputs

OP_NAME = "upsample_bce_loss"
BACKWARD_OP_NAME = "upsample_bce_loss_backward"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Bytes of upsampled logits the torch backend holds at a time.
CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _source(dst, scale, size_in):
    """PyTorch's bilinear source index (align_corners=False): (i0, i1, weight of i1)."""
    src = (dst.to(tl.float32) + 0.5) * scale - 0.5
    src = tl.maximum(src, 0.0)
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i1 = tl.minimum(i0 + 1, size_in - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _output_pixels(labels_ptr, in_h, in_w, out_h, out_w, scale_h, scale_w, stride_lb, stride_ly, stride_lx,
                   BLOCK: tl.constexpr):
    """This program's BLOCK output pixels of its image: (image, mask, label, y0, y1, ly, x0, x1, lx),
    the source rows and columns with the weights of y1 and x1."""
    image = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < out_h * out_w
    y = offs // out_w
    x = offs % out_w
    y0, y1, ly = _source(y, scale_h, in_h)
    x0, x1, lx = _source(x, scale_w, in_w)
    label = tl.load(labels_ptr + image.to(tl.int64) * stride_lb + y * stride_ly + x * stride_lx, mask=mask, other=0)
    return image, mask, label, y0, y1, ly, x0, x1, lx


@triton.jit
def _corners(y0, y1, x0, x1, stride_y, stride_x):
    """Offsets of the four source pixels (y0, x0), (y0, x1), (y1, x0), (y1, x1)."""
    return (y0 * stride_y + x0 * stride_x, y0 * stride_y + x1 * stride_x,
            y1 * stride_y + x0 * stride_x, y1 * stride_y + x1 * stride_x)


@triton.jit
def _bilinear(plane, a00, a01, a10, a11, ly, lx, mask):
    """u, the upsampled logit of one class at the pixels, in fp32, from its four source logits."""
    v00 = tl.load(plane + a00, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(plane + a01, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(plane + a10, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(plane + a11, mask=mask, other=0.0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@triton.jit(do_not_specialize=["num_classes", "ignore_value"])
def _forward_kernel(logits_ptr, labels_ptr, partial_ptr,
                    num_classes, in_h, in_w, out_h, out_w, scale_h, scale_w, ignore_value,
                    stride_b, stride_t, stride_y, stride_x, stride_lb, stride_ly, stride_lx,
                    BLOCK: tl.constexpr):
    image, mask, label, y0, y1, ly, x0, x1, lx = _output_pixels(
        labels_ptr, in_h, in_w, out_h, out_w, scale_h, scale_w, stride_lb, stride_ly, stride_lx, BLOCK)
    base = logits_ptr + image.to(tl.int64) * stride_b
    a00, a01, a10, a11 = _corners(y0, y1, x0, x1, stride_y, stride_x)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, num_classes):
        u = _bilinear(base + t * stride_t, a00, a01, a10, a11, ly, lx, mask)
        softplus = tl.maximum(u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))
        positive = (label == t) & (label != ignore_value)
        acc += tl.where(mask, softplus - tl.where(positive, u, 0.0), 0.0)
    tl.store(partial_ptr + image * tl.num_programs(0) + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["num_classes", "ignore_value"])
def _backward_kernel(logits_ptr, labels_ptr, grad_ptr, scale_ptr,
                     num_classes, in_h, in_w, out_h, out_w, scale_h, scale_w, ignore_value,
                     stride_b, stride_t, stride_y, stride_x, stride_lb, stride_ly, stride_lx,
                     BLOCK: tl.constexpr):
    image, mask, label, y0, y1, ly, x0, x1, lx = _output_pixels(
        labels_ptr, in_h, in_w, out_h, out_w, scale_h, scale_w, stride_lb, stride_ly, stride_lx, BLOCK)
    g = tl.load(scale_ptr)  # d loss / d sum: grad_output / N
    base = logits_ptr + image.to(tl.int64) * stride_b
    a00, a01, a10, a11 = _corners(y0, y1, x0, x1, stride_y, stride_x)
    # grad is a contiguous float32 (B, T, h, w)
    gbase = grad_ptr + image.to(tl.int64) * num_classes * in_h * in_w
    g00, g01, g10, g11 = _corners(y0, y1, x0, x1, in_w, 1)
    w00 = (1.0 - ly) * (1.0 - lx)
    w01 = (1.0 - ly) * lx
    w10 = ly * (1.0 - lx)
    w11 = ly * lx
    for t in range(0, num_classes):
        u = _bilinear(base + t * stride_t, a00, a01, a10, a11, ly, lx, mask)
        positive = (label == t) & (label != ignore_value)
        d = (tl.sigmoid(u) - tl.where(positive, 1.0, 0.0)) * g
        gplane = gbase + t * in_h * in_w
        tl.atomic_add(gplane + g00, d * w00, mask=mask)
        tl.atomic_add(gplane + g01, d * w01, mask=mask)
        tl.atomic_add(gplane + g10, d * w10, mask=mask)
        tl.atomic_add(gplane + g11, d * w11, mask=mask)


_BLOCK = 256


def _launch_args(logits, labels, out_h, out_w):
    batch, classes, in_h, in_w = logits.shape
    return (classes, in_h, in_w, out_h, out_w, float(in_h) / out_h, float(in_w) / out_w), \
        (*logits.stride(), *labels.stride())


def upsample_bce_loss_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> torch.Tensor:
    batch = logits.shape[0]
    out_h, out_w = labels.shape[-2:]
    sizes, strides = _launch_args(logits, labels, out_h, out_w)
    blocks = triton.cdiv(out_h * out_w, _BLOCK)
    partial = torch.empty((batch, blocks), device=logits.device, dtype=torch.float32)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _forward_kernel[(blocks, batch)](logits, labels, partial, *sizes[:7], int(ignore_value), *strides,
                                         BLOCK=_BLOCK, **dispatch.TRITON_LAUNCH_OPTIONS)
    return partial.sum() / (logits.shape[0] * logits.shape[1] * out_h * out_w)


def upsample_bce_loss_backward_triton(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                                      ignore_value: int) -> torch.Tensor:
    batch, classes = logits.shape[:2]
    out_h, out_w = labels.shape[-2:]
    sizes, strides = _launch_args(logits, labels, out_h, out_w)
    blocks = triton.cdiv(out_h * out_w, _BLOCK)
    out = torch.zeros(logits.shape, device=logits.device, dtype=torch.float32)
    scale = (grad.float() / (batch * classes * out_h * out_w)).reshape(1)
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        _backward_kernel[(blocks, batch)](logits, labels, out, scale, *sizes[:7], int(ignore_value), *strides,
                                          BLOCK=_BLOCK, **dispatch.TRITON_LAUNCH_OPTIONS)
    return out.to(logits.dtype)


def _triton_reasons(*args, **kwargs):
    logits = args[0] if args else kwargs.get("logits")
    if len(args) == 4:  # the backward: (grad, logits, labels, ignore_value)
        logits = args[1]
    return [] if logits.dtype in TRITON_DTYPES else [f"the Triton kernels take 16/32-bit floats, not {logits.dtype}"]


# ---------------------------------------------------------------------------------------------------
# PyTorch: chunked (the "torch" backend) and the official formula (the reference)
# ---------------------------------------------------------------------------------------------------
def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(logits: torch.Tensor, out_h: int, out_w: int):
    """(image, first class, end class) ranges of at most CHUNK_BYTES of upsampled logits."""
    step = max(1, CHUNK_BYTES // max(1, 8 * out_h * out_w))
    for b in range(logits.shape[0]):
        for first in range(0, logits.shape[1], step):
            yield b, first, min(logits.shape[1], first + step)


def _upsampled(logits, b, first, end, size):
    return F.interpolate(logits[b:b + 1, first:end].to(_opmath(logits.dtype)), size=size, mode="bilinear",
                         align_corners=False)[0]


def _positive(labels_b: torch.Tensor, first: int, end: int, ignore_value: int) -> torch.Tensor:
    """One-hot (end-first, H, W) bool of one image's labels for classes [first, end)."""
    classes = torch.arange(first, end, device=labels_b.device).view(-1, 1, 1)
    return (labels_b[None] == classes) & (labels_b[None] != ignore_value)


def upsample_bce_loss_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> torch.Tensor:
    size = tuple(labels.shape[-2:])
    total = torch.zeros((), device=logits.device, dtype=_opmath(logits.dtype))
    for b, first, end in _chunks(logits, *size):
        u = _upsampled(logits, b, first, end, size)
        softplus = u.clamp_min(0) + torch.log1p(torch.exp(-u.abs()))
        total = total + softplus.sum() - u[_positive(labels[b], first, end, ignore_value)].sum()
    return total / (logits.shape[0] * logits.shape[1] * size[0] * size[1])


def upsample_bce_loss_backward_torch(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                                     ignore_value: int) -> torch.Tensor:
    size = tuple(labels.shape[-2:])
    batch, classes, in_h, in_w = logits.shape
    opmath = _opmath(logits.dtype)
    scale = grad.to(opmath) / (batch * classes * size[0] * size[1])
    out = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    for b, first, end in _chunks(logits, *size):
        u = _upsampled(logits, b, first, end, size)
        d = (torch.sigmoid(u) - _positive(labels[b], first, end, ignore_value).to(opmath)) * scale
        back = torch.ops.aten.upsample_bilinear2d_backward(d[None], list(size), [1, end - first, in_h, in_w],
                                                           False)
        out[b, first:end] = back[0].to(logits.dtype)
    return out


def upsample_bce_loss_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """The official formula (``sed_model.py``), full-size logits and targets in float32 (float64
    for float64 logits)."""
    classes = logits.shape[1]
    out = F.interpolate(logits.to(_opmath(logits.dtype)), size=tuple(labels.shape[-2:]), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1)
    mask = labels != ignore_value
    targets = torch.zeros(out.shape, device=out.device, dtype=out.dtype)
    targets[mask] = F.one_hot(labels[mask], num_classes=classes).to(out.dtype)
    return F.binary_cross_entropy_with_logits(out, targets)


# ---------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------
def _loss_like(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty((), dtype=_opmath(logits.dtype))


@torch.library.custom_op("sed_fast::upsample_bce_loss", mutates_args=())
def _upsample_bce_loss_op(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> torch.Tensor:
    args = (logits, labels, ignore_value)
    return dispatch.resolve(OP_NAME, logits.device, args=args)(*args)


@_upsample_bce_loss_op.register_fake
def _(logits, labels, ignore_value):
    return _loss_like(logits)


@torch.library.custom_op("sed_fast::upsample_bce_loss_backward", mutates_args=())
def _upsample_bce_loss_backward_op(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                                   ignore_value: int) -> torch.Tensor:
    args = (grad, logits, labels, ignore_value)
    return dispatch.resolve(BACKWARD_OP_NAME, logits.device, args=args)(*args)


@_upsample_bce_loss_backward_op.register_fake
def _(grad, logits, labels, ignore_value):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _backward(ctx, grad):
    return _upsample_bce_loss_backward_op(grad, *ctx.saved_tensors, *ctx.constants), None, None


_upsample_bce_loss_op.register_autograd(_backward, setup_context=save_inputs)

dispatch.register_impl(OP_NAME, "torch", upsample_bce_loss_torch)
dispatch.register_impl(OP_NAME, "triton", upsample_bce_loss_triton, not_supported_reasons=_triton_reasons)
dispatch.register_impl(BACKWARD_OP_NAME, "torch", upsample_bce_loss_backward_torch)
dispatch.register_impl(BACKWARD_OP_NAME, "triton", upsample_bce_loss_backward_triton,
                       not_supported_reasons=_triton_reasons)


def _check_inputs(logits, labels, ignore_value) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("upsample_bce_loss expects tensors logits and labels")
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, T, h, w), got shape {tuple(logits.shape)}")
    if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B, H, W) with B={logits.shape[0]}, got shape {tuple(labels.shape)}")
    if logits.numel() == 0 or labels.numel() == 0:
        raise ValueError(f"empty input: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} (the mean "
                         "of no elements is undefined)")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"upsample_bce_loss supports float32, bfloat16, float16, float64 logits; got {logits.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class indices, got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device}, logits on {logits.device}")
    if isinstance(ignore_value, bool) or not isinstance(ignore_value, int):
        raise TypeError(f"ignore_value must be an int, got {ignore_value!r}")
    classes = logits.shape[1]
    bad = (labels != ignore_value) & ((labels < 0) | (labels >= classes))
    if bool(bad.any()):  # the kernels would count such pixels as all-negative: refuse instead
        raise ValueError(f"labels have {int(bad.sum())} values outside 0..{classes - 1} that are not "
                         f"ignore_value={ignore_value}")


def upsample_bce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int = 255) -> torch.Tensor:
    """The SED loss term of one output: BCE-with-logits of ``logits`` upsampled bilinearly
    (align_corners=False) to the labels' size against one-hot targets (zero where ``labels ==
    ignore_value``), the mean over B*T*H*W.

    Args:
        logits: (B, T, h, w) float32 / bfloat16 / float16 (float64: torch backend), any strides.
        labels: (B, H, W) int64 in 0..T-1 or ``ignore_value`` (checked: one host sync).
    Returns:
        A float32 scalar (float64 for float64 logits), differentiable in ``logits``.
    """
    _check_inputs(logits, labels, ignore_value)
    return _upsample_bce_loss_op(logits, labels, int(ignore_value))


# ---------------------------------------------------------------------------------------------------
# Cost model (FLOPs as torch.utils.flop_counter counts the reference: the bilinear blend and the
# loss are elementwise and count none; least bytes moved)
# ---------------------------------------------------------------------------------------------------
def cost(logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> Cost:
    """sed_fast::upsample_bce_loss: no FLOPs (about 12 elementwise operations per upsampled logit);
    reads the logits and labels once, writes a scalar."""
    return Cost(0, nbytes(logits, labels) + 4)


def backward_cost(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> Cost:
    """sed_fast::upsample_bce_loss_backward: no FLOPs; reads the logits and labels, writes grad logits."""
    return Cost(0, nbytes(grad, logits, labels) + nbytes(logits))


register_op_cost(f"sed_fast::{OP_NAME}", cost)
register_op_cost(f"sed_fast::{BACKWARD_OP_NAME}", backward_cost)


# ---------------------------------------------------------------------------------------------------
# Example inputs (doctor, benchmarks, compile report, tests)
# ---------------------------------------------------------------------------------------------------
#: Shapes of :func:`example_inputs`: "small", and "model": SED-B training at 384 px crops
#: (logits at 96x96, 171 COCO-Stuff classes, batch 4).
EXAMPLE_SHAPES = {"small": dict(batch=2, classes=5, height=6, width=7, out_h=13, out_w=15, ignore_value=255),
                  "model": dict(batch=4, classes=171, height=96, width=96, out_h=384, out_w=384, ignore_value=255)}


def example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                   generator: Optional[torch.Generator] = None, **shape) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Arguments of one ``sed_fast::upsample_bce_loss``
    call (as its reference and backends take them): ``(logits, labels, ignore_value)``: random
    logits, int64 labels with a fifth of the pixels ignored."""
    s = dict(EXAMPLE_SHAPES[size], **shape)
    generator = generator or torch.Generator().manual_seed(0)
    logits = torch.randn(s["batch"], s["classes"], s["height"], s["width"], generator=generator)
    labels = torch.randint(0, s["classes"], (s["batch"], s["out_h"], s["out_w"]), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = s["ignore_value"]
    return logits.to(device, dtype), labels.to(device), s["ignore_value"]
