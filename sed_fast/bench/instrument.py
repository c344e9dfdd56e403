"""Benchmark instrumentation: stage names for a model without ``stage()`` calls, FLOP and byte
counts per stage, and the forced-keep rejection rule.

* :func:`instrument` names the stages of the reference model (method wrappers, restored on exit)
  and adds the ``text`` stage to any model; stage names are the fast model's, so both can be
  compared line by line.
* :class:`OpCounter` attributes the FLOPs and bytes of every dispatched op to the active stage.
* :class:`ForcedKeep` keeps a fixed number of classes at every rejection step.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch

from ..base import stages
from .common import blas_name, dtype_name
from ..kernels import cost_model
from ..base.stages import stage

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
    own ``stage()`` calls (the reference: ``marks_stages`` false) gets, with the fast model's stage
    names: ``image_encoder``, ``cost_map``, ``conv1``, ``decoder_guidance``,
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
    if not getattr(model, "marks_stages", False):
        dec = model.decoder
        level = {"i": 0}

        def rejecting() -> bool:
            return getattr(model, "rejection", None) is not None

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
        if getattr(model, "rejection", None) is not None:
            wrap_method(model.rejection, "keep_mask", lambda: f"reject{level['i']}")
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

#: Ops that multiply (a stage that runs one of them must show FLOPs); custom ``sed_fast::`` ops too.
MULTIPLYING_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution",
                   "_linear_pointwise", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention",
                   "_scaled_dot_product_flash_attention_for_cpu", "einsum", "conv2d", "mkldnn_convolution"}

#: sed_fast ops that only move data (gathers, the official resize's interpolation, which torch's
#: counter does not count for its own interpolations either): no FLOPs expected.
MOVING_OPS = {"gather_rows", "pil_bilinear_resize"}


def linear_pointwise_flops(x, weight, *args, **kwargs) -> int:
    """FLOPs of ``mkldnn::_linear_pointwise(x, weight, bias, ...)`` (the oneDNN-routed linear): those of
    the same ``F.linear``, 2 per multiply-add; the bias add and fused activation are not counted,
    as torch's ``addmm`` formula does not count them."""
    out_features = weight.shape[0] if weight.dim() == 2 else weight.shape[-1]
    return 2 * (x.numel() // x.shape[-1]) * x.shape[-1] * out_features


def _cost_registry():
    """The kernels' cost registry (``sed_fast.kernels.costs``: ``cost_of_call(op, *args) -> Cost(flops,
    bytes)`` by schema name, ``REFERENCE_DIFFERENCES``), or None in a version without one: then
    FLOPs come from torch's formulas and :func:`sed_fast.kernels.cost_model`, bytes from tensor sizes."""
    try:
        from ..kernels import costs
    except ImportError:
        return None
    return costs


def explained_differences(stage_names) -> Optional[List[Dict[str, str]]]:
    """The cost registry's documented reasons why the fast model's FLOPs differ from the reference's
    (``stages``, ``fast_count``, ``reason``, and ``in_this_profile``: whether a stage of
    ``stage_names`` matches: a stage only one model runs explains a difference of totals too);
    None when the registry documents none."""
    from fnmatch import fnmatchcase

    registry = _cost_registry()
    documented = getattr(registry, "REFERENCE_DIFFERENCES", None) if registry is not None else None
    if documented is None:
        return None
    names = list(stage_names)
    return [{"stages": str(d.stages), "fast_count": str(getattr(d, "fast_count", "")), "reason": str(d.reason),
             "in_this_profile": any(fnmatchcase(name, d.stages) for name in names)} for d in documented]


class OpCounter(_TorchDispatchMode):
    """Counts FLOPs and bytes of each dispatched op, per active stage (``"(none)"`` outside stages),
    and which library or backend ran each multiplying op.

    FLOPs: the formulas of ``torch.utils.flop_counter`` (what ``FlopCounterMode`` counts with,
    including every formula registered with ``register_flop_formula``, e.g. the sed_fast kernels'),
    then the kernels' own cost models for a custom op without a registered formula, and the
    oneDNN-routed linears (``mkldnn::_linear_pointwise``) as the ``F.linear`` they replace;
    elementwise ops count no FLOPs. An op that multiplies but has no formula is listed in
    ``uncounted``. Bytes: the op's least bytes from the kernels' cost registry
    (``sed_fast.kernels.costs.cost_of_call``) where it has the op, else the
    sizes of the tensors it reads and writes (views move nothing), i.e. the traffic of an unfused
    execution; ``bytes_source`` counts the ops of each kind per stage. ``paths``: per stage, how
    many calls went where (``linear: oneDNN``, ``matmul: MKL``, ``class_attention: cpu`` ...).
    Use inside :func:`recording` so that stages are known.
    """

    def __init__(self, device=None):
        super().__init__()

        self.flops: Dict[str, float] = defaultdict(float)
        self.bytes: Dict[str, float] = defaultdict(float)
        self.ops: Dict[str, int] = defaultdict(int)
        self.paths: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.bytes_source: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.uncounted: Dict[str, set] = defaultdict(set)
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self._blas = "cuBLAS" if self.cuda else blas_name()
        self._costs = _cost_registry()
        try:
            from torch.utils.flop_counter import flop_registry
            self._registry = flop_registry
        except ImportError:  # pragma: no cover
            self._registry = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        recorder = stages.active_recorder()
        name = (recorder.current() if recorder is not None else None) or "(none)"
        try:
            self._count(name, func, args, kwargs, out)
        except Exception:  # noqa: BLE001 - counting must never break the forward
            pass
        return out

    def _path(self, namespace: str, base: str, args, kwargs) -> str:
        """Where a multiplying op ran: the library, or the sed_fast backend dispatch picks."""
        if namespace == "mkldnn":
            return "linear: oneDNN"
        if namespace == "sed_fast":
            from ..kernels import dispatch
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            try:
                return f"{base}: {dispatch.resolve_name(base, device, tuple(args), dict(kwargs))}"
            except Exception:  # noqa: BLE001 - an op dispatch does not know (a backward, a helper)
                return f"{base}: sed_fast"
        if base in ("convolution", "_convolution", "conv2d", "mkldnn_convolution"):
            return "conv: cuDNN" if self.cuda else "conv: torch CPU (oneDNN or native, as torch picks)"
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), torch.float32)
        if not self.cuda and dtype in (torch.bfloat16, torch.float16):
            return f"matmul: torch {dtype_name(dtype)} GEMM (oneDNN where the CPU has it)"
        return f"matmul: {self._blas}"

    def _count(self, name, func, args, kwargs, out) -> None:
        op_name = func._schema.name if hasattr(func, "_schema") else str(func)
        namespace, _, base = op_name.rpartition("::")
        self.ops[name] += 1
        if getattr(func, "is_view", False) or base in _NO_TRAFFIC:
            return
        packet = getattr(func, "_overloadpacket", None)
        flops = None
        if packet in self._registry:
            flops = self._registry[packet](*args, **kwargs, out_val=out)
        elif namespace == "sed_fast" and cost_model(base) is not None:
            flops = cost_model(base)(*args, **kwargs)
        elif namespace == "mkldnn" and base == "_linear_pointwise":
            flops = linear_pointwise_flops(*args, **kwargs)
        multiplies = (namespace == "sed_fast" and base not in MOVING_OPS) or base in MULTIPLYING_OPS
        if flops:
            self.flops[name] += float(flops)
        elif multiplies and flops is None:
            self.uncounted[name].add(op_name)
        if multiplies or namespace == "sed_fast":
            self.paths[name][self._path(namespace, base, args, kwargs)] += 1
        modeled = None
        if self._costs is not None:
            try:
                cost = self._costs.cost_of_call(op_name, *args, **kwargs)
                modeled = None if cost is None else cost.bytes
            except Exception:  # noqa: BLE001 - a model that cannot take these arguments: sizes below
                modeled = None
        if modeled is not None:
            self.bytes[name] += float(modeled)
            self.bytes_source[name]["bytes model"] += 1
            return
        reads = [v for k, v in kwargs.items() if k != "out"]
        moved = _tensor_bytes(list(args)) + _tensor_bytes(reads) + _tensor_bytes(out)
        if base in ("zeros", "zeros_like", "full", "full_like", "ones", "ones_like", "fill_", "zero_", "arange",
                    "new_zeros", "new_full", "new_ones", "scalar_tensor"):
            moved = _tensor_bytes(out)
        self.bytes[name] += float(moved)
        self.bytes_source[name]["tensor sizes"] += 1


