"""Build helpers for the CUDA extension, shared by ``setup.py`` and the just-in-time build.

Standard library only: ``setup.py`` loads this file by path, before torch (or the package) can be
imported.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import List, Optional

#: Architectures built when none are asked for: sm_90 code (H100/H200) plus PTX that newer GPUs
#: compile when the library loads.
DEFAULT_ARCHS = "9.0+PTX"
#: Translation units of the extension, in ``csrc/``.
SOURCES = ("ops.cpp", "topk_union_reject.cu", "dwconv_layernorm.cu")
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the toolkit of ``nvcc`` on PATH (a
    wrapper script is seen through by looking for include/cuda_runtime.h), else /usr/local/cuda[-*]."""
    candidates: List[str] = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def default_max_jobs() -> int:
    """min(cores, available memory / 4 GB), at least 1: nvcc on torch headers takes 2-4 GB a job."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if ":" in line}
        mem_gb = info.get("MemAvailable", info.get("MemTotal", 0)) / (1 << 20)
        return max(1, min(cores, int(mem_gb // 4)))
    except (OSError, ValueError, IndexError):
        return max(1, min(cores, 4))


def gencode_flags(archs: str) -> List[str]:
    """nvcc -gencode flags for an arch list like ``"8.0;9.0+PTX"`` (``9.0a`` for sm_90a)."""
    flags = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"empty CUDA architecture list {archs!r}")
    return flags
