"""The ops' cost models, collected in one registry that FlopCounterMode and the profiler read.

Each op file states the cost of one call of its op (forward and backward ops alike) as a function of
the op's own arguments, and registers it here with :func:`register_op_cost`:

* **FLOPs**, counted the way ``torch.utils.flop_counter`` counts the op's plain PyTorch reference:
  2 per multiply-add of the matmuls and convolutions; elementwise work (norms, softmax-like maps,
  biases, comparisons) counts none. So ``FlopCounterMode`` over the fast model and over the
  reference agree wherever the algorithms agree. Registering also hands the FLOPs to
  ``torch.utils.flop_counter.register_flop_formula``, so ``FlopCounterMode`` counts the custom
  ops (opaque to it otherwise).
* **bytes**: the least traffic the op must make: each input read once, each output written once
  (what a fused kernel moves; the roofline's memory side).

The profiler's interface (``sed_fast.kernels.costs``):

* ``cost_of_call(op, *args, **kwargs) -> Cost(flops, bytes)`` for ``op`` a registered name such as
  ``"sed_fast::cost_map"``, ``"sed_fast::cost_map_backward"`` or ``"mkldnn::_linear_pointwise"``
  (the name in the op's schema, ``func._schema.name`` in a dispatch mode); ``None`` if unknown;
* ``registered_ops()`` the names;
* ``REFERENCE_DIFFERENCES`` and ``reference_difference(stage)``: where the fast model's count
  differs from the reference's by design, per stage, with the reason (printable data).
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula


@dataclass(frozen=True)
class Cost:
    """One call's work: FLOPs (2 per multiply-add of its matmuls and convolutions) and the least bytes moved."""
    flops: int
    bytes: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class OpCost:
    """A registered cost model: ``of_call`` takes the op's arguments as the dispatcher passes them."""
    op: str
    of_call: Callable[..., Cost]


_REGISTRY: Dict[str, OpCost] = {}


def nbytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes of these tensors' elements (None counts nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def register_op_cost(op: str, of_call: Callable[..., Cost]) -> Callable[..., Cost]:
    """Register ``of_call(*op_args, **op_kwargs) -> Cost`` for ``op`` ("namespace::name") and its FLOPs
    with ``torch.utils.flop_counter`` (every overload). Registering the same op again replaces the
    entry here and leaves torch's formula (which calls the entry) as it was."""
    _REGISTRY[op] = OpCost(op, of_call)
    namespace, name = op.split("::")
    packet = getattr(getattr(torch.ops, namespace), name)
    if packet not in flop_registry:
        def flops_formula(*args, out_val=None, **kwargs) -> int:
            return _REGISTRY[op].of_call(*args, **kwargs).flops
        register_flop_formula(packet, get_raw=True)(flops_formula)
    return of_call


def cost_of_call(op: str, *args, **kwargs) -> Optional[Cost]:
    """The cost of one call of ``op`` with these arguments, or None when ``op`` has no cost model."""
    entry = _REGISTRY.get(op)
    return None if entry is None else entry.of_call(*args, **kwargs)


def registered_ops() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def cost_model(op: str) -> Optional[Callable[..., int]]:
    """FLOPs of a call of ``sed_fast::<op>`` (``op`` without namespace), or None: the older, FLOPs-only view."""
    entry = _REGISTRY.get(op if "::" in op else f"sed_fast::{op}")
    if entry is None:
        return None
    return lambda *args, **kwargs: entry.of_call(*args, **kwargs).flops


def matmul_flops(rows: int, inner: int, cols: int) -> int:
    """(rows x inner) @ (inner x cols): 2 per multiply-add, as torch's counter counts mm/bmm."""
    return 2 * rows * inner * cols


@dataclass(frozen=True)
class StageDifference:
    """A stage of the fast model whose FLOPs differ from the reference's by design.

    ``stages``: an fnmatch pattern of stage names (those of :mod:`sed_fast.base.stages`, which the
    fast model marks and ``sed_fast.bench.instrument`` gives the reference); ``fast_count``: "fewer"
    (the fast model does less of the same work) or "none" (it skips the work); ``reason``: why, in
    a sentence the profiler can print under its table.
    """
    stages: str
    fast_count: str
    reason: str


#: Every stage where ``FlopCounterMode`` over the fast model differs from the reference at the same
#: configuration (exact decoding). Everywhere else the counts are equal: the ops' formulas count what
#: torch counts over their references (class attention is the linear form in both models).
REFERENCE_DIFFERENCES: Tuple[StageDifference, ...] = (
    StageDifference(
        "decoder*.double_conv", "fewer",
        "The first 3x3 convolution reads the image guidance, which is the same for every class: the fast "
        "model convolves it once per image and broadcast-adds the result, where the reference convolves "
        "it repeated T times; (T-1)/T of that part's FLOPs are saved (2 * (T-1) * 2H*2W * g * C_out * 9 "
        "per image)."),
    StageDifference(
        "aux_head*", "none",
        "With exact decoding (no category early rejection) nothing reads the auxiliary heads' logits: the "
        "fast model does not compute them, the reference does."),
)


def reference_difference(stage: str) -> Optional[StageDifference]:
    """The documented difference for this stage name, or None where the counts should be equal."""
    return next((d for d in REFERENCE_DIFFERENCES if fnmatchcase(stage, d.stages)), None)
