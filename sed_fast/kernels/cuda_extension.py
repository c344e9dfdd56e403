"""The hand-written CUDA backend (``csrc/``): loading the extension and registering its ops.

The kernels are compiled into ``sed_fast._C`` by ``setup.py`` (with ``SED_FAST_BUILD_CUDA=1``), or
just in time from ``csrc/`` with ninja into a cache directory. They register the ops
``torch.ops.sed_fast_cuda.topk_union_reject`` and ``torch.ops.sed_fast_cuda.dwconv_layernorm``
(CUDA kernels in C++, fake kernels here, so torch.compile can trace them); this module registers
them as the ``"cuda"`` implementations of the sed_fast ops of the same names.

Loading is lazy: importing this module never compiles. The first time a ``"cuda"`` implementation is
asked for on a CUDA device, :func:`load_extension` tries, in order:

1. ``import sed_fast._C`` (the build made by setup.py);
2. the JIT build (``torch.utils.cpp_extension.load``, ninja, cached): when ``SED_FAST_JIT_BUILD=1``,
   or when the variable is unset and a CUDA GPU, a CUDA toolkit and the ``csrc/`` sources are all
   present. ``SED_FAST_JIT_BUILD=0`` disables it. The first build takes a few minutes; later
   processes reuse the cached library (rebuilt when a source or a flag changes).

If neither works, one warning says why and the ``"cuda"`` backend reports itself unavailable: the
package keeps working with the triton and torch backends.

Environment variables (all in the README's table): ``SED_FAST_JIT_BUILD``, ``SED_FAST_CUDA_ARCHS``,
``SED_FAST_CUDA_BUILD_DIR``, ``MAX_JOBS``, ``CUDA_HOME``.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .._build import CXX_FLAGS, DEFAULT_ARCHS, NVCC_FLAGS, SOURCES, default_max_jobs, find_cuda_home, gencode_flags
from ..base.envvars import cache_root, env_value
from . import dispatch
from .topk_union_reject import check_topk

logger = logging.getLogger("sed_fast.cuda")

LIBRARY = "sed_fast_cuda"
OPS = ("topk_union_reject", "dwconv_layernorm")
JIT_NAME = "sed_fast_C"
BUILD_CACHE_FOLDER = "cuda_ext"  # JIT builds go to cache_root() / BUILD_CACHE_FOLDER / extension_tag()
CSRC_DIR = Path(__file__).resolve().parent.parent.parent / "csrc"


class ExtensionNotAvailable(RuntimeError):
    """The CUDA extension could not be imported or built."""


class _State:
    loaded: Optional[bool] = None  # None: not tried yet
    how: str = ""
    error: str = ""
    warned: bool = False
    fakes_registered: bool = False


_lock = threading.RLock()


def _arch_list() -> str:
    archs = env_value("SED_FAST_CUDA_ARCHS")
    if archs:
        return archs
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
    return DEFAULT_ARCHS


def extension_tag(archs: Optional[str] = None) -> str:
    """Names the build: torch and CUDA versions and the architectures."""
    archs = archs or _arch_list()
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-sm{archs}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)


def default_build_directory(archs: Optional[str] = None) -> Path:
    folder = env_value("SED_FAST_CUDA_BUILD_DIR")
    if folder is not None:
        return folder
    return cache_root() / BUILD_CACHE_FOLDER / extension_tag(archs)


def sources() -> List[str]:
    return [str(CSRC_DIR / name) for name in SOURCES]


def sources_present() -> bool:
    return all(os.path.isfile(s) for s in sources())


# -- building and loading ---------------------------------------------------------------------------

def ops_defined() -> bool:
    """True when the sed_fast_cuda ops are registered in this process (by either build)."""
    return hasattr(getattr(torch.ops, LIBRARY), "topk_union_reject")


def jit_build(build_directory: Optional[os.PathLike] = None, archs: Optional[str] = None,
              max_jobs: Optional[int] = None, verbose: bool = False) -> str:
    """Compile ``csrc/`` with ninja (cached in ``build_directory``) and load it into this process.

    Returns the library path. Raises on a compile error (tests rely on it: a build break fails).
    """
    if not sources_present():
        raise ExtensionNotAvailable(f"the CUDA sources are not in {CSRC_DIR} (an installed wheel has none: "
                                    "build the extension with setup.py instead)")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise ExtensionNotAvailable("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        raise ExtensionNotAvailable(f"torch {torch.__version__} is not built with CUDA")
    archs = archs or _arch_list()
    build_directory = Path(build_directory) if build_directory else default_build_directory(archs)
    build_directory.mkdir(parents=True, exist_ok=True)

    import torch.utils.cpp_extension as cpp_extension
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # computed at import; an nvcc wrapper on PATH fools it
    previous_jobs = os.environ.get("MAX_JOBS")
    if max_jobs is not None or previous_jobs is None:
        os.environ["MAX_JOBS"] = str(max_jobs or default_max_jobs())
    try:
        path = cpp_extension.load(
            name=JIT_NAME,
            sources=sources(),
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS + gencode_flags(archs),  # hashed: a new arch rebuilds
            extra_include_paths=[str(CSRC_DIR)],
            build_directory=str(build_directory),
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if previous_jobs is None:
            os.environ.pop("MAX_JOBS", None)
        else:
            os.environ["MAX_JOBS"] = previous_jobs
    return str(path)


def _jit_policy() -> Tuple[bool, str]:
    forced = env_value("SED_FAST_JIT_BUILD")
    if forced is not None:
        if forced:
            return True, "SED_FAST_JIT_BUILD=1"
        return False, "the JIT build is disabled (SED_FAST_JIT_BUILD=0)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU, so no JIT build (SED_FAST_JIT_BUILD=1 forces one)"
    if not sources_present():
        return False, f"no CUDA sources in {CSRC_DIR} to build"
    if find_cuda_home() is None:
        return False, "no CUDA toolkit (nvcc) found to build the extension"
    return True, "a GPU is present"


def load_extension(jit: Optional[bool] = None, verbose: bool = False) -> bool:
    """Load the CUDA ops (prebuilt ``sed_fast._C``, else the JIT build); True when they are loaded.

    ``jit``: None follows ``SED_FAST_JIT_BUILD`` (see the module docstring); True forces the JIT
    build when no prebuilt extension imports; False never builds. The result is remembered: later
    calls return at once (a failed load is retried only when ``jit`` is given explicitly).
    """
    with _lock:
        if _State.loaded is False and jit is None and ops_defined():
            _State.loaded, _State.how = None, "loaded by jit_build"  # e.g. jit_build() called directly
        if _State.loaded is True or (_State.loaded is False and jit is None):
            return bool(_State.loaded)
        errors = []
        if ops_defined():
            _State.how = "already loaded"
        else:
            try:
                importlib.import_module("sed_fast._C")
                _State.how = "prebuilt sed_fast._C"
            except (ImportError, OSError) as exc:  # absent, or built for another torch / CUDA
                errors.append(f"import sed_fast._C failed ({exc})")
            if not ops_defined():
                want, why = (jit, "requested") if jit is not None else _jit_policy()
                if want:
                    logger.warning("sed_fast: building the CUDA extension just in time (%s; a few minutes the "
                                   "first time, cached in %s)", why, default_build_directory())
                    try:
                        _State.how = f"JIT build {jit_build(verbose=verbose)}"
                    except Exception as exc:  # compile errors, missing toolkit...
                        errors.append(f"JIT build failed: {type(exc).__name__}: {exc}")
                else:
                    errors.append("JIT build not attempted: " + why)
        _State.loaded = ops_defined()
        if _State.loaded:
            _register_fakes()
            _State.error = ""
            logger.info("sed_fast CUDA extension: %s", _State.how)
        else:
            _State.error = "; ".join(errors)
        return _State.loaded


def extension_loaded() -> bool:
    """True when the CUDA ops are loaded (does not try to load them)."""
    return bool(_State.loaded) or ops_defined()


def how_loaded() -> str:
    """How the extension was loaded (the prebuilt library, a JIT build, ...; "" when it is not)."""
    return _State.how if extension_loaded() else ""


def load_error() -> str:
    """Why the extension is not loaded ("" when it is, or was never tried)."""
    return _State.error


def _warn_once() -> None:
    if _State.warned:
        return
    _State.warned = True
    warnings.warn(
        "sed_fast: the CUDA extension is not available, so the 'cuda' backend is off (the triton and torch "
        f"backends still work). Reason: {_State.error}. Build it with `SED_FAST_BUILD_CUDA=1 pip install "
        "--no-build-isolation -e .` (CUDA toolkit needed) or set SED_FAST_JIT_BUILD=1.", RuntimeWarning, stacklevel=3)


def cuda_unavailable(device: torch.device) -> Optional[str]:
    """Why the "cuda" backend cannot run on ``device`` (None when it can): it needs a CUDA device
    and a loadable extension (loading it on first use, building it just in time if allowed)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA kernels need a CUDA tensor, not {device}"
    if load_extension():
        return None
    _warn_once()
    return f"the CUDA extension is not available ({_State.error})"


