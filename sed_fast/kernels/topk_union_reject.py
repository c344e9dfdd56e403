"""Category early rejection on the device: per-pixel top-k classes, their union per image.

``topk_union_reject(aux_logits, k) -> (kept_mask, flat_idx, class_offsets)``; aux_logits (B, T, h, w).
For each image b and pixel, the k classes with the largest logit; their union over the pixels of
image b is the kept set of image b. Outputs:

* ``kept_mask`` (B, T) bool;
* ``flat_idx`` (B*T,) int32: global indices b*T + t of the kept classes, image by image, ascending,
  compacted to the front, the rest -1;
* ``class_offsets`` (B+1,) int32: exclusive prefix sum of the per-image kept counts
  (``class_offsets[-1]`` = total kept; reading it is the one host sync the model needs).

Rules (the same in the kernel and the reference):

* Ties: a class is kept at a pixel iff its logit >= the k-th largest logit at that pixel, so when
  several classes tie at the k-th place all of them are kept (a superset of what any argsort would
  choose). On tie-free inputs the result equals the official ``argsort(...)[:, :k]`` + ``bincount``.
* -inf marks an absent class (rejected by an earlier step): it is never kept, and it does not take
  a top-k place; a pixel with fewer than k finite logits keeps all of them. This is the official
  behaviour, where the argsort only sees the surviving classes.
* NaN logits are treated like -inf (never kept, never take a place); no error is raised because
  checking would need a host sync. +inf is an ordinary (largest) value.
* k > T keeps every present class; k < 1 and T = 0 raise ``ValueError``; B = 0 or h*w = 0 give
  well-formed outputs that keep nothing.

The Triton path is three small launches: (1) per pixel, the k-th largest logit (k passes over the
classes, each finding the next distinct value below the current threshold and how many classes
hold it: registers only, no sort); (2) per class block, whether any pixel keeps it; (3) one program
that compacts the mask into ``flat_idx`` and ``class_offsets`` with block prefix sums.

``gather_rows(x, flat_idx, total)`` returns ``x[flat_idx[:total]]`` (the kept classes' rows) in the
memory format of x (contiguous or channels-last); out-of-range indices give zero rows on the
Triton path (checking would need a host sync) and an error on the reference path.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import dispatch
from .costs import Cost, register_op_cost
from ._examples import normal
from ._layout import pixel_strides

OP_NAME = "topk_union_reject"
GATHER_OP_NAME = "gather_rows"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_classes", "num_pixels", "rounds", "stride_b", "stride_t"])
def _kth_largest_kernel(
    aux_ptr, threshold_ptr,
    num_classes, num_pixels, rounds,
    stride_b, stride_t, stride_pix,
    BLOCK_T: tl.constexpr, BLOCK_PIX: tl.constexpr,
):
    """threshold[b, pixel] = the rounds-th largest present logit (or the smallest present one)."""
    pid_pix = tl.program_id(0)
    image = tl.program_id(1)
    offs_pix = pid_pix * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    mask_pix = offs_pix < num_pixels
    base = aux_ptr + image.to(tl.int64) * stride_b + offs_pix[None, :] * stride_pix

    # threshold: the smallest value found so far; count: classes >= threshold. Each round finds the
    # next distinct value below the threshold and how many classes hold it (ties count fully).
    threshold = tl.full((BLOCK_PIX,), float("inf"), tl.float32)
    count = tl.zeros((BLOCK_PIX,), tl.int32)
    for _ in range(0, rounds):
        best = tl.full((BLOCK_PIX,), float("-inf"), tl.float32)
        best_count = tl.zeros((BLOCK_PIX,), tl.int32)
        for t0 in range(0, num_classes, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            x = tl.load(base + offs_t[:, None] * stride_t,
                        mask=(offs_t < num_classes)[:, None] & mask_pix[None, :],
                        other=float("-inf")).to(tl.float32)
            # present: > -inf (NaN compares false); first round: also values equal to +inf.
            below = (x < threshold[None, :]) | ((x == threshold[None, :]) & (count == 0)[None, :])
            candidate = (x > float("-inf")) & below
            x = tl.where(candidate, x, float("-inf"))
            block_best = tl.max(x, axis=0)
            block_count = tl.sum((candidate & (x == block_best[None, :])).to(tl.int32), axis=0)
            best_count = tl.where(block_best > best, block_count,
                                  tl.where(block_best == best, best_count + block_count, best_count))
            best = tl.maximum(best, block_best)
        grow = (count < rounds) & (best > float("-inf"))
        threshold = tl.where(grow, best, threshold)
        count = tl.where(grow, count + best_count, count)
    tl.store(threshold_ptr + image.to(tl.int64) * num_pixels + offs_pix, threshold, mask=mask_pix)


@triton.jit(do_not_specialize=["num_classes", "num_pixels", "stride_b", "stride_t"])
def _union_kernel(
    aux_ptr, threshold_ptr, kept_ptr,
    num_classes, num_pixels,
    stride_b, stride_t, stride_pix,
    BLOCK_T: tl.constexpr, BLOCK_PIX: tl.constexpr,
):
    """kept[b, t] = any pixel where logit >= threshold and the class is present."""
    pid_t = tl.program_id(0)
    image = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < num_classes
    base = aux_ptr + image.to(tl.int64) * stride_b + offs_t[:, None] * stride_t
    keep = tl.zeros((BLOCK_T,), tl.int32)
    for p0 in range(0, num_pixels, BLOCK_PIX):
        offs_pix = p0 + tl.arange(0, BLOCK_PIX)
        mask_pix = offs_pix < num_pixels
        x = tl.load(base + offs_pix[None, :] * stride_pix, mask=mask_t[:, None] & mask_pix[None, :],
                    other=float("-inf")).to(tl.float32)
        threshold = tl.load(threshold_ptr + image.to(tl.int64) * num_pixels + offs_pix, mask=mask_pix,
                            other=float("inf"))
        kept_here = (x >= threshold[None, :]) & (x > float("-inf"))
        keep = tl.maximum(keep, tl.max(kept_here.to(tl.int32), axis=1))
    tl.store(kept_ptr + image * num_classes + offs_t, keep.to(tl.uint8), mask=mask_t)


@triton.jit(do_not_specialize=["num_images", "num_classes"])
def _compact_kernel(kept_ptr, flat_idx_ptr, offsets_ptr, num_images, num_classes, BLOCK: tl.constexpr):
    """One program: flat_idx = kept global indices in order then -1; offsets = prefix counts."""
    first = tl.arange(0, 1)
    running = tl.zeros((1,), tl.int32)
    tl.store(offsets_ptr + first, running)
    for image in range(0, num_images):
        for t0 in range(0, num_classes, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            mask = offs < num_classes
            flat = image * num_classes + offs
            keep = tl.load(kept_ptr + flat, mask=mask, other=0).to(tl.int32)
            position = tl.sum(running, axis=0) + tl.cumsum(keep, axis=0) - 1
            tl.store(flat_idx_ptr + position, flat, mask=mask & (keep != 0))
            running += tl.sum(keep, axis=0)
        tl.store(offsets_ptr + image + 1 + first, running)
    total = tl.sum(running, axis=0)
    for i0 in range(0, num_images * num_classes, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        tl.store(flat_idx_ptr + offs, tl.full((BLOCK,), -1, tl.int32),
                 mask=(offs < num_images * num_classes) & (offs >= total))


@triton.jit(do_not_specialize=["row_numel", "stride_x_row", "num_rows"])
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, row_numel, stride_x_row, num_rows, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_numel
    source = tl.load(idx_ptr + row).to(tl.int64) + tl.zeros((BLOCK,), tl.int64)
    valid = (source >= 0) & (source < num_rows)  # out of range: a zero row, not a wild read
    values = tl.load(x_ptr + source * stride_x_row + offs, mask=mask & valid, other=0)
    tl.store(out_ptr + row.to(tl.int64) * row_numel + offs, values, mask=mask)


def _device_context(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _new_outputs(aux_logits: torch.Tensor):
    batch, classes = aux_logits.shape[:2]
    device = aux_logits.device
    return (torch.empty((batch, classes), dtype=torch.bool, device=device),
            torch.empty((batch * classes,), dtype=torch.int32, device=device),
            torch.empty((batch + 1,), dtype=torch.int32, device=device))


def topk_union_reject_triton(aux_logits: torch.Tensor, k: int,
                             out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None):
    """Triton launcher (same signature as the op; ``out`` lets tests pass poisoned buffers)."""
    batch, classes, height, width = aux_logits.shape
    num_pixels = height * width
    strides = pixel_strides(aux_logits)
    if strides is None:
        aux_logits = aux_logits.contiguous()
        strides = pixel_strides(aux_logits)
    kept_mask, flat_idx, offsets = out if out is not None else _new_outputs(aux_logits)
    threshold = torch.empty((batch, num_pixels), dtype=torch.float32, device=aux_logits.device)
    rounds = min(k, classes)

    # Pixel blocks sized for about 128 programs: with fixed 64-pixel blocks a 24x24 map would get
    # only 9 programs, each looping over all T classes k times.
    block_pix = max(16, min(64, triton.next_power_of_2(triton.cdiv(num_pixels * batch, 128))))
    block_t = max(16, min(64, triton.next_power_of_2(classes)))
    with _device_context(aux_logits):
        _kth_largest_kernel[(triton.cdiv(num_pixels, block_pix), batch)](
            aux_logits, threshold, classes, num_pixels, rounds, *strides,
            BLOCK_T=block_t, BLOCK_PIX=block_pix, num_warps=4, **dispatch.TRITON_LAUNCH_OPTIONS)
        union_block_pix = max(16, min(128, triton.next_power_of_2(num_pixels)))
        union_block_t = max(16, min(32, triton.next_power_of_2(classes)))
        _union_kernel[(triton.cdiv(classes, union_block_t), batch)](
            aux_logits, threshold, kept_mask.view(torch.uint8), classes, num_pixels, *strides,
            BLOCK_T=union_block_t, BLOCK_PIX=union_block_pix, num_warps=4, **dispatch.TRITON_LAUNCH_OPTIONS)
        _compact_kernel[(1,)](
            kept_mask.view(torch.uint8), flat_idx, offsets, batch, classes,
            BLOCK=max(16, min(1024, triton.next_power_of_2(classes))), num_warps=4, **dispatch.TRITON_LAUNCH_OPTIONS)
    return kept_mask, flat_idx, offsets


def _row_memory_format(x: torch.Tensor):
    """The memory format in which each row x[i] is dense, or None (then x is copied)."""
    rest = x.shape[1:]
    candidates = [torch.contiguous_format]
    if x.dim() == 4:  # prefer channels-last when x is channels-last (and not also contiguous)
        candidates = ([torch.channels_last, torch.contiguous_format] if not x.is_contiguous()
                      else [torch.contiguous_format, torch.channels_last])
    for memory_format in candidates:
        expected = torch.empty((1, *rest), device="meta", memory_format=memory_format).stride()[1:]
        if all(size == 1 or stride == want for size, stride, want in zip(rest, x.stride()[1:], expected)):
            return memory_format
    return None


def _gather_output(x: torch.Tensor, total: int) -> torch.Tensor:
    memory_format = _row_memory_format(x) or torch.contiguous_format
    return torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=memory_format)


def gather_rows_triton(x: torch.Tensor, flat_idx: torch.Tensor, total: int,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton launcher (same signature as the op; ``out`` lets tests pass a NaN-poisoned buffer)."""
    if _row_memory_format(x) is None:
        x = x.contiguous()
    if out is None:
        out = _gather_output(x, total)
    row_numel = out[0].numel() if total > 0 else 0
    if total == 0 or row_numel == 0:
        return out
    source = x.view(torch.uint8) if x.dtype == torch.bool else x
    target = out.view(torch.uint8) if out.dtype == torch.bool else out
    block = max(16, min(4096, triton.next_power_of_2(row_numel)))
    with _device_context(x):
        _gather_rows_kernel[(total, triton.cdiv(row_numel, block))](
            source, flat_idx, target, row_numel, x.stride(0), x.shape[0],
            BLOCK=block, num_warps=4 if block <= 1024 else 8, **dispatch.TRITON_LAUNCH_OPTIONS)
    return out


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch references
# ---------------------------------------------------------------------------------------------------
def topk_union_reject_reference(aux_logits: torch.Tensor, k: int):
    """The rule above with torch.topk; compaction by a stable sort, so no host sync either."""
    batch, classes = aux_logits.shape[:2]
    logits = aux_logits.flatten(2).float()  # (B, T, h*w)
    logits = torch.where(torch.isnan(logits), float("-inf"), logits)  # NaN: absent
    kth_largest = logits.topk(min(k, classes), dim=1).values[:, -1:]  # (B, 1, h*w)
    kept_mask = ((logits >= kth_largest) & (logits > float("-inf"))).any(dim=2)  # (B, T)

    counts = kept_mask.sum(dim=1, dtype=torch.int32)
    offsets = torch.zeros(batch + 1, dtype=torch.int32, device=aux_logits.device)
    offsets[1:] = counts.cumsum(0)
    flat_kept = kept_mask.flatten()
    order = torch.argsort((~flat_kept).to(torch.int8), stable=True)  # kept first, ascending
    slot = torch.arange(batch * classes, device=aux_logits.device)
    flat_idx = torch.where(slot < offsets[-1], order, -1).to(torch.int32)
    return kept_mask, flat_idx, offsets


