"""Build script: the package metadata is in pyproject.toml; this adds the optional CUDA extension.

The pure-Python package installs anywhere, with no torch at build time (``pip install -e .``). The
CUDA extension ``sed_fast._C`` (``csrc/``) is built here only when asked for with
``SED_FAST_BUILD_CUDA=1``, which needs the installed torch and a CUDA toolkit:

    SED_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .

Without it, a GPU machine with a toolkit builds the same sources just in time on first use
(``sed_fast/kernels/cuda_extension.py``), and the package works with its Triton and PyTorch paths meanwhile.
"""
import importlib.util
import os

from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    # By path: the package itself (and torch) may not be importable while it is being built.
    spec = importlib.util.spec_from_file_location("_sed_fast_build", os.path.join(_HERE, "sed_fast", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extensions():
    """(ext_modules, cmdclass) of the CUDA extension, or ([], {}) unless SED_FAST_BUILD_CUDA=1."""
    mode = os.environ.get("SED_FAST_BUILD_CUDA", "").strip().lower()
    if mode in ("", "0", "false", "no", "off"):
        return [], {}
    if mode not in ("1", "true", "yes", "on"):
        raise RuntimeError(f"SED_FAST_BUILD_CUDA={mode!r}: expected 1/true/yes/on or 0/false/no/off")
    build = _load_build_helpers()
    try:
        import torch
    except ImportError:
        raise RuntimeError("SED_FAST_BUILD_CUDA=1 needs torch at build time: install torch first and use "
                           "`pip install --no-build-isolation -e .`") from None
    if torch.version.cuda is None:
        raise RuntimeError(f"SED_FAST_BUILD_CUDA=1 but torch {torch.__version__} has no CUDA support")
    cuda_home = build.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("SED_FAST_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cpp_extension.CUDA_HOME = cuda_home  # computed at import: an nvcc wrapper script can fool it
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("SED_FAST_CUDA_ARCHS", build.DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(build.default_max_jobs()))
    extension = CUDAExtension(
        name="sed_fast._C",
        sources=[os.path.join("csrc", name) for name in build.SOURCES],
        include_dirs=[os.path.join(_HERE, "csrc")],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
