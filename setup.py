"""Build script for sed_fast.

The pure-Python package always installs. The optional CUDA extension (``csrc/``) is added by
``_cuda_extensions()`` when a CUDA toolkit and a CUDA-enabled torch are importable at build time
(use ``pip install --no-build-isolation`` so the build sees the installed torch).
"""
import glob
import os
import shutil
import warnings

from setuptools import find_packages, setup


def _find_cuda_home():
    """$CUDA_HOME / $CUDA_PATH, else the toolkit of nvcc on PATH (seen through wrapper scripts by
    looking for include/cuda_runtime.h), else /usr/local/cuda[-*]."""
    candidates = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _default_max_jobs():
    """min(cores, available memory / 4 GB): nvcc on torch headers takes 2-4 GB per job."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if ":" in line}
        mem_gb = info.get("MemAvailable", info.get("MemTotal", 0)) / (1 << 20)
        return max(1, min(cores, int(mem_gb // 4)))
    except (OSError, ValueError, IndexError):
        return max(1, min(cores, 4))


def _cuda_extensions():
    """The CUDA extension modules and build command class, or ([], {}) when not building them.

    Environment: SED_FAST_BUILD_CUDA=0 skips the extension (=1 makes a missing toolkit an error);
    SED_FAST_CUDA_ARCHS sets the architectures (default "9.0+PTX": sm_90 code plus PTX that newer
    GPUs compile at load); MAX_JOBS the parallel compile jobs (default min(cores, memory / 4 GB)).
    """
    mode = os.environ.get("SED_FAST_BUILD_CUDA", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return [], {}
    forced = mode in ("1", "true", "yes", "on")

    def skip(reason):
        if forced:
            raise RuntimeError(f"SED_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        warnings.warn(f"sed_fast: not building the CUDA extension sed_fast._C ({reason}); the triton and torch "
                      "backends still work. Use `pip install --no-build-isolation .` so the build sees torch.")
        return [], {}

    try:
        import torch
    except ImportError:
        return skip("torch is not importable at build time")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} has no CUDA support")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    cpp_extension.CUDA_HOME = cuda_home  # computed at import: an nvcc wrapper script can fool it

    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("SED_FAST_CUDA_ARCHS", "9.0+PTX")
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return skip(f"no sources in {csrc}")
    extension = CUDAExtension(
        name="sed_fast._C",
        sources=sources,
        include_dirs=[csrc],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="sed_fast",
    version="0.1.0",
    description="Fast inference for SED (open-vocabulary semantic segmentation) with Triton and CUDA kernels",
    packages=find_packages(include=["sed_fast", "sed_fast.*", "benchmarks", "benchmarks.*"]),
    package_data={"sed_fast": ["data/vocabularies/*.json", "data/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "open_clip_torch>=2.24",
        "timm>=1.0",
        "numpy",
        "ninja",
        "pybind11",
        "pillow",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"], "plots": ["matplotlib"]},
    entry_points={"console_scripts": ["sed-fast=sed_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
