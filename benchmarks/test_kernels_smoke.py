"""pytest-benchmark view of the kernel benchmark at small CPU sizes (not part of the default test run):

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-compare     # against the previous saved run

Each case of ``sed_fast.bench.kernels`` (smoke shapes, T = 9) is timed twice: the official PyTorch code
and the sed_fast op (the backend "auto" picks: torch on CPU). The outputs are checked against each
other first. ``SED_FAST_BENCH_DEVICE=cuda`` runs the same cases on the GPU (still small shapes; use
``python -m sed_fast.bench.kernels`` for the real ones).
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="these cases need pytest-benchmark (the `test` extra)")

from sed_fast.bench import kernels  # noqa: E402

DEVICE = torch.device(os.environ.get("SED_FAST_BENCH_DEVICE", "cpu"))
CASES = kernels.build_cases(kernels.OPS, [9], kernels.SMOKE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("impl", ["official", "sed_fast"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape}" for c in CASES])
def test_kernel(benchmark, case, impl):
    import sed_fast.kernels as ops

    inputs = case.make(DEVICE, torch.float32)
    expected = case.official(inputs)
    got = case.fast(ops, inputs)
    assert case.compare(expected, got) <= (0.0 if case.exact else 1e-4 * case.scale(expected))
    fn = (lambda: case.official(inputs)) if impl == "official" else (lambda: case.fast(ops, inputs))

    def run():
        fn()
        _sync()

    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(op=case.op, shape=case.shape, impl=impl, bytes=case.bytes(4), flops=case.flops)
    benchmark(run)