def gather_rows_reference(x: torch.Tensor, flat_idx: torch.Tensor, total: int) -> torch.Tensor:
    """x[flat_idx[:total]] by index_select, in x's row memory format."""
    rows = torch.index_select(x, 0, flat_idx[:total].long())
    memory_format = _row_memory_format(x) or torch.contiguous_format
    return rows.contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("sed_fast::topk_union_reject", mutates_args=())
def _topk_union_reject_op(aux_logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, classes, height, width = aux_logits.shape
    if batch * height * width == 0:  # no image or no pixel: nothing is kept
        kept_mask, flat_idx, offsets = _new_outputs(aux_logits)
        return kept_mask.fill_(False), flat_idx.fill_(-1), offsets.fill_(0)
    args = (aux_logits, k)
    return tuple(dispatch.resolve(OP_NAME, aux_logits.device, args=args)(*args))


@_topk_union_reject_op.register_fake
def _(aux_logits, k):
    return _new_outputs(aux_logits)


@torch.library.custom_op("sed_fast::gather_rows", mutates_args=())
def _gather_rows_op(x: torch.Tensor, flat_idx: torch.Tensor, total: int) -> torch.Tensor:
    args = (x, flat_idx, total)
    return dispatch.resolve(GATHER_OP_NAME, x.device, args=args)(*args)


@_gather_rows_op.register_fake
def _(x, flat_idx, total):
    return _gather_output(x, total)


def _gather_setup_context(ctx, inputs, output):
    x, flat_idx, total = inputs
    ctx.save_for_backward(flat_idx)
    ctx.total, ctx.x_meta = total, torch.empty_like(x, device="meta")


def _gather_backward(ctx, grad):
    """Each gathered row's gradient goes back to its source row (summed over repeats); plain
    differentiable torch ops, so the fast model trains with rejection on too."""
    (flat_idx,) = ctx.saved_tensors
    grad_x = torch.zeros_like(ctx.x_meta, device=grad.device, dtype=grad.dtype)  # x's strides
    return grad_x.index_add_(0, flat_idx[:ctx.total].long(), grad), None, None


_gather_rows_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)