# -------------------------------------------------------------------------------------------------
# Forced rejection (benchmarks only)
# -------------------------------------------------------------------------------------------------
class ForcedKeep:
    """A rejection rule for benchmarks: keep the ``num_kept`` classes whose best pixel scores
    highest, at every rejection step (``model.rejection = ForcedKeep(32)``).

    Random weights make the official top-k rule keep almost every class; this rule gives the fixed,
    realistic amount of work of a trained model instead. Same interface as
    :class:`sed_fast.models.rejection.TopKUnion`.
    """

    def __init__(self, num_kept: int):
        if isinstance(num_kept, bool) or not isinstance(num_kept, int) or num_kept < 1:
            raise ValueError(f"num_kept must be an int >= 1, got {num_kept!r}")
        self.num_kept = num_kept

    def keep_mask(self, aux_logits: torch.Tensor) -> torch.Tensor:
        """aux_logits (1, T, h, w) -> (T,) bool."""
        best = aux_logits[0].flatten(1).amax(dim=1)
        keep = torch.zeros_like(best, dtype=torch.bool)
        keep[best.topk(min(self.num_kept, best.numel())).indices] = True
        return keep

    def select(self, aux_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """aux_logits (B, T, h, w), -inf for absent classes -> (flat_idx, class_offsets), per image,
        among the classes still present."""
        batch, classes = aux_logits.shape[:2]
        best = aux_logits.flatten(2).amax(dim=2)  # (B, T)
        keep = torch.zeros_like(best, dtype=torch.bool)
        keep.scatter_(1, best.topk(min(self.num_kept, classes), dim=1).indices, True)
        keep &= best > float("-inf")
        flat_idx = keep.flatten().nonzero()[:, 0].to(torch.int32)
        offsets = torch.zeros(batch + 1, dtype=torch.int32, device=aux_logits.device)
        offsets[1:] = keep.sum(1).cumsum(0)
        return flat_idx, offsets

    def __repr__(self) -> str:
        return f"ForcedKeep({self.num_kept})"
