"""What the benchmarks share: the environment record, timers, device peaks, result files.

Timing
    CUDA: CUDA events around each call after warm-up (``time_events``), or
    ``triton.testing.do_bench`` for kernels (``time_do_bench``: it also flushes the L2 cache between
    calls); the result is the median and the 20th / 80th percentiles over many calls, in ms.
    CPU: ``time.perf_counter`` around each call, same statistics.
    The number of timed calls adapts to the call's duration: enough for ``target_s`` seconds, between
    ``min_reps`` and ``max_reps`` (or exactly ``reps`` when given).

Device peaks and the roofline
    CPU: the machine's own peaks, measured with the run's thread count (:func:`measure_cpu_peaks`,
    about a second): the float32 and bfloat16 GEMM rate (the better of torch's BLAS ``mm`` and
    oneDNN's matmul, each recorded) and the memory bandwidth (a copy larger than the last-level
    cache, read + write bytes / time). Cached in ``<cache root>/peaks/`` under a key of the CPU model,
    the thread count and the library versions (:func:`machine_peaks`), and recorded in each result.
    CUDA: the datasheet peaks of the device model (:data:`DATASHEET_PEAKS`); an unlisted GPU has
    none. Each stage's %peak is against its binding roof (:func:`roofline`): the compute roof when its
    arithmetic intensity (FLOPs / bytes) is at or above the ridge point (peak FLOP/s / bandwidth), the
    memory roof below it. Measured copy and matmul rates on CUDA (:func:`device_peaks`) are cached per
    device name in ``<results dir>/device_peaks.json`` and printed for scale only.

Result rows
    JSON lines appended to ``<results dir>/<name>.jsonl``; every row starts with
    :func:`environment` (device, torch, triton, cuda, git_commit, timestamp).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ..base.envvars import env_value

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for the git commit of a result
#: Where results go when no folder is named: in the working directory, never inside the package
#: (the committed GPU results live in the repository's benchmarks/results/).
DEFAULT_RESULTS_DIR = "sed_fast_results"
PEAKS_FILE = "device_peaks.json"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

#: Max |scores - reference scores| accepted for an end-to-end row, by compute dtype. Scores are
#: sigmoid probabilities in [0, 1]; float32 must agree to float32 rounding of a deep network, 16-bit
#: runs are compared with the float32 reference, so their bound is the 16-bit rounding of the logits.
#: "tf32": float32 rows run with TF32 allowed (``--tf32``): 10-bit mantissa products.
E2E_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2, "tf32": 1e-2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {text!r}; expected float32, bfloat16 or float16") from None


def parse_list(text: Optional[str], convert=str) -> list:
    """``"a,b, c"`` -> ["a", "b", "c"] (converted); empty or None -> []."""
    if text is None:
        return []
    return [convert(part.strip()) for part in str(text).split(",") if part.strip()]


def results_dir(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The results folder: ``path``, else ``$SED_FAST_RESULTS_DIR``, else ``./sed_fast_results``."""
    chosen = Path(path) if path else (env_value("SED_FAST_RESULTS_DIR") or Path(DEFAULT_RESULTS_DIR))
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


# -- environment ------------------------------------------------------------------------------------
def git_commit() -> str:
    """``git rev-parse HEAD`` of the repository (with ``+dirty`` if files changed), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0 or not commit.stdout.strip():
            return "unknown"
        text = commit.stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10)
        if status.returncode == 0 and status.stdout.strip():
            text += "+dirty"
        return text
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Union[str, torch.device]) -> str:
    """Human-readable device name, also the key of the device peaks cache."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_identity() -> Dict[str, object]:
    """The CPU: model name, vendor, family / model / stepping numbers (from /proc/cpuinfo), the
    features that decide the CPU path's speed and torch's vector capability."""
    from ..base.cpu_features import cpu_flags

    fields = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping"}
    found: Dict[str, object] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = (part.strip() for part in line.partition(":"))
                if key in fields:
                    found[fields[key]] = int(value) if value.isdigit() else value
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"name": _cpu_model(), **found, "features": list(cpu_flags()), "torch_capability": capability}