def cuda_available(device: torch.device) -> bool:
    return cuda_unavailable(device) is None


# -- fake (meta) kernels ----------------------------------------------------------------------------

def _fake_topk_union_reject(aux_logits, k):
    torch._check(aux_logits.dim() == 4, lambda: "topk_union_reject: aux_logits must be (B, T, h, w)")
    batch, classes = aux_logits.shape[0], aux_logits.shape[1]
    return (aux_logits.new_empty((batch, classes), dtype=torch.bool),
            aux_logits.new_empty((batch * classes,), dtype=torch.int32),
            aux_logits.new_empty((batch + 1,), dtype=torch.int32))


def _fake_dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, eps):
    torch._check(x.dim() == 4, lambda: "dwconv_layernorm: x must be (N, C, H, W)")
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, c))


def _register_fakes() -> None:
    if _State.fakes_registered:
        return
    torch.library.register_fake(f"{LIBRARY}::topk_union_reject", _fake_topk_union_reject)
    torch.library.register_fake(f"{LIBRARY}::dwconv_layernorm", _fake_dwconv_layernorm)
    _State.fakes_registered = True


# -- the "cuda" implementations of the sed_fast ops --------------------------------------------------

def _require_loaded() -> None:
    if not load_extension():
        raise ExtensionNotAvailable(f"sed_fast CUDA extension not available: {_State.error}")


