"""The ``"auto"`` backend policy on CUDA: measure each candidate once, keep the fastest.

:func:`install` hands :func:`choose` to :func:`sed_fast.kernels._backend.set_auto_chooser`. For an
``(op, device name, shape bucket)`` seen for the first time, :func:`choose` runs every candidate
backend on the call's own inputs (``args``/``kwargs`` when the registry passes them, else the
inputs of :func:`register_example_inputs` for that op), 2 warm-up calls then ``SED_FAST_AUTOTUNE_ITERS``
(default 5) calls timed together with CUDA events, and keeps the fastest; the choice is cached in
memory and, with ``SED_FAST_AUTOTUNE_CACHE=1``, in a JSON file under the cache directory keyed
by device name and torch / triton / extension versions.

It never measures while a CUDA graph is being captured, while torch.compile traces, or on fake /
meta tensors: it then returns the cached choice or the first candidate in preference order
(cuda > triton > torch) that supports the inputs. A backend that raises while measured is
dropped for that bucket (and the error logged); if all raise, the last candidate wins (the
reference, "torch", which raises its own clear error if the inputs are bad).

An implementation may carry ``fn.supports(*args, **kwargs) -> bool`` (the cuda kernels do: e.g.
dwconv_layernorm only for K=9, C in {32, 64, 128}); candidates that do not support the call's
inputs are skipped without measuring.

Only the ops' outputs are discarded; the ops are functional (no input is written), so running
them on the real inputs is safe.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from . import _backend

logger = logging.getLogger("sed_fast.autotune")

_WARMUP = 2
_cache: Dict[Tuple, str] = {}
_examples: Dict[str, Callable[[torch.device], Tuple[tuple, dict]]] = {}
_lock = threading.RLock()
_disk_loaded = False
measurements = 0  # how many (op, device, bucket) measurements ran (tests read it)


def _iters() -> int:
    try:
        return max(1, int(os.environ.get("SED_FAST_AUTOTUNE_ITERS", "5")))
    except ValueError:
        return 5


def register_example_inputs(op: str, factory: Callable[[torch.device], Tuple[tuple, dict]]) -> None:
    """Representative inputs for ``op`` (``factory(device) -> (args, kwargs)``), used when the
    registry calls the chooser without the call's own inputs."""
    _examples[op] = factory


# -- keys ------------------------------------------------------------------------------------------

def _bucket_dim(n: int) -> int:
    """Sizes are bucketed to the next power of two (so 150 and 200 classes share a choice)."""
    return 0 if n <= 0 else 1 << math.ceil(math.log2(n))


def _describe(value: Any):
    if isinstance(value, torch.Tensor):
        return ("T", str(value.dtype), tuple(_bucket_dim(int(s)) for s in value.shape),
                value.is_contiguous(), value.is_contiguous(memory_format=torch.channels_last)
                if value.dim() == 4 else False)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    return type(value).__name__


def shape_bucket(args: Sequence = (), kwargs: Optional[dict] = None) -> Tuple:
    """The part of the cache key that comes from the inputs."""
    kwargs = kwargs or {}
    return (_describe(tuple(args)), tuple(sorted((k, _describe(v)) for k, v in kwargs.items())))


def _device_name(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index)


# -- when not to measure ---------------------------------------------------------------------------

