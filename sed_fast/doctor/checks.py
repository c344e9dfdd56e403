"""The checks of ``sed-fast doctor``: versions, device, CUDA extension, every backend of every op,
the dispatch table and the model end to end. Each returns plain data (JSON-ready)."""
from __future__ import annotations

import importlib
import importlib.util
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..base.cpu_features import cpu_flags

#: float tolerance on max |backend - reference|, times max(1, max |reference|), per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
#: End-to-end: max |fast - reference| of the scores (probabilities), by dtype.
E2E_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


# -- versions and device ------------------------------------------------------------------------------
def _distribution_version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _driver_version() -> Optional[str]:
    """The NVIDIA driver version (nvidia-smi), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def versions() -> Dict[str, object]:
    from .. import __version__

    try:
        import triton
        triton_version = triton.__version__
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the torch backends still run
        triton_version = f"not importable ({type(error).__name__}: {error})"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"sed_fast": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "triton": triton_version, "numpy": _distribution_version("numpy"),
            "pillow": _distribution_version("pillow"), "torch_cuda": torch.version.cuda, "cudnn": cudnn,
            "driver": _driver_version(), "cpu_threads": torch.get_num_threads()}


def device_info(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
    else:
        from ..kernels import cpu_linear

        info.update(name=platform.processor() or platform.machine(), compute_capability=None,
                    cpu_flags=list(cpu_flags()),
                    linear="oneDNN" if cpu_linear.onednn_linear_enabled() else "F.linear (BLAS)")
    return info


def extension_status(device: torch.device, build: bool) -> Dict[str, object]:
    """Whether the CUDA extension is loaded and why not; on a CUDA device it is loaded now (built
    just in time only when ``build`` and SED_FAST_JIT_BUILD allow it)."""
    from .._build import find_cuda_home
    from ..kernels import cuda_extension

    status: Dict[str, object] = {
        "prebuilt_sed_fast__C": importlib.util.find_spec("sed_fast._C") is not None,
        "cuda_toolkit": find_cuda_home(), "sources_present": cuda_extension.sources_present(), "loaded": False,
        "how": None, "why_not": None}
    if device.type != "cuda":
        status["why_not"] = (f"not needed on {device}: the 'cuda' backend runs on CUDA tensors only"
                             + ("" if cuda_extension.extension_loaded() else " (not loaded)"))
        status["loaded"] = cuda_extension.extension_loaded()
        return status
    loaded = cuda_extension.load_extension(jit=None if build else False)
    status.update(loaded=loaded, how=cuda_extension.how_loaded() or None,
                  why_not=None if loaded else cuda_extension.load_error())
    return status


# -- the op cases -----------------------------------------------------------------------------------------
@dataclass
class Case:
    """One op on small random inputs: ``make(device, dtype, generator)`` -> the args the op hands its
    backends; ``compare(reference_out, out)`` -> (max error, within tolerance)."""

    op: str
    shape: str
    make: Callable[[torch.device, torch.dtype, torch.Generator], tuple]
    compare: Callable[[object, object, torch.dtype], Tuple[float, bool]]
    dtypes: Optional[Sequence[torch.dtype]] = None  # None: every dtype asked for; else these only
    oracle: Optional[Callable[[tuple], object]] = None  # an independent check of the reference itself


def _close(ref: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> Tuple[float, bool]:
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return float("inf"), False
    if out.numel() == 0:
        return 0.0, True
    error = float((out.float() - ref.float()).abs().max())  # NaN in out gives NaN: not <= anything
    scale = max(1.0, float(ref.float().abs().max()))
    return error, bool(error <= TOLERANCE.get(dtype, 1e-4) * scale)


def _equal(ref: torch.Tensor, out: torch.Tensor, dtype=None) -> Tuple[float, bool]:
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
        return float("inf"), False
    if out.numel() == 0:
        return 0.0, True
    error = float((out.to(torch.float64) - ref.to(torch.float64)).abs().max())
    return error, bool(torch.equal(out, ref))


def _example(module: str, maker: str = "example_inputs") -> Callable:
    """The op file's own example inputs (the "small" shapes), as a case's ``make(device, dtype, gen)``."""
    def make(device, dtype, gen):
        return getattr(importlib.import_module(f"sed_fast.kernels.{module}"), maker)(device, dtype, "small", gen)
    return make


def _compare_topk(ref, out, dtype=None):
    ref_mask, ref_idx, ref_offsets = ref
    mask, idx, offsets = out
    total = int(ref_offsets[-1])
    results = [_equal(ref_mask, mask), _equal(ref_offsets, offsets), _equal(ref_idx[:total], idx[:total])]
    return max(error for error, _ in results), all(ok for _, ok in results)


def _pillow(args) -> torch.Tensor:
    """Pillow itself: what the resize reproduces, bit for bit."""
    import numpy as np
    from PIL import Image

    image, new_h, new_w, _ = args
    hwc = image.permute(1, 2, 0).cpu().numpy()
    resized = np.asarray(Image.fromarray(hwc).resize((new_w, new_h), Image.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous().to(image.device)


CASES = (
    Case("cost_map", "img (2,48,5,7) text (3,4,48)", _example("cost_map"), _close),
    Case("dwconv_layernorm", "x (3,32,7,9) 9x9", _example("dwconv_layernorm"), _close),
    Case("class_attention", "qkv (5,12,32) 2 images, 4 heads", _example("class_attention"), _close),
    Case("topk_union_reject", "aux (2,7,5,6) k=3", _example("topk_union_reject"), _compare_topk,
         dtypes=(torch.float32,)),
    Case("gather_rows", "x (14,16,5,6) 4 rows", _example("topk_union_reject", "gather_example_inputs"), _equal),
    Case("pil_bilinear_resize", "uint8 (3,37,53) -> (20,29)", _example("pil_bilinear_resize"), _equal,
         dtypes=(torch.uint8,), oracle=_pillow),
)

CASES_BY_OP = {case.op: case for case in CASES}


def references() -> Dict[str, Callable]:
    """op -> its plain PyTorch reference (the module function, whatever is registered as "torch")."""
    from .. import kernels

    return {op: getattr(kernels, f"{op}_reference") for op in (case.op for case in CASES)}


def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> Tuple[object, Optional[float]]:
    """(output of the first call, median ms of ``reps`` further calls; None when reps is 0)."""
    from ..bench import common

    out = fn()  # compiles a Triton kernel on its first call
    common.synchronize(device)
    times = common.wall_times_ms(fn, device, reps)
    return out, (statistics.median(times) if times else None)


def _short(error: BaseException) -> str:
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


def check_backends(device: torch.device, dtypes: Sequence[torch.dtype], reps: int = 5,
                   exclude_failures: bool = True) -> List[Dict[str, object]]:
    """Every backend of every op (usable on ``device``) against the op's reference: one row per
    (op, dtype, backend). A backend that disagrees or raises is excluded from dispatch."""
    from ..kernels import dispatch

    refs = references()
    rows: List[Dict[str, object]] = []
    for case in CASES:
        known = dispatch._known(case.op)
        for dtype in (case.dtypes or dtypes):
            gen = torch.Generator().manual_seed(0)
            base = {"op": case.op, "shape": case.shape, "dtype": str(dtype).replace("torch.", "")}
            try:
                args = case.make(device, dtype, gen)
                ref_out, ref_ms = _timed(lambda: refs[case.op](*args), device, reps)
            except Exception as error:  # noqa: BLE001 - the reference itself cannot run: every row says so
                rows.append(dict(base, backend="reference", status="error", error=_short(error),
                                 max_error=None, ms=None))
                continue
            if case.oracle is not None:
                error_value, ok = _equal(case.oracle(args), ref_out)
                rows.append(dict(base, backend="reference", status="ok" if ok else "WRONG", max_error=error_value,
                                 ms=ref_ms, against=case.oracle.__doc__.strip().split(":")[0]))
            for name in dispatch.BACKENDS:
                if name not in known:
                    continue
                row = dict(base, backend=name, max_error=None, ms=None)
                why = known[name].reasons(device, args)
                if why:
                    rows.append(dict(row, status="unavailable", reason="; ".join(why)))
                    continue
                try:
                    out, ms = _timed(lambda: known[name].fn(*args), device, reps)
                    error_value, ok = case.compare(ref_out, out, dtype)
                    row.update(status="ok" if ok else "WRONG", max_error=error_value, ms=ms,
                               speedup=(ref_ms / ms) if ref_ms and ms else None)
                except Exception as error:  # noqa: BLE001 - a backend that raises is reported, not fatal
                    row.update(status="error", error=_short(error))
                if row["status"] != "ok" and exclude_failures:
                    what = (f"max error {row['max_error']:.3g} vs the reference" if row["status"] == "WRONG"
                            else row["error"])
                    dispatch.exclude(case.op, name, f"sed-fast doctor: {row['status']} on {case.shape} "
                                                    f"{base['dtype']} ({what})")
                    row["excluded"] = True
                rows.append(row)
    covered = {case.op for case in CASES}
    for op in dispatch.ops():
        if op not in covered:  # e.g. an op added after these cases were written: said, not hidden
            rows.append({"op": op, "shape": None, "dtype": None, "backend": ",".join(dispatch._known(op)),
                         "status": "not checked", "max_error": None, "ms": None,
                         "reason": "sed-fast doctor has no small-input case for this op yet"})
    return rows


def dispatch_table(device: torch.device, dtype: torch.dtype) -> List[Dict[str, object]]:
    """What "auto" (or the requested backend) runs for each op on the small inputs, and why."""
    from ..kernels import dispatch

    rows = []
    for case in CASES:
        case_dtype = (case.dtypes or (dtype,))[0]
        args = case.make(device, case_dtype, torch.Generator().manual_seed(0))
        known = dispatch._known(case.op)
        reasons = {name: dispatch._reasons(case.op, name, device, args) for name in dispatch.BACKENDS if name in known}
        row: Dict[str, object] = {"op": case.op,
                                  "backends": {n: ("; ".join(r) or "usable") for n, r in reasons.items()}}
        try:
            requested = dispatch.requested_backend(case.op)
            row["requested"] = requested
            row["chosen"] = dispatch.resolve_name(case.op, device, args)
            if requested != "auto":
                row["why"] = _request_source(case.op)
            else:
                skipped = [f"{n}: {reasons[n][0]}" for n in dispatch.BACKENDS if n in reasons and reasons[n]
                           and dispatch.BACKENDS.index(n) < dispatch.BACKENDS.index(row["chosen"])]
                timed = device.type == "cuda" and dispatch.autotune_enabled()
                row["why"] = ("the fastest measured (SED_FAST_AUTOTUNE)" if timed else
                              "auto: the first usable of " + ", ".join(dispatch.BACKENDS)) + (
                    " (skipped " + "; ".join(skipped) + ")" if skipped else "")
        except Exception as error:  # noqa: BLE001 - e.g. the requested backend cannot run here
            row.update(chosen=None, why=_short(error))
        rows.append(row)
    covered = {case.op for case in CASES}
    for op in dispatch.ops():
        if op in covered:
            continue
        usable = dispatch.available_backends(op, device)
        rows.append({"op": op, "backends": {n: "runs on this device" if n in usable else "not here"
                                            for n in dispatch._known(op)},
                     "requested": dispatch.requested_backend(op), "chosen": usable[0] if usable else None,
                     "why": "without inputs: the first backend that runs on this device (inputs may narrow it)"})
    return rows


def _request_source(op: str) -> str:
    import os

    from ..kernels import dispatch

    if op in dispatch._overrides:
        return "set_backend() in this process"
    variable = f"SED_FAST_BACKEND_{op.upper()}"
    return f"{variable}={os.environ[variable]}" if os.environ.get(variable) else \
        f"SED_FAST_BACKEND={os.environ.get('SED_FAST_BACKEND')}"


# -- end to end -------------------------------------------------------------------------------------------
def check_end_to_end(device: torch.device, dtype: torch.dtype = torch.float32, resolution: int = 64,
                     classes: int = 5, image_size: Tuple[int, int] = (96, 128), cer_topk: Optional[int] = 2,
                     variant: str = "b", preprocess: str = "official") -> Dict[str, object]:
    """The fast model against the reference on the drawn sample image (random weights, random unit
    text embeddings, exact decoding and CER): scores within tolerance, labels equal except on
    pixels whose reference top-two scores are closer than the scores' own difference (a tie).
    ``preprocess="none"`` skips the official resize (shortest edge to 640), which interpreted
    Triton takes minutes over; the resize op is checked on its own by :func:`check_backends`."""
    import warnings

    import torch.nn.functional as F

    from ..api import RandomWeightsWarning, build_sed
    from ..models.config import NUM_PROMPTS
    from ..data.sample_scene import draw_sample_scene as draw_sample
    from ..models.fast.model import SEDFast

    start = time.perf_counter()
    result: Dict[str, object] = {"variant": variant, "resolution": resolution, "classes": classes,
                                 "image": list(image_size), "dtype": str(dtype).replace("torch.", ""),
                                 "preprocess": preprocess, "runs": []}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            reference = build_sed(variant, impl="reference", device=device, dtype=torch.float32,
                                  clip_resolution=resolution, text_cache=False, preprocess=preprocess)
        gen = torch.Generator().manual_seed(0)
        reference.text_embeddings = F.normalize(torch.randn(classes, NUM_PROMPTS, reference.spec.embed_dim,
                                                            generator=gen), dim=-1).to(device)
        reference.class_names = [f"class{i}" for i in range(classes)]
        fast = SEDFast.from_reference(reference) if dtype == torch.float32 else None
        if fast is None:  # another dtype: its own copy of the weights
            fast = SEDFast.from_reference(build_sed(variant, impl="reference", device=device, dtype=dtype,
                                                    clip_resolution=resolution, text_cache=False,
                                                    preprocess=preprocess))
            fast.text_embeddings, fast.class_names = reference.text_embeddings, reference.class_names
        height, width = image_size
        import numpy as np
        image = torch.from_numpy(np.array(draw_sample(height, width), dtype=np.uint8)).permute(2, 0, 1).to(device)
        for topk in (None, cer_topk) if cer_topk else (None,):
            reference.cer_topk = topk
            fast.cer_topk = topk
            expected = reference([image])[0]
            got = fast([image])[0]
            labels_ref = reference.predict_labels([image])[0]
            labels_fast = fast.predict_labels([image])[0]
            diff = float((got - expected).abs().max())
            top2 = expected.topk(min(2, classes), dim=0).values
            margin = (top2[0] - top2[-1]) if classes > 1 else torch.full_like(top2[0], float("inf"))
            differ = labels_ref != labels_fast
            unexplained = int((differ & (margin > 2 * diff)).sum())
            ok = diff <= E2E_TOLERANCE[dtype] and unexplained == 0 and bool(torch.isfinite(got).all())
            result["runs"].append({"cer_topk": topk, "max_score_diff": diff, "pixels": int(differ.numel()),
                                   "labels_differ": int(differ.sum()), "labels_differ_not_ties": unexplained,
                                   "ok": ok})
        result["ok"] = all(run["ok"] for run in result["runs"])
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        result.update(ok=False, error=_short(error))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def in_process_mode() -> Dict[str, object]:
    """Triton's mode in this process (fixed when it was imported)."""
    from ..kernels import dispatch

    return {"triton_interpreter_mode": dispatch.triton_interpreter_mode(),
            "TRITON_INTERPRET": dispatch.triton_interpreter_on(), "triton_imported": "triton" in sys.modules}