def library_versions() -> Dict[str, Optional[str]]:
    """Versions of what computes: torch, its BLAS (MKL) and oneDNN builds, Triton, CUDA, cuDNN."""
    config = torch.__config__.show()

    def after(pattern: str) -> Optional[str]:
        import re
        match = re.search(pattern, config)
        return match.group(1) if match else None

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "blas": after(r"BLAS_INFO=(\w+)"),
            "mkl": after(r"Math Kernel Library Version ([\w.\-]+)"), "onednn": after(r"MKL-DNN (v[\d.]+)"),
            "triton": _triton_version(), "cuda": torch.version.cuda, "cudnn": str(cudnn) if cudnn else None}


def blas_name() -> str:
    """The BLAS torch's CPU ``addmm`` / ``mm`` use (``BLAS_INFO`` of the build, e.g. MKL)."""
    blas = library_versions()["blas"] or "BLAS"
    names = {"mkl": "MKL", "open": "OpenBLAS", "openblas": "OpenBLAS", "accelerate": "Accelerate"}
    return names.get(blas.lower(), blas)


#: The routing of the float32 linears on CPU that the README documents (kernels/cpu_linear).
DEFAULT_CPU_LINEAR = "oneDNN"


def linear_routing(device: Union[str, torch.device]) -> Dict[str, object]:
    """Which library the model's linears use on ``device``: per model dtype, the default and whether
    this run differs from it (and why)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"fast_float32": "cuBLAS", "reference": "cuBLAS", "default": "cuBLAS", "differs": False, "why": None}
    from ..base.envvars import env_value as _env
    from ..kernels.cpu_linear import onednn_linear_usable

    switched_off = not _env("SED_FAST_ONEDNN_LINEAR")
    usable = onednn_linear_usable()
    fast = DEFAULT_CPU_LINEAR if usable and not switched_off else blas_name()
    why = None
    if switched_off:
        why = "SED_FAST_ONEDNN_LINEAR=0 switches the oneDNN routing off"
    elif not usable:
        why = "oneDNN's linear is missing from this torch build or disagreed with F.linear on the probe"
    return {"fast_float32": fast, "fast_16bit": f"torch linear ({blas_name()} / oneDNN as torch picks)",
            "reference": blas_name(), "default": DEFAULT_CPU_LINEAR, "differs": fast != DEFAULT_CPU_LINEAR,
            "why": why}


def routing_warning(env: Dict[str, object]) -> Optional[str]:
    """A line for the top of a result's output when the linears' routing differs from the default."""
    routing = env.get("linear_routing") or {}
    if not routing.get("differs"):
        return None
    return (f"NOTE: the fast model's float32 linears run on {routing['fast_float32']}, not the documented "
            f"default {routing['default']} ({routing['why']}): compare with results of the same routing only.")


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - no triton (or a broken one) is a fact to record
        return None


_GIT_COMMIT: Optional[str] = None


def environment(device: Union[str, torch.device]) -> Dict[str, object]:
    """device, threads, torch, triton, cuda, cpu (:func:`cpu_identity`), libraries
    (:func:`library_versions`), linear_routing (:func:`linear_routing`), git_commit, timestamp (UTC,
    ISO 8601)."""
    global _GIT_COMMIT
    if _GIT_COMMIT is None:
        _GIT_COMMIT = git_commit()
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),  # CPU threads of torch (work per core differs with them)
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "cpu": cpu_identity(),
        "libraries": library_versions(),
        "linear_routing": linear_routing(device),
        "git_commit": _GIT_COMMIT,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions (off: true float32, the 1e-4 checks hold)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def settings(threads: Optional[int] = None, smoke: bool = False, tf32: bool = False):
    """Threads (:func:`set_threads`) and TF32 (:func:`set_tf32`) for a benchmark run, restored on exit
    (the mains run inside other processes too: tests, the CLI)."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_threads(threads, smoke)
    set_tf32(tf32)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def set_threads(threads: Optional[int], smoke: bool = False) -> None:
    """CPU threads for torch: ``threads`` if given, 1 for smoke runs (tiny ops on a shared machine
    time more stably without OpenMP barriers), else torch's default."""
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    elif smoke:
        torch.set_num_threads(1)


