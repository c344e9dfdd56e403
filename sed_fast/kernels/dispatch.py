"""Which implementation runs an op: backends as data.

Each op (``cost_map``, ``dwconv_layernorm``, ...) is one ``sed_fast::`` custom op whose body asks
:func:`resolve` for a function to run. An op has up to four :class:`Backend`s:

* ``"torch"``  -- the plain PyTorch reference (any device);
* ``"cpu"``    -- a PyTorch formulation of the kernel's algorithm shaped for CPUs (CPU tensors), where
  the reference's formulation is slow there;
* ``"triton"`` -- the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"cuda"``   -- the hand-written CUDA C++ kernel from ``csrc/`` (CUDA tensors, extension built).

A backend says why it cannot run (``unavailable(device)``) or cannot take a call's inputs
(``not_supported_reasons(*args)``), in words; an error lists every backend's reasons.

The backend of an op comes from, in order: :func:`set_backend`, ``SED_FAST_BACKEND_<OP>``,
``SED_FAST_BACKEND``, else ``"auto"``: the first usable backend in the order cuda, triton, cpu, torch,
or, with timing-based choice switched on (:func:`set_autotune` or ``SED_FAST_AUTOTUNE=1``; CUDA
only), the fastest one measured on the call's own inputs (:mod:`.autotune`).

A backend found to disagree with its reference (``sed-fast doctor`` checks each one) can be
excluded for the rest of the process with :func:`exclude`: "auto" then never picks it, and asking
for it by name is an error that says why.

This module imports nothing of sed_fast, so that every op file stands directly on it. What it needs
from around it is handed in by the ``sed_fast.kernels`` package as it is imported (Python imports
the package before any of its modules, so nothing can call in before): the reader of its
environment variables (:func:`set_environment_reader`: ``sed_fast.base.envvars.env_value``, which
declares and parses them) and the timing-based chooser (:func:`set_backend_chooser`:
:func:`.autotune.choose`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")  # the order "auto" prefers
REQUESTS = ("auto",) + BACKENDS

# Options every Triton launch passes. FMA contraction on, stated rather than inherited: the default
# up to Triton 3.9, which warns that 3.10 turns it off unless asked; the kernels' accuracy assumes it.
TRITON_LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def _no_reasons(*args, **kwargs) -> List[str]:
    return []


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``unavailable(device)``: why it cannot run on ``device`` (None when it can).
    ``not_supported_reasons(*args, **kwargs)``: why it cannot take these inputs ([] when it can).
    """

    name: str
    fn: Callable
    unavailable: Callable[[torch.device], Optional[str]]
    not_supported_reasons: Callable[..., List[str]] = field(default=_no_reasons)

    def reasons(self, device: torch.device, args: tuple = (), kwargs: Optional[dict] = None) -> List[str]:
        why = self.unavailable(device)
        if why is not None:
            return [why]
        try:
            return list(self.not_supported_reasons(*args, **(kwargs or {})))
        except Exception as error:  # noqa: BLE001 - a check that cannot even look is a reason
            return [f"its input check failed: {type(error).__name__}: {error}"]


class BackendError(RuntimeError):
    """No backend (or not the one asked for) can run an op on these inputs."""


_backends: Dict[str, Dict[str, Backend]] = {}
_overrides: Dict[str, str] = {}
_autotune_override: Optional[bool] = None
_excluded: Dict[Tuple[str, str], str] = {}  # (op, backend) -> why it is not to be used


# -- what the kernels package hands in ----------------------------------------------------------------
def _no_environment_reader(name: str):
    raise RuntimeError(f"dispatch cannot read {name}: no environment reader is installed "
                       "(importing sed_fast.kernels installs sed_fast.base.envvars.env_value)")


def _first_candidate(op: str, device: torch.device, candidates: Dict[str, Callable], args: tuple,
                     kwargs: dict) -> str:
    return next(iter(candidates))


_read_environment: Callable[[str], object] = _no_environment_reader
_choose_backend: Callable[..., str] = _first_candidate


def set_environment_reader(read: Callable[[str], object]) -> None:
    """Read dispatch's environment variables with ``read(name)``: the variable's value parsed as
    its declaration says (its default when unset), raising an error that names it when malformed.
    Names: ``TRITON_INTERPRET``, ``SED_FAST_BACKEND``, ``SED_FAST_BACKEND_<OP>`` (for any op, also
    one registered at run time), ``SED_FAST_AUTOTUNE``."""
    global _read_environment
    _read_environment = read


def set_backend_chooser(choose: Callable[..., str]) -> None:
    """Choose among several usable backends with ``choose(op, device, candidates, args, kwargs)``
    when timing-based choice is on (``candidates``: name -> function, in preference order)."""
    global _choose_backend
    _choose_backend = choose