dispatch.register_impl(OP_NAME, "torch", topk_union_reject_reference)
dispatch.register_impl(OP_NAME, "triton", topk_union_reject_triton)
dispatch.register_impl(GATHER_OP_NAME, "torch", gather_rows_reference)
dispatch.register_impl(GATHER_OP_NAME, "triton", gather_rows_triton)


def topk_union_reject(aux_logits: torch.Tensor, k: int):
    """Category early rejection (see the module docstring for the tie, -inf and NaN rules).

    Args:
        aux_logits: (B, T, h, w), float32 / bfloat16 / float16; -inf marks an absent class.
        k: classes kept per pixel, >= 1 (k > T keeps every present class).

    Returns:
        kept_mask (B, T) bool, flat_idx (B*T,) int32, class_offsets (B+1,) int32.
    """
    if not isinstance(aux_logits, torch.Tensor):
        raise TypeError(f"aux_logits must be a tensor, got {type(aux_logits).__name__}")
    if aux_logits.dim() != 4:
        raise ValueError(f"aux_logits must be (B, T, h, w), got shape {tuple(aux_logits.shape)}")
    if aux_logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"topk_union_reject supports float32, bfloat16, float16; got {aux_logits.dtype}")
    check_topk(k)
    if aux_logits.shape[1] == 0:
        raise ValueError("aux_logits has T = 0 classes")
    return _topk_union_reject_op(aux_logits, k)