def topk_union_reject_cuda(aux_logits: torch.Tensor, k: int):
    """(kept_mask (B, T) bool, flat_idx (B*T,) int32, class_offsets (B+1,) int32); see
    sed_fast.kernels.topk_union_reject."""
    check_topk(k)
    if aux_logits.dim() != 4:
        raise ValueError(f"topk_union_reject: aux_logits must be (B, T, h, w), got shape {tuple(aux_logits.shape)}")
    if aux_logits.shape[1] == 0:
        raise ValueError("topk_union_reject: aux_logits has T = 0 classes")
    _require_loaded()
    return torch.ops.sed_fast_cuda.topk_union_reject(aux_logits, k)


def dwconv_layernorm_reasons(x, dw_weight, *args, **kwargs) -> List[str]:
    """Why the CUDA kernel cannot take these inputs: it handles K = 9 and C in {32, 64, 128} within
    the launch limits csrc/ops.cpp checks (fewer than 2^31 8x8 tiles). Input that is not
    channels-last is copied to channels-last first (the Triton kernel reads any strides in place)."""
    reasons = []
    if x.dim() != 4 or dw_weight.dim() != 4:
        return [f"x {tuple(x.shape)} and dw_weight {tuple(dw_weight.shape)} must be 4-D"]
    if tuple(dw_weight.shape[-2:]) != (9, 9):
        reasons.append(f"a {dw_weight.shape[-2]}x{dw_weight.shape[-1]} kernel (the CUDA kernel is 9x9 only)")
    if x.shape[1] not in (32, 64, 128):
        reasons.append(f"C = {x.shape[1]} channels (the CUDA kernel takes 32, 64 or 128)")
    batch, _, height, width = x.shape
    if height * width >= 2 ** 31 or batch * -(-height // 8) * -(-width // 8) >= 2 ** 31:
        reasons.append("2^31 or more 8x8 tiles")
    return reasons


def topk_union_reject_reasons(aux_logits, k, *args, **kwargs) -> List[str]:
    """The launch limits csrc/ops.cpp checks: at most 65535 images, fewer than 2^31 (image, class) rows."""
    if aux_logits.dim() != 4:
        return [f"aux_logits {tuple(aux_logits.shape)} must be 4-D"]
    reasons = []
    if aux_logits.shape[0] > 65535:
        reasons.append(f"B = {aux_logits.shape[0]} images (at most 65535)")
    if aux_logits.shape[0] * aux_logits.shape[1] >= 2 ** 31:
        reasons.append("2^31 or more (image, class) rows")
    return reasons


def dwconv_layernorm_cuda(x: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                          ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Depthwise KxK conv (padding K//2, bias) then LayerNorm over C: (N, C, H, W) -> (N, H, W, C)."""
    reasons = dwconv_layernorm_reasons(x, dw_weight)
    if reasons:
        raise ValueError(f"dwconv_layernorm (cuda backend) cannot take x {tuple(x.shape)} and dw_weight "
                         f"{tuple(dw_weight.shape)}: {'; '.join(reasons)}; use the triton or torch backend")
    _require_loaded()
    return torch.ops.sed_fast_cuda.dwconv_layernorm(x, dw_weight, dw_bias, ln_weight, ln_bias, float(eps))


def register() -> None:
    """Register the "cuda" implementations (idempotent; loads nothing)."""
    dispatch.register_impl("topk_union_reject", "cuda", topk_union_reject_cuda, unavailable=cuda_unavailable,
                           not_supported_reasons=topk_union_reject_reasons)
    dispatch.register_impl("dwconv_layernorm", "cuda", dwconv_layernorm_cuda, unavailable=cuda_unavailable,
                           not_supported_reasons=dwconv_layernorm_reasons)


register()
