"""Set-up for the kernel tests: devices, forced Triton backend, NaN-poisoned allocations, tolerances.

Triton fixes its mode when it is imported: with TRITON_INTERPRET=1 every ``triton.jit`` function
(Triton's own ``tl.sum``... included) is interpreted, for every device, for the whole process.
So one pytest process checks the kernels either through the interpreter or compiled:

* no CUDA device, or TRITON_INTERPRET=1 given: interpreter mode. Triton is imported (by tests/conftest.py) with the
  variable set, which is then restored, so that other test directories in the same session keep
  the fast torch path on CPU; ``cpu-interpreter`` tests set it again while they run (the backend
  registry offers "triton" for CPU tensors only then). ``cuda`` tests are skipped.
* a CUDA device and no TRITON_INTERPRET: compiled mode; ``cuda`` tests run, ``cpu-interpreter``
  tests are skipped (run ``TRITON_INTERPRET=1 pytest tests/kernels`` for them).
"""
from __future__ import annotations

import math

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

from sed_fast.kernels import dispatch  # noqa: E402  (tests/conftest.py imported Triton in its mode)


INTERPRETER_MODE = dispatch.triton_interpreter_mode()
KERNEL_OPS = ("cost_map", "dwconv_layernorm", "class_attention", "topk_union_reject", "gather_rows",
              "cost_map_backward", "class_attention_backward", "dwconv_layernorm_backward")

DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu-interpreter", marks=[
        pytest.mark.interpreter,
        pytest.mark.skipif(not INTERPRETER_MODE, reason="Triton was imported in compiled mode in this process; "
                           "run TRITON_INTERPRET=1 pytest tests/kernels for the interpreter tests")]),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here"),
        pytest.mark.skipif(HAS_CUDA and INTERPRETER_MODE, reason="Triton runs in interpreter mode in this process "
                           "(TRITON_INTERPRET=1): compiled CUDA kernels are tested without it")]),
]
DTYPE_PARAMS = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request, monkeypatch):
    """The device under test, with the Triton interpreter on for CPU."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device(request.param)


@pytest.fixture(params=DTYPE_PARAMS)
def dtype(request):
    return request.param


@pytest.fixture
def triton_backend(device):
    """Force the Triton implementation of every op (on CUDA "auto" could pick another backend)."""
    for op in KERNEL_OPS:
        dispatch.set_backend(op, "triton")
    yield device
    for op in KERNEL_OPS:
        dispatch.set_backend(op, None)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta" or t.numel() == 0:
        return t
    if t.is_floating_point():
        return t.fill_(math.nan)
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-777)  # a value no index or count can take


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like / new_empty return NaN (True, -777) filled tensors, like fla's conftest,
    so an output element a kernel never writes shows up in the comparison."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(real_new_empty(self, *a, **k)))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def relative_rms(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float64 (fla's measure)."""
    value, reference = value.double().cpu(), reference.double().cpu()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


FP32_RELATIVE_TOLERANCE = 1e-5
LOW_PRECISION_FLOOR = 1e-5  # relative RMS; only matters when torch's own error is ~0


def assert_close_like_torch(out: torch.Tensor, reference32: torch.Tensor, reference_lowp: torch.Tensor,
                            dtype: torch.dtype, what: str = "") -> None:
    """float32: relative RMS error <= 1e-5. bfloat16 / float16: our error against the float32
    reference <= 2x the error PyTorch's own reference makes in that dtype (flash-attention's rule)."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert out.shape == reference32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(reference32.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element was never written?)"
    error = relative_rms(out, reference32)
    if dtype == torch.float32:
        assert error <= FP32_RELATIVE_TOLERANCE, f"{what}: relative RMS error {error:.3g} > {FP32_RELATIVE_TOLERANCE}"
    else:
        torch_error = relative_rms(reference_lowp, reference32)
        bound = 2 * torch_error + LOW_PRECISION_FLOOR
        assert error <= bound, f"{what}: relative RMS error {error:.3g} > 2 x torch's {torch_error:.3g} + floor"


@pytest.fixture
def close_like_torch():
    return assert_close_like_torch