def check_topk(k, what: str = "k") -> None:
    """The one check of a top-k: an int >= 1 (``what`` names it in the error)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{what} must be an int >= 1, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise ValueError(f"{what} must be >= 1, got {k}")


def gather_rows(x: torch.Tensor, flat_idx: torch.Tensor, total: int) -> torch.Tensor:
    """``x[flat_idx[:total]]``: the rows of the kept classes, in x's memory format.

    Args:
        x: (N, *rest), any real dtype; contiguous or channels-last rows are read in place.
        flat_idx: 1-D int32 / int64 row indices on x's device; only the first ``total`` are used.
        total: number of rows to gather (0 <= total <= len(flat_idx)).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(flat_idx, torch.Tensor):
        raise TypeError("gather_rows expects tensors x and flat_idx")
    if x.dim() < 1:
        raise ValueError("x must have a row dimension")
    if x.is_complex():
        raise TypeError(f"gather_rows does not support complex tensors, got {x.dtype}")
    if flat_idx.dim() != 1:
        raise ValueError(f"flat_idx must be 1-D, got shape {tuple(flat_idx.shape)}")
    if flat_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"flat_idx must be int32 or int64, got {flat_idx.dtype}")
    if flat_idx.device != x.device:
        raise ValueError(f"flat_idx is on {flat_idx.device}, x is on {x.device}")
    if isinstance(total, bool) or not isinstance(total, int):
        raise TypeError(f"total must be an int, got {type(total).__name__}")
    if not 0 <= total <= flat_idx.shape[0]:
        raise ValueError(f"total={total} must be between 0 and len(flat_idx)={flat_idx.shape[0]}")
    return _gather_rows_op(x, flat_idx, total)


