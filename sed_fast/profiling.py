"""Named stages of a forward pass, for profiling.

Models wrap each stage in ``with stage("decoder1.dwconv"):``. By default this costs nothing. When a
recorder is active (``recording()``), each stage is also an NVTX range (CUDA, so Nsight tools
attribute time) and a ``torch.profiler.record_function`` range, and the recorder collects per-stage
times (CUDA events on GPU, wall clock on CPU).

Benchmark helpers (used by ``benchmarks.profile`` / ``benchmarks.e2e``, never by the models):

* :func:`instrument` names the stages of a model that has no ``stage()`` calls of its own (the
  reference: module hooks and method wrappers, restored on exit) and adds the ``text`` stage to any
  model; stage names are the fast model's, so both can be compared line by line.
* :class:`OpCounter` attributes the FLOPs and bytes of every dispatched op to the active stage.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch

_active: Optional["StageRecorder"] = None


class StageRecorder:
    """Collects (stage name -> list of elapsed milliseconds) while active."""

    def __init__(self, device: torch.device, nvtx: bool = True):
        self.device = torch.device(device)
        self.use_cuda = self.device.type == "cuda"
        self.nvtx = nvtx and self.use_cuda
        self._pending: List[tuple] = []   # (name, start, end) events or times
        self.order: List[str] = []
        self.stack: List[str] = []        # names of the stages open now, outermost first
        self.depths: Dict[str, int] = {}  # stage name -> smallest nesting depth it was seen at
        self.calls: Dict[str, int] = defaultdict(int)

    def current(self) -> Optional[str]:
        """The innermost open stage, or None."""
        return self.stack[-1] if self.stack else None

    def begin(self, name: str):
        if name not in self.order:
            self.order.append(name)
        self.depths[name] = min(self.depths.get(name, len(self.stack)), len(self.stack))
        self.calls[name] += 1
        self.stack.append(name)
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        profiler_range = torch.profiler.record_function(name)
        profiler_range.__enter__()
        if self.use_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        return name, start, profiler_range

    def end(self, token) -> None:
        name, start, profiler_range = token
        if self.use_cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        profiler_range.__exit__(None, None, None)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        elif name in self.stack:  # unbalanced (an exception inside a hook pair): drop to it
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name):]
        self._pending.append((name, start, end))

    def reset(self) -> None:
        """Forget the times recorded so far (keeps the stage order and depths)."""
        if self.use_cuda:
            torch.cuda.synchronize(self.device)
        self._pending.clear()
        self.calls.clear()

    def times_ms(self) -> Dict[str, List[float]]:
        """Per-stage elapsed times in ms (synchronises the device once)."""
        if self.use_cuda:
            torch.cuda.synchronize(self.device)
        out: Dict[str, List[float]] = defaultdict(list)
        for name, start, end in self._pending:
            out[name].append(start.elapsed_time(end) if self.use_cuda else (end - start) * 1e3)
        return dict(out)


@contextmanager
def recording(device, nvtx: bool = True):
    """Activate a :class:`StageRecorder` for the forward passes run inside the block."""
    global _active
    previous = _active
    _active = StageRecorder(device, nvtx=nvtx)
    try:
        yield _active
    finally:
        _active = previous


@contextmanager
def stage(name: str):
    """Mark a stage of the forward pass (a no-op unless a recorder is active)."""
    recorder = _active
    if recorder is None:
        yield
        return
    token = recorder.begin(name)
    try:
        yield
    finally:
        recorder.end(token)


def active_recorder() -> Optional[StageRecorder]:
    """The recorder of the enclosing :func:`recording` block, or None."""
    return _active


# -------------------------------------------------------------------------------------------------
# Naming the stages of a model without stage() calls (benchmarks only)
# -------------------------------------------------------------------------------------------------
def _wrap_callable(fn, name_of):
    """``fn`` run inside ``stage(name_of())``."""
    def wrapped(*args, **kwargs):
        with stage(name_of()):
            return fn(*args, **kwargs)
    wrapped.__wrapped__ = fn
    return wrapped


@contextmanager
def instrument(model):
    """Name the stages of ``model``'s forward for the active recorder (restored on exit).

    Every model gets a ``text`` stage (the per-forward text embedding lookup). A model without its
    own ``stage()`` calls (the reference, recognised by having no ``decode`` method) gets, with the
    fast model's stage names: ``image_encoder``, ``cost_map``, ``conv1``, ``decoder_guidance``,
    ``decoder{i}.corr_guidance``, ``decoder{i}.dwconv`` (depthwise conv + LayerNorm),
    ``decoder{i}.convnext_mlp``, ``decoder{i}.class_attention`` (the whole class transformer
    layer), ``decoder{i}.upsample``, ``decoder{i}.double_conv``, ``aux_head{i}`` (exact decoding)
    or ``reject{i}`` (aux head + rejection rule, with CER), ``head`` and ``resize``. What is left
    (input checks, the official boolean-index gathers, sigmoid, residual adds) is not in a stage.
    """
    undo = []

    def set_attr(obj, attr, value):
        had = attr in obj.__dict__
        old = obj.__dict__.get(attr)
        setattr(obj, attr, value)
        undo.append((obj, attr, had, old))

    def wrap_method(obj, attr, name_of):
        set_attr(obj, attr, _wrap_callable(getattr(obj, attr), name_of))

    def fixed(name):
        return lambda: name

    wrap_method(model, "_text_for_decoder", fixed("text"))
    if not hasattr(model, "decode"):
        from .models import decoder as decoder_module

        dec = model.decoder
        level = {"i": 0}

        def rejecting() -> bool:
            return getattr(model, "cer_topk", None) is not None or getattr(model, "force_kept_classes", None) is not None

        wrap_method(model, "encode_image", fixed("image_encoder"))
        wrap_method(dec, "cost_map", fixed("cost_map"))
        wrap_method(dec, "per_class", fixed("cost_map"))
        wrap_method(dec, "decoder_guidance", fixed("decoder_guidance"))
        wrap_method(dec.conv1, "forward", fixed("conv1"))
        for i, proj in enumerate(dec.decoder_corr_guidance_projection):
            wrap_method(proj, "forward", fixed(f"decoder{i + 1}.corr_guidance"))
        for i in (1, 2, 3):
            layer = getattr(dec, f"decoder{i}")
            wrap_method(layer.cnext.dwconv, "forward", fixed(f"decoder{i}.dwconv"))
            wrap_method(layer.cnext.norm, "forward", fixed(f"decoder{i}.dwconv"))
            for part in (layer.cnext.pwconv1, layer.cnext.act, layer.cnext.pwconv2):
                wrap_method(part, "forward", fixed(f"decoder{i}.convnext_mlp"))
            wrap_method(layer.attention, "forward", fixed(f"decoder{i}.class_attention"))
            wrap_method(layer.up, "forward", fixed(f"decoder{i}.upsample"))
            wrap_method(layer.conv, "forward", fixed(f"decoder{i}.double_conv"))
        for i in range(3):
            head = getattr(dec, f"head{i}")

            def head_name(i=i):
                level["i"] = i
                return f"reject{i}" if rejecting() else f"aux_head{i}"
            wrap_method(head, "forward", head_name)
        wrap_method(dec.head, "forward", fixed("head"))
        for rule in ("topk_union_keep", "forced_keep"):
            set_attr(decoder_module, rule, _wrap_callable(getattr(decoder_module, rule),
                                                          lambda: f"reject{level['i']}"))
    try:
        yield model
    finally:
        for obj, attr, had, old in reversed(undo):
            if had:
                obj.__dict__[attr] = old
            else:
                obj.__dict__.pop(attr, None)


# -------------------------------------------------------------------------------------------------
# FLOPs and bytes per stage (benchmarks only)
# -------------------------------------------------------------------------------------------------
def _custom_op_flops(name: str, args, kwargs) -> Optional[int]:
    """FLOPs of the sed_fast kernel ops (opaque to torch's flop counter)."""
    def shape(i):
        value = args[i] if i < len(args) else None
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    if name.endswith("cost_map"):
        (b, d, h, w), (t, p, _) = shape(0), shape(1)
        return 2 * b * h * w * t * p * d
    if name.endswith("dwconv_layernorm"):
        (n, c, h, w), weight = shape(0), shape(1)
        taps = weight[-1] * weight[-2] if weight and len(weight) >= 2 else 81
        return n * c * h * w * (2 * taps + 8)
    if name.endswith("class_attention"):
        rows, pixels, channels = shape(0)
        heads = args[4] if len(args) > 4 else kwargs.get("num_heads", 4)
        return 4 * rows * pixels * channels * (channels // int(heads))
    return None


_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
               "detach", "lift_fresh", "alias", "record_stream", "resize_", "set_", "is_same_size", "size",
               "stride", "sym_size", "sym_stride", "_to_copy_meta"}


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


try:
    from torch.utils._python_dispatch import TorchDispatchMode as _TorchDispatchMode
except ImportError:  # pragma: no cover - very old torch
    _TorchDispatchMode = object


class OpCounter(_TorchDispatchMode):
    """Counts FLOPs and bytes of each dispatched op, per active stage (``"(none)"`` outside stages).

    FLOPs: torch's own counter formulas (matmuls, convolutions, attention) and, for the sed_fast
    kernel ops, theirs (cost map matmul, 9x9 taps + LayerNorm, linear attention); elementwise ops
    count no FLOPs. Bytes: the sizes of the tensors each op reads and writes (views move nothing),
    i.e. the traffic of an unfused execution; a fused kernel op counts only its own inputs and
    outputs. Use inside :func:`recording` so that stages are known.
    """

    def __init__(self):
        super().__init__()
        self.flops: Dict[str, float] = defaultdict(float)
        self.bytes: Dict[str, float] = defaultdict(float)
        self.ops: Dict[str, int] = defaultdict(int)
        try:
            from torch.utils.flop_counter import flop_registry
            self._registry = flop_registry
        except ImportError:  # pragma: no cover
            self._registry = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        recorder = _active
        name = (recorder.current() if recorder is not None else None) or "(none)"
        try:
            self._count(name, func, args, kwargs, out)
        except Exception:  # noqa: BLE001 - counting must never break the forward
            pass
        return out

    def _count(self, name, func, args, kwargs, out) -> None:
        op_name = func._schema.name if hasattr(func, "_schema") else str(func)
        base = op_name.split("::")[-1]
        self.ops[name] += 1
        if getattr(func, "is_view", False) or base in _NO_TRAFFIC:
            return
        packet = getattr(func, "_overloadpacket", None)
        flops = None
        if packet in self._registry:
            flops = self._registry[packet](*args, **kwargs, out_val=out)
        elif not op_name.startswith("aten::"):
            flops = _custom_op_flops(op_name, args, kwargs)
        if flops:
            self.flops[name] += float(flops)
        reads = [v for k, v in kwargs.items() if k != "out"]
        moved = _tensor_bytes(list(args)) + _tensor_bytes(reads) + _tensor_bytes(out)
        if base in ("zeros", "zeros_like", "full", "full_like", "ones", "ones_like", "fill_", "zero_", "arange",
                    "new_zeros", "new_full", "new_ones", "scalar_tensor"):
            moved = _tensor_bytes(out)
        self.bytes[name] += float(moved)
