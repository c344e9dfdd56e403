"""Timing-based backend choice (opt-in: ``SED_FAST_AUTOTUNE=1`` or ``dispatch.set_autotune(True)``).

For an ``(op, device name, shape bucket)`` seen for the first time, :func:`choose` runs every
candidate backend (those that can take the inputs, in preference order) on the call's own inputs:
2 warm-up calls, then ``SED_FAST_AUTOTUNE_ITERS`` (default 5) calls timed together with CUDA events,
and keeps the fastest. The choice is cached in memory and, with ``SED_FAST_AUTOTUNE_CACHE=1``, in a
JSON file under the cache root keyed by device name and torch / CUDA / Triton versions.

It never measures while a CUDA graph is being captured, while torch.compile traces, or on fake /
meta tensors: it then returns the cached choice or the first candidate. A backend that raises while
measured is dropped for that bucket (and the error logged); if all raise, the last candidate wins
(the reference, "torch", which raises its own clear error if the inputs are bad).

The ops are functional (no input is written), so running them on the real inputs is safe; only
their outputs are discarded.
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

from ..base.envvars import cache_root, env_value

logger = logging.getLogger("sed_fast.autotune")

_WARMUP = 2
_cache: Dict[Tuple, str] = {}
_lock = threading.RLock()
_disk_loaded = False
measurements = 0  # how many (op, device, bucket) measurements ran (tests read it)


def _iters() -> int:
    return env_value("SED_FAST_AUTOTUNE_ITERS")


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


def _measure(op: str, device: torch.device, candidates: Dict[str, Callable], args, kwargs) -> str:
    global measurements
    timings: Dict[str, float] = {}
    for name, fn in candidates.items():
        try:
            timings[name] = time_backend(fn, args, kwargs, device)
        except Exception as exc:  # a backend that fails is not chosen
            logger.warning("sed_fast autotune: %s backend of %s failed on these inputs (%s: %s); "
                           "not using it for them", name, op, type(exc).__name__, exc)
    measurements += 1
    if not timings:
        return list(candidates)[-1]
    best = min(timings, key=timings.get)
    logger.info("sed_fast autotune for %s on %s: %s (%s)", op, _device_name(device), best,
                ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in sorted(timings.items(), key=lambda kv: kv[1])))
    return best


def choose(op: str, device: torch.device, candidates: Dict[str, Callable], args: Sequence = (),
           kwargs: Optional[dict] = None) -> str:
    """The fastest of ``candidates`` (name -> function, each able to take the inputs, in preference
    order) for this input bucket: measured once, then cached (see the module docstring)."""
    device = torch.device(device)
    names = list(candidates)
    if len(names) == 1:
        return names[0]
    kwargs = dict(kwargs or {})
    try:
        key = (op, _device_name(device), shape_bucket(args, kwargs), tuple(names))
    except Exception:  # noqa: BLE001 - no device name (no CUDA): nothing to measure on
        return names[0]
    with _lock:
        _load_disk_cache()
        hit = _cache.get(key)
        if hit is not None and hit in candidates:
            return hit
        if not measuring_allowed(device, args, kwargs):
            return names[0]
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
#: The disk cache: files ``<DISK_CACHE_PREFIX><versions tag>.json`` in ``cache_root() / DISK_CACHE_FOLDER``
#: (``sed-fast cache`` finds them by these names).
DISK_CACHE_FOLDER = "autotune"
DISK_CACHE_PREFIX = "backend_choices-"


def _disk_cache_on() -> bool:
    return env_value("SED_FAST_AUTOTUNE_CACHE")


def _disk_cache_path() -> Path:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "none"
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-triton{triton_version}"
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)
    return cache_root() / DISK_CACHE_FOLDER / f"{DISK_CACHE_PREFIX}{tag}.json"


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