# ---------------------------------------------------------------------------------------------------
# Cost models (FLOPs as torch.utils.flop_counter counts the references: comparisons and copies
# count none; least bytes moved)
# ---------------------------------------------------------------------------------------------------
def bytes_moved(batch: int, classes: int, height: int, width: int, element_size: int = 2) -> int:
    """Read the logits once; the outputs (B*T bool + B*T int32 + (B+1) int32) are minor.

    element_size * B*T*h*w + 5 * B*T + 4 * (B + 1)
    """
    return element_size * batch * classes * height * width + 5 * batch * classes + 4 * (batch + 1)


def gather_bytes_moved(total: int, row_numel: int, element_size: int = 2) -> int:
    """Read and write each gathered row once: 2 * total * row_numel * element_size."""
    return 2 * total * row_numel * element_size


def cost(aux_logits: torch.Tensor, k: int) -> Cost:
    """sed_fast::topk_union_reject: no FLOPs (about k + 1 comparisons per logit); see :func:`bytes_moved`."""
    return Cost(0, bytes_moved(*aux_logits.shape, element_size=aux_logits.element_size()))


def gather_cost(x: torch.Tensor, flat_idx: torch.Tensor, total: int) -> Cost:
    """sed_fast::gather_rows: no FLOPs; reads the indices and each gathered row once, writes them once."""
    row_numel = x[0].numel() if x.shape[0] else 0
    return Cost(0, gather_bytes_moved(total, row_numel, x.element_size()) + 4 * total)


