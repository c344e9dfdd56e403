"""Every Triton kernel compiles for the H100 (sm_90) at the model's real shapes, without a GPU.

The interpreter tests check what the kernels compute; they cannot see a kernel that does not compile
for a GPU, or one that spills registers or asks for more shared memory than a block may have.
``sed_fast.bench.compile_report`` compiles each launcher's real launches for sm_90 with Triton's own
compiler and ptxas; these tests run it in a subprocess (Triton must not be in interpreter mode, which
this test process may be) and check what it reports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS_PER_CASE_SET = {"_cost_map_kernel", "_dwconv_layernorm_kernel", "_class_attention_kernel",
                        "_kth_largest_kernel", "_union_kernel", "_compact_kernel", "_gather_rows_kernel",
                        "_resample_pass_kernel",
                        "_grad_image_kernel", "_grad_text_kernel", "_normalize_backward_kernel",
                        "_class_attention_backward_kernel", "_layernorm_backward_kernel",
                        "_conv_backward_input_kernel", "_conv_backward_weight_kernel"}
# A regression guard, not a hard limit: the kernels spill nothing today.
MAX_SPILL_BYTES = 256


def _compiled_mode_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _nvidia_backend_or_skip():
    probe = subprocess.run(
        [sys.executable, "-c", "from triton.backends.nvidia.compiler import get_ptxas; print(get_ptxas(90).path)"],
        capture_output=True, text=True, env=_compiled_mode_env(), timeout=300)
    lines = probe.stdout.strip().splitlines()
    if probe.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        pytest.skip(f"Triton's NVIDIA backend or its ptxas is not available here: {probe.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def sm90_report(tmp_path_factory):
    _nvidia_backend_or_skip()
    out = tmp_path_factory.mktemp("compile_report") / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "sed_fast.bench.compile_report", "--arch", "90", "--classes", "150", "--variants", "b",
         "--dtypes", "float32,bfloat16,float16", "--max-spill-bytes", str(MAX_SPILL_BYTES), "--quiet",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, env=_compiled_mode_env(), timeout=1500)
    assert out.exists(), f"compile_report wrote no JSON (rc {result.returncode}):\n{result.stdout[-3000:]}\n" \
                         f"{result.stderr[-3000:]}"
    return result, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90_in_every_dtype(sm90_report):
    result, report = sm90_report
    assert report["failures"] == [], report["failures"]
    seen = {(row["kernel"], row["dtype"]) for row in report["kernels"]}
    for dtype in ("float32", "bfloat16", "float16"):
        for kernel in KERNELS_PER_CASE_SET:
            assert (kernel, dtype) in seen, f"{kernel} [{dtype}] was not compiled"


def test_no_kernel_breaks_a_limit_or_spills(sm90_report):
    result, report = sm90_report
    problems = [f"{r['case']} {r['kernel']} [{r['dtype']}]: {r['problems']}"
                for r in report["kernels"] if r["problems"]]
    assert problems == [], "\n".join(problems)
    for row in report["kernels"]:
        assert row["registers"] is not None and 0 < row["registers"] <= 255, row
        assert row["spill_stores"] <= MAX_SPILL_BYTES, row
        assert row["shared_bytes"] <= 232448, row
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The cost map's tl.dot is software-pipelined through shared memory: a sign the tensor-core path was taken.
    cost_map = [r for r in report["kernels"] if r["kernel"] == "_cost_map_kernel"]
    assert cost_map and all(r["shared_bytes"] > 0 for r in cost_map)


def test_cuda_extension_kernels_are_listed_when_built(sm90_report):
    """The built extension's kernels (read with cuobjdump) appear with sane register counts."""
    import importlib.util
    result, report = sm90_report
    if importlib.util.find_spec("sed_fast._C") is None:
        pytest.skip("the CUDA extension is not built here (SED_FAST_BUILD_CUDA=0 or no toolkit)")
    names = [k["kernel"] for k in report["cuda_extension"]]
    for expected in ("dwconv_layernorm_kernel", "topk_mark_kernel", "topk_compact_kernel"):
        assert any(name.startswith(expected) for name in names), (expected, names)
    for kernel in report["cuda_extension"]:
        assert 0 < kernel["registers"] <= 255 and kernel["stack_bytes"] <= MAX_SPILL_BYTES, kernel


def test_the_report_catches_a_kernel_the_interpreter_accepts(tmp_path):
    """tl.dot on 8x8 tiles runs under the interpreter, but the GPU compiler rejects it (tiles of 16 at
    least): the report must list it as a failure and exit 1, not pass it."""
    _nvidia_backend_or_skip()
    (tmp_path / "tiny_dot.py").write_text(textwrap.dedent('''
        import torch, triton, triton.language as tl

        @triton.jit
        def tiny_dot_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
            tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))

        def launch(dtype):
            a = torch.empty((8, 8), dtype=dtype)
            tiny_dot_kernel[(1,)](a, torch.empty_like(a), BLOCK=8)
    '''))
    script = textwrap.dedent('''
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import tiny_dot
        from sed_fast.bench import compile_report as cr
        rows, failures = cr.compile_cases([cr.Case("tiny dot", tiny_dot.launch)], [torch.float16], 90, usage=False)
        print("FAILURES", len(failures), "ROWS", len(rows))
        print(failures[0].error if failures else "")
    ''')
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env=_compiled_mode_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAILURES 1 ROWS 0" in result.stdout, result.stdout + result.stderr[-2000:]


def test_limit_checks_flag_what_exceeds_the_target():
    from sed_fast.bench.compile_report import CompiledKernel, _check_limits

    def row(**overrides):
        fields = dict(case="c", kernel="k", dtype="float32", constants={}, num_warps=4, num_stages=3,
                      shared_bytes=1024, registers=64, spill_stores=0, spill_loads=0, stack_bytes=0)
        fields.update(overrides)
        return CompiledKernel(**fields)

    fine = row()
    _check_limits(fine, 90, max_spill_bytes=0)
    assert fine.problems == []
    too_much_shared = row(shared_bytes=232449)
    _check_limits(too_much_shared, 90)
    assert any("shared memory" in p for p in too_much_shared.problems)
    too_many_registers = row(registers=200, num_warps=16)  # 200 * 512 threads > 65536
    _check_limits(too_many_registers, 90)
    assert any("registers" in p for p in too_many_registers.problems)
    spills = row(spill_stores=300)
    _check_limits(spills, 90)
    assert spills.problems == []  # reported, not a problem, unless a limit is set
    _check_limits(spills, 90, max_spill_bytes=256)
    assert any("spills" in p for p in spills.problems)
    a100_shared = row(shared_bytes=200_000)
    _check_limits(a100_shared, 80)
    assert any("shared memory" in p for p in a100_shared.problems)


def test_class_attention_steps_pay_no_layout_conversions(sm90_report):
    """A regression guard on the SASS: the class-attention kernel loads its tiles in the state's 3D
    layout; loaded as 2D tiles instead, each class step converted layouts through shared memory
    (16-40 barriers in the kernel). Now 3."""
    result, report = sm90_report
    rows = [r for r in report["kernels"] if r["kernel"] == "_class_attention_kernel"]
    assert rows
    if rows[0]["barriers"] is None:
        pytest.skip("cuobjdump not available: no SASS counts")
    assert all(r["barriers"] <= 4 for r in rows), [(r["case"], r["dtype"], r["barriers"]) for r in rows]