def synchronize(device: Union[str, torch.device]) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: Union[str, torch.device]) -> None:
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# -- timing -----------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times_ms: Sequence[float]) -> Timing:
    return Timing(quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8), len(times_ms))


def _rep_count(estimate_ms: float, reps: Optional[int], min_reps: int, max_reps: int, target_s: float) -> int:
    if reps is not None:
        return max(1, reps)
    wanted = math.ceil(target_s * 1e3 / max(estimate_ms, 1e-3))
    return max(min_reps, min(max_reps, wanted))


def time_events(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: Optional[int] = None,
                min_reps: int = 5, max_reps: int = 100, target_s: float = 1.0) -> Timing:
    """CUDA events around each call (after ``warmup`` calls); the device is idle before each call."""
    device = torch.device(device)
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    count = _rep_count(start.elapsed_time(end), reps, min_reps, max_reps, target_s)
    times = []
    for _ in range(count):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)  # one call at a time: latency, not a pipelined throughput
        times.append(start.elapsed_time(end))
    return summarize(times)


def time_wall(fn: Callable[[], object], device: Union[str, torch.device] = "cpu", *, warmup: int = 1,
              reps: Optional[int] = None, min_reps: int = 3, max_reps: int = 50, target_s: float = 0.5) -> Timing:
    """``time.perf_counter`` around each call (synchronising the device), after ``warmup`` calls."""
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    count = _rep_count((time.perf_counter() - begin) * 1e3, reps, min_reps, max_reps, target_s)
    return summarize(wall_times_ms(fn, device, count))


def wall_times_ms(fn: Callable[[], object], device: Union[str, torch.device], count: int) -> List[float]:
    """``count`` calls, each timed by ``time.perf_counter`` up to the device's synchronisation, in ms."""
    times = []
    for _ in range(count):
        begin = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def time_do_bench(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25,
                  rep_ms: float = 100) -> Timing:
    """``triton.testing.do_bench`` (L2 flushed between calls); falls back to CUDA events."""
    try:
        from triton.testing import do_bench
        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        # do_bench does not say how many calls it timed; estimate it from its own rule.
        return Timing(float(median), float(p20), float(p80), max(1, int(rep_ms / max(float(median), 1e-3))))
    except (ImportError, TypeError, AttributeError):
        return time_events(fn, device, target_s=rep_ms / 1e3)