register_op_cost(f"sed_fast::{OP_NAME}", cost)
register_op_cost(f"sed_fast::{GATHER_OP_NAME}", gather_cost)


# ---------------------------------------------------------------------------------------------------
# Example inputs (doctor, benchmarks, compile report, tests)
# ---------------------------------------------------------------------------------------------------
#: Shapes of :func:`example_inputs`: "small", and "model": SED-B's first rejection at 768 px
#: (24x24 aux logits, 150 classes, the official k = 8; 32 rows gathered at C = 128).
EXAMPLE_SHAPES = {"small": dict(batch=2, classes=7, height=5, width=6, k=3, channels=16, kept=4),
                  "model": dict(batch=1, classes=150, height=24, width=24, k=8, channels=128, kept=32)}


def distinct_logits(batch: int, classes: int, height: int, width: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logits without ties (a random permutation of the classes at each pixel, scaled into [-2, 2)),
    so every implementation keeps the same classes."""
    generator = generator or torch.Generator().manual_seed(0)
    return torch.rand(batch, classes, height, width, generator=generator).argsort(dim=1).float() / classes * 4 - 2


def example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                   generator: Optional[torch.Generator] = None, empty: bool = False,
                   **shape) -> Tuple[torch.Tensor, int]:
    """Arguments of one ``sed_fast::topk_union_reject``
    call (as its reference and backends take them): ``(aux_logits, k)``, without ties."""
    s = dict(EXAMPLE_SHAPES[size], **shape)
    if empty:
        return normal((s["batch"], s["classes"], s["height"], s["width"]), generator, device, dtype, empty), s["k"]
    logits = distinct_logits(s["batch"], s["classes"], s["height"], s["width"], generator)
    return logits.to(device, dtype), s["k"]


def gather_example_inputs(device="cpu", dtype: torch.dtype = torch.float32, size: str = "small",
                          generator: Optional[torch.Generator] = None, empty: bool = False,
                          **shape) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Arguments of one ``sed_fast::gather_rows``
    call (as its reference and backends take them): ``(x, flat_idx, total)``: channels-last rows, the
    first ``kept`` entries of flat_idx sorted distinct rows and the rest -1, as the rejection leaves them."""
    s = dict(EXAMPLE_SHAPES[size], **shape)
    generator = generator or torch.Generator().manual_seed(0)
    rows, kept = s["batch"] * s["classes"], min(s["kept"], s["batch"] * s["classes"])
    x = normal((rows, s["channels"], s["height"], s["width"]), generator, device, dtype, empty)
    flat_idx = torch.full((rows,), -1, dtype=torch.int32)
    flat_idx[:kept] = torch.randperm(rows, generator=generator)[:kept].sort().values.to(torch.int32)
    return x.contiguous(memory_format=torch.channels_last), flat_idx.to(device), kept