# -- Triton's mode -----------------------------------------------------------------------------------
def triton_interpreter_on() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter now."""
    return _read_environment("TRITON_INTERPRET")


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


def _default_unavailable(name: str) -> Callable[[torch.device], Optional[str]]:
    if name == "torch":
        return lambda device: None
    if name == "cpu":
        return lambda device: (None if device.type == "cpu"
                               else f"the CPU implementation runs on CPU tensors, not on {device}")
    if name == "triton":
        def triton_unavailable(device: torch.device) -> Optional[str]:
            if device.type == "cuda":
                return None
            if device.type == "cpu" and triton_interpreter_mode() and triton_interpreter_on():
                return None
            return f"Triton kernels run on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not on {device}"
        return triton_unavailable
    return lambda device: None if device.type == "cuda" else f"the CUDA kernels need a CUDA tensor, not {device}"


# -- registering ---------------------------------------------------------------------------------------
def register_impl(op: str, backend: str, fn: Callable,
                  unavailable: Optional[Callable[[torch.device], Optional[str]]] = None,
                  not_supported_reasons: Optional[Callable[..., List[str]]] = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` (see :class:`Backend`; by default
    torch runs everywhere, triton on CUDA or under the interpreter, cpu on CPU, cuda on CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    _backends.setdefault(op, {})[backend] = Backend(
        backend, fn, unavailable or _default_unavailable(backend), not_supported_reasons or _no_reasons)


def backend(op: str, name: str) -> Backend:
    """The registered :class:`Backend` ``name`` of ``op``."""
    return _known(op)[name]


def ops() -> List[str]:
    return sorted(_backends)


def _known(op: str) -> Dict[str, Backend]:
    if op not in _backends:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(ops())}")
    return _backends[op]


# -- excluding -----------------------------------------------------------------------------------------
def exclude(op: str, name: str, reason: str) -> None:
    """Never choose backend ``name`` of ``op`` again in this process (e.g. it disagreed with its
    reference); ``reason`` is quoted by every error that mentions it."""
    if name not in _known(op):
        raise ValueError(f"op {op!r} has no backend {name!r}")
    _excluded[(op, name)] = reason


def include(op: str, name: str) -> None:
    """Undo :func:`exclude` for backend ``name`` of ``op``."""
    _excluded.pop((op, name), None)


def excluded() -> Dict[Tuple[str, str], str]:
    """The excluded (op, backend) pairs and why."""
    return dict(_excluded)


def _reasons(op: str, name: str, device: torch.device, args: tuple = (), kwargs: Optional[dict] = None) -> List[str]:
    if (op, name) in _excluded:
        return [f"excluded in this process: {_excluded[(op, name)]}"]
    return _known(op)[name].reasons(device, args, kwargs)


# -- choosing ------------------------------------------------------------------------------------------
def set_backend(op: str, name: Optional[str]) -> None:
    """Force backend ``name`` for ``op`` (``op="all"`` for every op); ``None`` clears the override."""
    if name is not None and name not in REQUESTS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(REQUESTS)}")
    for each in (ops() if op == "all" else [op]):
        _known(each)
        if name is None:
            _overrides.pop(each, None)
        else:
            _overrides[each] = name


def requested_backend(op: str) -> str:
    """The backend asked for ``op`` (may be ``"auto"``), before it is checked."""
    if op in _overrides:
        return _overrides[op]
    return _read_environment(f"SED_FAST_BACKEND_{op.upper()}") or _read_environment("SED_FAST_BACKEND") or "auto"


def set_autotune(enabled: Optional[bool]) -> None:
    """Switch the timing-based choice of "auto" on or off (None: follow ``SED_FAST_AUTOTUNE``)."""
    global _autotune_override
    _autotune_override = enabled


def autotune_enabled() -> bool:
    return _autotune_override if _autotune_override is not None else _read_environment("SED_FAST_AUTOTUNE")


def usable_backends(op: str, device: torch.device, args: tuple = (), kwargs: Optional[dict] = None) -> List[str]:
    """The backends of ``op`` that can run these inputs on ``device``, in the order "auto" prefers."""
    device = torch.device(device)
    known = _known(op)
    return [name for name in BACKENDS if name in known and not _reasons(op, name, device, args, kwargs)]


def available_backends(op: str, device: torch.device) -> List[str]:
    """The backends of ``op`` that can run on ``device`` (whatever the inputs), in the order "auto" prefers."""
    device = torch.device(device)
    known = _known(op)
    return [name for name in BACKENDS if name in known and (op, name) not in _excluded
            and known[name].unavailable(device) is None]


def _why_not(op: str, device: torch.device, names, args, kwargs) -> str:
    known = _known(op)
    return "; ".join(f"{name}: {', '.join(_reasons(op, name, device, args, kwargs)) or 'ok'}"
                     for name in names if name in known)


def resolve_name(op: str, device: torch.device, args: Optional[tuple] = None, kwargs: Optional[dict] = None) -> str:
    """The name of the backend that runs ``op`` on ``device`` for these inputs."""
    device = torch.device(device)
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    known = _known(op)
    wanted = requested_backend(op)
    if wanted != "auto":
        if wanted not in known:
            raise BackendError(f"backend {wanted!r} was requested for op {op!r}, which has none "
                               f"(it has: {', '.join(n for n in BACKENDS if n in known)})")
        reasons = _reasons(op, wanted, device, args, kwargs)
        if reasons:
            raise BackendError(f"backend {wanted!r} was requested for op {op!r} but cannot run here: "
                               f"{'; '.join(reasons)} (other backends: "
                               f"{_why_not(op, device, [n for n in BACKENDS if n != wanted], args, kwargs)})")
        return wanted
    candidates = usable_backends(op, device, args, kwargs)
    if not candidates:
        raise BackendError(f"no backend of op {op!r} can run these inputs on {device}: "
                           f"{_why_not(op, device, BACKENDS, args, kwargs)}")
    if len(candidates) > 1 and device.type == "cuda" and (args or kwargs) and autotune_enabled():
        return _choose_backend(op, device, {name: known[name].fn for name in candidates}, args, kwargs)
    return candidates[0]


def resolve(op: str, device: torch.device, args: Optional[tuple] = None, kwargs: Optional[dict] = None) -> Callable:
    """The function to run ``op`` on ``device`` for these inputs (pass them: the choice may
    depend on them)."""
    return _known(op)[resolve_name(op, device, args, kwargs)].fn