def time_fn(fn: Callable[[], object], device: Union[str, torch.device], *, kernel: bool = False,
            warmup: int = 3, reps: Optional[int] = None, min_reps: int = 5, max_reps: int = 100,
            target_s: float = 1.0) -> Timing:
    """The timer for ``device``: do_bench (``kernel=True``) or CUDA events on CUDA, wall clock on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if kernel and reps is None:
            return time_do_bench(fn, device, warmup_ms=max(10.0, 25.0 * warmup / 3), rep_ms=target_s * 1e3)
        return time_events(fn, device, warmup=warmup, reps=reps, min_reps=min_reps, max_reps=max_reps,
                           target_s=target_s)
    return time_wall(fn, device, warmup=warmup, reps=reps, min_reps=min_reps, max_reps=max_reps, target_s=target_s)


# -- device peaks -----------------------------------------------------------------------------------
def measure_device_peaks(device: Union[str, torch.device]) -> Dict[str, object]:
    """Achievable copy bandwidth (GB/s) and matmul rate (TFLOP/s per dtype) on ``device``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    copy_bytes = (1 << 30) if cuda else (64 << 20)
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    copy = time_fn(lambda: target.copy_(source), device, warmup=3, reps=20 if cuda else 10)
    source = target = None  # free them before the matmuls
    matmul: Dict[str, float] = {}
    sizes = {"bfloat16": 8192, "float32": 4096} if cuda else {"float32": 1024}
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, n in sizes.items():
            a = torch.randn(n, n, device=device, dtype=DTYPES[name])
            b = torch.randn(n, n, device=device, dtype=DTYPES[name])
            timing = time_fn(lambda: torch.mm(a, b), device, warmup=3, reps=10 if cuda else 5)
            matmul[name] = 2 * n ** 3 / (timing.p20_ms * 1e-3) / 1e12  # a peak: the fast end
            a = b = None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    if "float16" not in matmul and "bfloat16" in matmul:
        matmul["float16"] = matmul["bfloat16"]
    free_memory(device)
    return {
        "copy_gb_per_s": 2 * copy_bytes / (copy.p20_ms * 1e-3) / 1e9,
        "matmul_tflop_per_s": matmul,
        "how": (f"copy of {copy_bytes >> 20} MiB (read + write); matmuls "
                + ", ".join(f"{name} {n}^3" for name, n in sizes.items()) + " (TF32 off)"),
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def device_peaks(device: Union[str, torch.device], directory: Optional[Union[str, os.PathLike]] = None,
                 refresh: bool = False) -> Dict[str, object]:
    """The peaks of ``device`` from ``<directory>/device_peaks.json``, measured (and saved) if absent."""
    path = results_dir(directory) / PEAKS_FILE
    key = device_name(device)
    cache: Dict[str, object] = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
    if refresh or key not in cache:
        cache[key] = measure_device_peaks(device)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return cache[key]  # type: ignore[return-value]


#: Datasheet peaks by ``torch.cuda.get_device_name()``: DRAM bandwidth (GB/s) and dense (no
#: sparsity) FLOP/s per precision: "float32" without tensor cores (TF32 off), "tf32", 16-bit
#: tensor cores. NVIDIA's H100 / H200 / A100 datasheets, boost clocks.
DATASHEET_PEAKS: Dict[str, Dict[str, object]] = {
    name: {"copy_gb_per_s": bandwidth,
           "matmul_tflop_per_s": {"float32": fp32, "tf32": tf32, "bfloat16": half, "float16": half},
           "source": f"{source} datasheet"}
    for name, source, bandwidth, fp32, tf32, half in (
        ("NVIDIA H100 80GB HBM3", "H100 SXM5", 3350.0, 67.0, 494.7, 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 2000.0, 51.0, 378.0, 756.0),
        ("NVIDIA H200", "H200 SXM", 4800.0, 67.0, 494.7, 989.4),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB", 2039.0, 19.5, 156.0, 312.0),
        ("NVIDIA A100-SXM4-40GB", "A100 SXM4 40GB", 1555.0, 19.5, 156.0, 312.0),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB", 1935.0, 19.5, 156.0, 312.0),
        ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB", 1555.0, 19.5, 156.0, 312.0),
    )}


def _fastest_ms(fn: Callable[[], object], budget_s: float, min_calls: int = 3, max_calls: int = 20) -> float:
    """The fastest of repeated calls of ``fn`` (after one warm-up call), within about ``budget_s``."""
    fn()
    times: List[float] = []
    began = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - began < budget_s):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def measure_cpu_peaks(budget_s: float = 0.25) -> Dict[str, object]:
    """This CPU's float32 and bfloat16 GEMM rates (TFLOP/s) and memory bandwidth (GB/s) with torch's
    current thread count, in about a second: the fastest of a few 1024^3 matmuls through torch's
    ``mm`` (BLAS) and oneDNN's matmul (the better of the two is the roof, both are recorded), and a
    copy of 64 MiB (beyond the last-level cache of the CPUs this runs on; read + write bytes)."""
    began = time.perf_counter()
    n = 1024
    flops = 2.0 * n ** 3
    threads = f"{torch.get_num_threads()} thread" + ("s" if torch.get_num_threads() != 1 else "")
    generator = torch.Generator().manual_seed(0)
    matmul: Dict[str, float] = {}
    paths: Dict[str, Dict[str, Optional[float]]] = {}
    with torch.no_grad():
        for name in ("float32", "bfloat16"):
            a = torch.randn(n, n, generator=generator).to(DTYPES[name])
            b = torch.randn(n, n, generator=generator).to(DTYPES[name])
            candidates = {f"torch mm ({blas_name()})": lambda: torch.mm(a, b),
                          "oneDNN matmul": lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")}
            rates_here: Dict[str, Optional[float]] = {}
            for path, fn in candidates.items():
                try:
                    rates_here[path] = flops / (_fastest_ms(fn, budget_s) * 1e-3) / 1e12
                except Exception:  # noqa: BLE001 - a path this build lacks is recorded as missing
                    rates_here[path] = None
            paths[name] = rates_here
            found = [rate for rate in rates_here.values() if rate]
            if found:
                matmul[name] = max(found)
        copy_bytes = 64 << 20
        source = torch.ones(copy_bytes // 4)
        target = torch.empty_like(source)
        copy_ms = _fastest_ms(lambda: target.copy_(source), budget_s)
    return {
        "copy_gb_per_s": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_tflop_per_s": matmul,
        "matmul_paths_tflop_per_s": paths,
        "threads": torch.get_num_threads(),
        "how": (f"fastest of a few {n}^3 matmuls per dtype (torch mm and oneDNN matmul, the better one is the "
                f"roof) and of a {copy_bytes >> 20} MiB copy (read + write), {threads}"),
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "measure_seconds": round(time.perf_counter() - began, 3),
        "source": f"measured on this CPU ({threads})",
    }


def cpu_peaks_key() -> Dict[str, object]:
    """What the CPU peaks depend on: the CPU model, the thread count, the library versions."""
    cpu = cpu_identity()
    return {"cpu": cpu["name"], "family": cpu.get("family"), "model": cpu.get("model"),
            "stepping": cpu.get("stepping"), "threads": torch.get_num_threads(), "libraries": library_versions()}


def peaks_cache_file(key: Dict[str, object]) -> Path:
    """``<cache root>/peaks/cpu-<hash of key>.json``."""
    import hashlib

    from ..base.envvars import cache_root

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "peaks" / f"cpu-{digest}.json"


def machine_peaks(device: Union[str, torch.device], refresh: bool = False,
                  use_cache: bool = True) -> Optional[Dict[str, object]]:
    """The roofs of ``device``: on CPU measured here (:func:`measure_cpu_peaks`), read from the cache
    when this CPU model, thread count and library versions were measured before (``cached`` says
    which); on CUDA (and for any device whose name :data:`DATASHEET_PEAKS` lists) the datasheet peaks,
    None for an unlisted GPU."""
    device = torch.device(device)
    listed = datasheet_peaks(device)
    if listed is not None or device.type != "cpu":
        return listed
    key = cpu_peaks_key()
    path = peaks_cache_file(key)
    if use_cache and not refresh and path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == _jsonable(key):
                return dict(stored["peaks"], cached=True, cache_file=str(path))
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # unreadable or foreign: measure again and replace it
    peaks = measure_cpu_peaks()
    if use_cache:
        from ..base.files import atomic_write_text
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(_jsonable({"key": key, "peaks": peaks}), indent=2) + "\n")
        except OSError:
            pass  # a read-only cache costs a second per run, nothing else
    return dict(peaks, cached=False, cache_file=str(path) if use_cache else None)


def roofline(flops: Optional[float], bytes_moved: Optional[float], time_ms: Optional[float],
             peaks: Optional[Dict[str, object]], precision: str) -> Dict[str, Optional[object]]:
    """Where a stage sits under the roofs: its arithmetic intensity (FLOPs / byte), the binding roof
    (``"compute"`` at or above the ridge point, ``"memory"`` below it, ``"memory"`` too for a stage
    that moves data but multiplies nothing), the attainable rate there and the achieved fraction of
    it (``frac_peak``: achieved FLOP/s over the attainable FLOP/s, or GB/s over the bandwidth)."""
    out: Dict[str, Optional[object]] = {"intensity": None, "bound": None, "roof_tflop_per_s": None,
                                        "frac_peak": None}
    if flops and bytes_moved:
        out["intensity"] = flops / bytes_moved
    if not peaks or not time_ms or time_ms <= 0:
        return out
    seconds = time_ms * 1e-3
    peak = peak_flops(peaks, precision)
    bandwidth = float(peaks.get("copy_gb_per_s") or 0)  # type: ignore[arg-type]
    if flops and peak:
        if bytes_moved and bandwidth:
            ridge = peak * 1e12 / (bandwidth * 1e9)
            memory_roof = out["intensity"] * bandwidth * 1e9 / 1e12  # type: ignore[operator]
            out["bound"] = "compute" if out["intensity"] >= ridge else "memory"  # type: ignore[operator]
            out["roof_tflop_per_s"] = min(peak, memory_roof)
        else:
            out["bound"], out["roof_tflop_per_s"] = "compute", peak
        out["frac_peak"] = flops / seconds / 1e12 / out["roof_tflop_per_s"]  # type: ignore[operator]
    elif bytes_moved and bandwidth:
        out["bound"] = "memory"
        out["frac_peak"] = bytes_moved / seconds / 1e9 / bandwidth
    return out


def datasheet_peaks(device: Union[str, torch.device, None] = None, name: Optional[str] = None
                    ) -> Optional[Dict[str, object]]:
    """The datasheet peaks of ``device`` (or of the device model ``name``), None if not listed:
    then no "% of peak" is given."""
    name = name if name is not None else device_name(device)
    return DATASHEET_PEAKS.get(str(name).strip())


def precision_name(dtype: Union[str, torch.dtype], tf32: bool = False) -> str:
    """The key of a peak: the dtype's name, ``"tf32"`` for float32 with TF32 allowed."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return "tf32" if tf32 and name == "float32" else name


def peak_flops(peaks: Dict[str, object], dtype: Union[str, torch.dtype]) -> Optional[float]:
    """Peak TFLOP/s for ``dtype`` (float32 if that dtype was not measured, e.g. 16-bit on CPU)."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    rates = peaks.get("matmul_tflop_per_s") or {}
    return rates.get(name) or rates.get("float32")  # type: ignore[union-attr]


def rates(bytes_moved: Optional[float], flops: Optional[float], time_ms: Optional[float],
          peaks: Optional[Dict[str, object]], dtype: Union[str, torch.dtype]) -> Dict[str, Optional[float]]:
    """Achieved GB/s and TFLOP/s of a call and their fractions of the device peaks (None if unknown)."""
    out: Dict[str, Optional[float]] = {"gb_per_s": None, "tflop_per_s": None,
                                       "frac_peak_bw": None, "frac_peak_flops": None}
    if not time_ms or time_ms <= 0:
        return out
    seconds = time_ms * 1e-3
    if bytes_moved:
        out["gb_per_s"] = bytes_moved / seconds / 1e9
        if peaks and peaks.get("copy_gb_per_s"):
            out["frac_peak_bw"] = out["gb_per_s"] / float(peaks["copy_gb_per_s"])  # type: ignore[arg-type]
    if flops:
        out["tflop_per_s"] = flops / seconds / 1e12
        peak = peak_flops(peaks, dtype) if peaks else None
        if peak:
            out["frac_peak_flops"] = out["tflop_per_s"] / peak
    return out


# -- result files -----------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def append_rows(path: Union[str, os.PathLike], rows: Iterable[Dict[str, object]]) -> None:
    """Append rows as JSON lines (one write per row; NaN/inf become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_jsonable(row), sort_keys=False) + "\n")


def read_rows(paths: Iterable[Union[str, os.PathLike]]) -> List[Dict[str, object]]:
    """Rows of the given .jsonl files (or of every .jsonl file in the given folders)."""
    rows: List[Dict[str, object]] = []
    for entry in paths:
        entry = Path(entry)
        files = sorted(entry.glob("*.jsonl")) if entry.is_dir() else [entry]
        for file in files:
            with open(file, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        print(f"warning: {file}:{line_number}: not JSON, skipped")
                        continue
                    row.setdefault("_source", file.name)
                    rows.append(row)
    return rows


def print_header(columns: str, file=None) -> None:
    """A table's column names and a rule under them."""
    print(columns, file=file)
    print("-" * len(columns), file=file)


def verdict(valid: Optional[bool], ran: bool, unchecked: str = "?") -> str:
    """A result row's last column: ok, WRONG (it ran and disagrees with its reference), ERR (it did
    not run), or ``unchecked`` (nothing to compare with)."""
    return {True: "ok", False: "WRONG" if ran else "ERR", None: unchecked}[valid]


def fmt(value, digits: int = 2, none: str = "-") -> str:
    """A number for a table: fixed digits, thousands for big ones, ``none`` for None."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 10 ** -digits):
            return f"{value:.1e}"
        return f"{value:,.{digits}f}"
    return str(value)