def _is_fake(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return True
        try:
            from torch._subclasses.fake_tensor import FakeTensor
            return isinstance(value, FakeTensor)
        except Exception:  # pragma: no cover - private API moved
            return False
    if isinstance(value, (list, tuple)):
        return any(_is_fake(v) for v in value)
    return False


def measuring_allowed(device: torch.device, args: Sequence = (), kwargs: Optional[dict] = None) -> bool:
    """False while a CUDA graph is captured, while torch.compile traces, or on fake tensors."""
    if device.type != "cuda":
        return False
    try:
        if torch.cuda.is_current_stream_capturing():
            return False
    except Exception:
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return not (_is_fake(tuple(args)) or _is_fake(tuple((kwargs or {}).values())))


def _supports(op: str, backend: str, args: Sequence, kwargs: dict) -> bool:
    fn = _backend._impls.get(op, {}).get(backend)
    check = getattr(fn, "supports", None)
    if check is None or args is None:
        return True
    try:
        return bool(check(*args, **kwargs))
    except Exception:
        return False


def _preferred(op: str, candidates: Sequence[str], args, kwargs) -> str:
    for name in candidates:
        if _supports(op, name, args, kwargs):
            return name
    return candidates[-1]


# -- measuring -------------------------------------------------------------------------------------

def time_backend(fn: Callable, args: Sequence, kwargs: dict, device: torch.device,
                 iters: Optional[int] = None) -> float:
    """Mean milliseconds of ``fn(*args, **kwargs)`` on the current stream of ``device``."""
    iters = iters or _iters()
    with torch.cuda.device(device):
        for _ in range(_WARMUP):
            fn(*args, **kwargs)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(*args, **kwargs)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / iters


def _measure(op: str, device: torch.device, candidates: Sequence[str], args, kwargs) -> str:
    global measurements
    timings: Dict[str, float] = {}
    for name in candidates:
        if not _supports(op, name, args, kwargs):
            continue
        try:
            timings[name] = time_backend(_backend._impls[op][name], args, kwargs, device)
        except Exception as exc:  # a backend that fails is not chosen
            logger.warning("sed_fast auto backend: %s backend of %s failed on these inputs (%s: %s); "
                           "not using it for them", name, op, type(exc).__name__, exc)
    measurements += 1
    if not timings:
        return candidates[-1]
    best = min(timings, key=timings.get)
    logger.info("sed_fast auto backend for %s on %s: %s (%s)", op, _device_name(device), best,
                ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in sorted(timings.items(), key=lambda kv: kv[1])))
    return best


def choose(op: str, device: torch.device, candidates: Sequence[str], args: Optional[Sequence] = None,
           kwargs: Optional[dict] = None) -> str:
    """The chooser installed for ``"auto"``: see the module docstring."""
    device = torch.device(device)
    candidates = list(candidates)
    if len(candidates) == 1:
        return candidates[0]
    kwargs = dict(kwargs or {})
    if args is None and op in _examples:
        example_inputs = True
    else:
        example_inputs = False
    bucket = ("example",) if args is None else shape_bucket(args, kwargs)
    try:
        key = (op, _device_name(device), bucket, tuple(candidates))
    except Exception:
        return _preferred(op, candidates, args, kwargs)
    with _lock:
        _load_disk_cache()
        hit = _cache.get(key)
        if hit is not None and hit in candidates:
            return hit
        if args is None and not example_inputs:
            return _preferred(op, candidates, None, {})
        if not measuring_allowed(device, args or (), kwargs):
            return _preferred(op, candidates, args, kwargs)
        if example_inputs:
            try:
                args, kwargs = _examples[op](device)
            except Exception as exc:
                logger.warning("sed_fast auto backend: example inputs of %s failed (%s)", op, exc)
                return _preferred(op, candidates, None, {})
        best = _measure(op, device, candidates, args, kwargs)
        _cache[key] = best
        _save_disk_cache()
        return best


def clear_cache() -> None:
    """Forget every measured choice (in memory)."""
    global _disk_loaded
    with _lock:
        _cache.clear()
        _disk_loaded = False


def cached_choices() -> Dict[Tuple, str]:
    with _lock:
        return dict(_cache)


# -- optional disk cache ---------------------------------------------------------------------------

def _disk_cache_on() -> bool:
    return os.environ.get("SED_FAST_AUTOTUNE_CACHE", "0").strip().lower() in ("1", "true", "yes", "on")


def _disk_cache_path() -> Path:
    root = os.environ.get("SED_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sed_fast")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        from . import _cuda
        ext = _cuda.extension_tag()
    except Exception:
        ext = "none"
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-triton{triton_version}-{ext}"
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)
    return Path(root) / "autotune" / f"backend_choices-{tag}.json"


def _encode(key: Tuple) -> str:
    return json.dumps(key, default=str)


def _load_disk_cache() -> None:
    global _disk_loaded
    if _disk_loaded or not _disk_cache_on():
        return
    _disk_loaded = True
    path = _disk_cache_path()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for raw_key, value in stored.items():
        try:
            key = _decode(json.loads(raw_key))
        except ValueError:
            continue
        _cache.setdefault(key, value)


def _decode(obj):
    if isinstance(obj, list):
        return tuple(_decode(v) for v in obj)
    return obj


def _save_disk_cache() -> None:
    if not _disk_cache_on():
        return
    path = _disk_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({_encode(k): v for k, v in _cache.items()}, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache is no reason to fail
        logger.debug("sed_fast auto backend: cannot write %s (%s)", path, exc)


def install() -> None:
    """Make :func:`choose` the ``"auto"`` policy on CUDA."""
    _backend.set_auto_chooser(choose)
