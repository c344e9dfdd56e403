"""Backend registry for the sed_fast ops.

Each op (``cost_map``, ``dwconv_layernorm``, ``class_attention``, ``topk_union_reject``...)
has up to three implementations:

* ``"torch"``  -- the plain PyTorch reference (always available, any device);
* ``"triton"`` -- the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"cuda"``   -- the hand-written CUDA C++ kernel from ``csrc/`` (CUDA tensors, extension built).

Kernel modules call :func:`register_impl` at import time; the op bodies call :func:`resolve`
to get the function to run. The choice per op comes from, in order: :func:`set_backend`,
the environment variable ``SED_FAST_BACKEND_<OP>`` (e.g. ``SED_FAST_BACKEND_COST_MAP``),
the environment variable ``SED_FAST_BACKEND``, and finally ``"auto"``.

``"auto"`` picks, on CUDA, the fastest available backend measured once per (op, device, input shape
bucket) by the hook installed with :func:`set_auto_chooser` (``sed_fast.kernels._autotune_backend``;
the op bodies pass their inputs to :func:`resolve`; until one is installed: cuda > triton > torch); on CPU
it picks ``"triton"`` when the Triton interpreter is on and ``"torch"`` otherwise.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")

# Options every Triton launch passes. FMA contraction on, stated rather than inherited: it is the
# default up to Triton 3.9, which warns that 3.10 turns it off unless asked; the kernels' accuracy
# (and the GPU machine's Triton 3.6) assume it.
TRITON_LAUNCH_OPTIONS = {"enable_fp_fusion": True}

_impls: Dict[str, Dict[str, Callable]] = {}
_cost_models: Dict[str, Callable[..., int]] = {}
_available: Dict[str, Dict[str, Callable[[torch.device], bool]]] = {}
_overrides: Dict[str, str] = {}
_auto_chooser: Optional[Callable[[str, torch.device, list], str]] = None


def triton_interpreter_on() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_interpreter_mode() -> bool:
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # noqa: BLE001 - no (usable) Triton: nothing runs interpreted
        return False

    def _probe():
        pass

    return isinstance(triton.jit(_probe), InterpretedFunction)


# Triton decides interpreted-or-compiled when a kernel is decorated, from TRITON_INTERPRET at that
# moment, and its own library functions were decorated when it was imported: probe once, now, as
# the kernel modules (imported right after this one) are decorated.
_INTERPRETER_MODE = _probe_interpreter_mode()


def triton_interpreter_mode() -> bool:
    """True when the Triton kernels were decorated in interpreter mode (TRITON_INTERPRET=1 at
    import): then every kernel runs interpreted, in the whole process, for every device."""
    return _INTERPRETER_MODE


def register_impl(op: str, backend: str, fn: Callable,
                  available: Optional[Callable[[torch.device], bool]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``available(device)`` tells whether this backend can run on that device; by default
    torch runs everywhere, triton on CUDA (or CPU under the interpreter), cuda on CUDA only.
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}; expected one of cuda, triton, torch")
    _impls.setdefault(op, {})[backend] = fn
    if available is None:
        available = _default_available(backend)
    _available.setdefault(op, {})[backend] = available


def _default_available(backend: str) -> Callable[[torch.device], bool]:
    if backend == "torch":
        return lambda device: True
    if backend == "triton":
        return lambda device: device.type == "cuda" or (
            device.type == "cpu" and triton_interpreter_mode() and triton_interpreter_on())
    return lambda device: device.type == "cuda"


def set_backend(op: str, backend: Optional[str]) -> None:
    """Force ``backend`` for ``op`` (``op="all"`` for every op); ``None`` clears the override."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    ops = list(_impls) if op == "all" else [op]
    for name in ops:
        if name not in _impls:
            raise ValueError(f"unknown op {name!r}; known ops: {', '.join(sorted(_impls))}")
        if backend is None:
            _overrides.pop(name, None)
        else:
            _overrides[name] = backend


def requested_backend(op: str) -> str:
    """The backend asked for ``op`` (may be ``"auto"``), before availability is checked."""
    if op in _overrides:
        return _overrides[op]
    value = os.environ.get(f"SED_FAST_BACKEND_{op.upper()}") or os.environ.get("SED_FAST_BACKEND") or "auto"
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"SED_FAST_BACKEND(_{op.upper()})={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def available_backends(op: str, device: torch.device) -> list:
    """Backends of ``op`` that can run on ``device``, in preference order cuda, triton, torch."""
    device = torch.device(device)
    return [b for b in ("cuda", "triton", "torch")
            if b in _impls.get(op, {}) and _available[op][b](device)]


def set_auto_chooser(chooser: Optional[Callable[..., str]]) -> None:
    """Install the function that ``"auto"`` uses on CUDA: ``chooser(op, device, candidates) -> backend``.

    When the caller of :func:`resolve` passes the call's inputs (``args``, ``kwargs``), the chooser
    is called as ``chooser(op, device, candidates, args, kwargs)`` so it can decide per input shape.
    """
    global _auto_chooser
    _auto_chooser = chooser


def resolve_name(op: str, device: torch.device, args: Optional[tuple] = None,
                 kwargs: Optional[dict] = None) -> str:
    """Name of the backend that will run ``op`` on ``device`` (``args``/``kwargs``: the call's
    inputs, optional, handed to the auto chooser)."""
    device = torch.device(device)
    if op not in _impls:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(_impls))}")
    wanted = requested_backend(op)
    candidates = available_backends(op, device)
    if wanted != "auto":
        if wanted not in candidates:
            raise RuntimeError(
                f"backend {wanted!r} was requested for op {op!r} but cannot run on {device} "
                f"(available here: {', '.join(candidates)})")
        return wanted
    if device.type == "cuda" and _auto_chooser is not None and len(candidates) > 1:
        if args is None and kwargs is None:
            return _auto_chooser(op, device, candidates)
        return _auto_chooser(op, device, candidates, tuple(args or ()), dict(kwargs or {}))
    return candidates[0]


def resolve(op: str, device: torch.device, args: Optional[tuple] = None,
            kwargs: Optional[dict] = None) -> Callable:
    """The implementation of ``op`` to run on ``device``; pass the call's inputs as ``args`` /
    ``kwargs`` so that ``"auto"`` can choose per input shape."""
    return _impls[op][resolve_name(op, device, args, kwargs)]


def register_cost_model(op: str, flops_of_call: Callable[..., int]) -> None:
    """Register ``flops_of_call(*op_args) -> int``: the FLOPs (or comparisons) of one call of ``op``,
    from the kernel's own cost model (profilers read it: custom ops are opaque to torch's counter)."""
    _cost_models[op] = flops_of_call


def cost_model(op: str) -> Optional[Callable[..., int]]:
    """The FLOP count of a call of ``op`` (see :func:`register_cost_model`), or None."""
    return _cost_models.get(op)
