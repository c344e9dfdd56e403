"""The hand-written CUDA backend (csrc/, sed_fast.kernels.cuda_extension) and the backend selection.

(a) the extension compiles (here too, without a GPU: a build break fails CI);
(b) each op's backends (torch, triton, cuda) against the references of sed_fast.kernels.<op>, odd
    shapes, ties, every dtype, outputs poisoned before the call (unwritten elements show up);
(c) torch.library.opcheck of the sed_fast_cuda ops (CUDA), their fake kernels on meta / fake tensors
    (anywhere the library loads);
(d) set_backend, the environment variables and the auto chooser, with dummy implementations.

On a GPU machine, tools/compute_sanitizer.sh runs this file under compute-sanitizer
(SED_FAST_SANITIZER=1 selects the small shape set).
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import os
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from sed_fast.kernels import cuda_extension, autotune, dispatch

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
SANITIZER = os.environ.get("SED_FAST_SANITIZER", "0") not in ("", "0")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
BACKENDS = ["torch", "triton", "cuda"]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _op_module(name: str):
    """sed_fast.kernels.<name> (the reference and the public op), or a visible skip."""
    try:
        return importlib.import_module(f"sed_fast.kernels.{name}")
    except ImportError as exc:
        pytest.skip(f"sed_fast.kernels.{name} is not importable ({exc})")


def _seed(*parts) -> int:
    """A per-case seed that does not change between runs (unlike hash() of strings)."""
    return zlib.crc32(repr(parts).encode())


def _device_for(backend: str) -> torch.device:
    """The device a backend test runs on, or a visible skip."""
    if backend == "torch":
        return torch.device("cuda" if HAS_GPU else "cpu")
    if not HAS_GPU:
        pytest.skip(f"the {backend} backend needs a CUDA GPU (none here); the Triton kernels are checked on CPU "
                    "by tests/kernels under TRITON_INTERPRET=1")
    if backend == "cuda" and not cuda_extension.load_extension():
        pytest.skip(f"the CUDA extension is not available: {cuda_extension.load_error()}")
    return torch.device("cuda")


@contextlib.contextmanager
def _forced_backend(op: str, backend: str):
    dispatch.set_backend(op, backend)
    try:
        yield
    finally:
        dispatch.set_backend(op, None)


def _poison_allocator(byte: int) -> None:
    """Fill cached CUDA blocks with ``byte`` so that tensors allocated next start as garbage
    (0xFF: NaN floats): an output element a kernel never writes then shows up in the comparison."""
    if not HAS_GPU:
        return
    small = [torch.full((256 << 10,), byte, dtype=torch.uint8, device="cuda") for _ in range(16)]  # small pool
    large = torch.full((96 << 20,), byte, dtype=torch.uint8, device="cuda")  # large pool
    del small, large


def _assert_close_like_torch(out, ref64, ref_lowp, dtype, what):
    """flash-attention's rule: our error vs fp64 <= 2x torch's own error in that dtype (+ atol)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite outputs (unwritten or NaN-poisoned elements)"
    err = (out.double() - ref64).abs().max().item()
    torch_err = (ref_lowp.double() - ref64).abs().max().item()
    atol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert err <= 2 * torch_err + atol, f"{what}: max error {err:.3g} > 2 x torch's {torch_err:.3g} + {atol}"
    rel = ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-12)).item()
    assert rel <= {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype], f"{what}: rel RMS {rel:.3g}"


# ---------------------------------------------------------------------------------------------------
# (a) the extension compiles
# ---------------------------------------------------------------------------------------------------
def _prebuilt_library() -> Path | None:
    found = sorted((ROOT / "sed_fast").glob("_C*.so")) + sorted((ROOT / "sed_fast").glob("_C*.pyd"))
    return found[0] if found else None


def _prebuilt_is_fresh(lib: Path) -> bool:
    newest_source = max(p.stat().st_mtime for p in (ROOT / "csrc").iterdir() if p.is_file())
    return lib.stat().st_mtime >= newest_source


CI_ARCHS = "9.0"  # what the compile check builds without a GPU: one architecture is enough to catch errors


def test_cuda_extension_compiles():
    """A prebuilt, up-to-date sed_fast._C counts; otherwise compile csrc/ with the JIT path in a
    subprocess (MAX_JOBS=2, sm_90 only) and load it there. A compile error FAILS this test."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} has no CUDA support: nothing to compile against")
    if cuda_extension.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc) found: set CUDA_HOME to compile the extension")
    lib = _prebuilt_library()
    if lib is not None and _prebuilt_is_fresh(lib):
        code = "import sed_fast._C, torch; torch.ops.sed_fast_cuda.topk_union_reject.default"
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"the prebuilt {lib.name} does not import:\n{run.stderr[-4000:]}"
        return
    build_dir = cuda_extension.default_build_directory(CI_ARCHS)  # shared with the cuda_library fixture
    code = textwrap.dedent(f"""
        import torch
        from sed_fast.kernels import cuda_extension
        path = cuda_extension.jit_build(build_directory={str(build_dir)!r}, archs={CI_ARCHS!r}, max_jobs=2)
        assert cuda_extension.ops_defined(), "the library loaded but registered no sed_fast_cuda ops"
        print(path)
    """)
    start = time.time()
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "SED_FAST_BUILD_CUDA": "1"})
    assert run.returncode == 0, (f"the CUDA extension failed to compile or load "
                                 f"({time.time() - start:.0f} s):\n{run.stdout[-2000:]}\n{run.stderr[-8000:]}")


# ---------------------------------------------------------------------------------------------------
# (b) kernels against the references
# ---------------------------------------------------------------------------------------------------
# (B, T, h, w, k): SED's shapes, odd shapes, k > T, k on the KMAX boundaries, k > 32 (radix path).
TOPK_CASES = [
    (1, 150, 24, 24, 8),
    (1, 847, 48, 48, 8),
    (2, 150, 24, 24, 1),
    (3, 37, 7, 5, 3),
    (1, 1, 1, 1, 1),
    (2, 5, 3, 3, 7),
    (2, 64, 1, 1, 2),
    (1, 300, 13, 11, 32),
    (2, 100, 9, 9, 33),
    (1, 2000, 6, 6, 5),
]
if SANITIZER:
    TOPK_CASES = [(1, 150, 24, 24, 8), (3, 37, 7, 5, 3), (2, 5, 3, 3, 7), (2, 100, 9, 9, 33)]


def _topk_input(kind: str, shape, dtype, device, generator):
    b, t, h, w = shape
    if kind == "ties":  # a few integer levels: many classes tie at the k-th place
        x = torch.randint(-3, 4, (b, t, h, w), generator=generator).float()
    elif kind == "inf":  # -inf rows (rejected classes in the model: absent) and +inf entries
        x = torch.randn(b, t, h, w, generator=generator)
        x[:, ::3] = float("-inf")
        x.view(-1)[::97] = float("inf")
    elif kind == "sparse":  # most classes absent: pixels with fewer than k present classes
        x = torch.randn(b, t, h, w, generator=generator)
        x[torch.rand(b, t, h, w, generator=generator) < 0.9] = float("-inf")
    elif kind == "nan":  # NaN counts as absent, like -inf
        x = torch.randn(b, t, h, w, generator=generator)
        x[torch.rand(b, t, h, w, generator=generator) < 0.2] = float("nan")
    else:
        x = torch.randn(b, t, h, w, generator=generator)
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["randn", "ties", "inf", "sparse", "nan"])
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "B{}-T{}-{}x{}-k{}".format(*c))
@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_union_reject_backends(backend, case, kind, dtype):
    mod = _op_module("topk_union_reject")
    device = _device_for(backend)
    b, t, h, w, k = case
    gen = torch.Generator().manual_seed(_seed(case, kind))
    aux = _topk_input(kind, (b, t, h, w), dtype, device, gen)
    expected = mod.topk_union_reject_reference(aux, k)
    for poison in (0x5A, 0xFF):
        _poison_allocator(poison)
        with _forced_backend("topk_union_reject", backend):
            got = mod.topk_union_reject(aux, k)
        for name, g, e in zip(("kept_mask", "flat_idx", "class_offsets"), got, expected):
            assert g.dtype == e.dtype and g.shape == e.shape, \
                f"{name}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}"
            assert g.device == aux.device, f"{name} on {g.device}"
            assert torch.equal(g.cpu(), e.cpu()), f"{name} differs from the reference (poison {poison:#x})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_union_reject_non_contiguous_input(backend):
    mod = _op_module("topk_union_reject")
    device = _device_for(backend)
    base = torch.randn(2, 60, 20, 17, device=device)
    aux = base[:, ::2, 1:, :]  # strided classes, offset rows
    with _forced_backend("topk_union_reject", backend):
        got = mod.topk_union_reject(aux, 4)
    for g, e in zip(got, mod.topk_union_reject_reference(aux.contiguous(), 4)):
        assert torch.equal(g.cpu(), e.cpu())


# (N, C, H, W): SED's ConvNeXt blocks (C=128 at 24x24 and chunked rows, 64, 32 at larger sizes) and
# sizes that are not multiples of the 8x8 / 16x8 tiles.
DW_CASES = [
    (3, 128, 24, 24),
    (2, 128, 7, 13),
    (1, 128, 6, 6),
    (2, 64, 48, 48),
    (3, 64, 11, 30),
    (1, 32, 96, 96),
    (2, 32, 29, 50),
    (1, 32, 192, 17),
]
if SANITIZER:
    DW_CASES = [(2, 128, 7, 13), (3, 64, 11, 30), (2, 32, 29, 50)]


def _dw_params(c, k, dtype, device, gen):
    mk = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=gen) * scale + shift).to(device, dtype)  # noqa: E731
    return (mk(c, 1, k, k, scale=0.1), mk(c, scale=0.1), mk(c, scale=0.2, shift=1.0), mk(c, scale=0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "row_slice"])
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "N{}-C{}-{}x{}".format(*c))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dwconv_layernorm_backends(backend, case, layout, dtype):
    mod = _op_module("dwconv_layernorm")
    device = _device_for(backend)
    n, c, h, w = case
    if device.type == "cpu" and (dtype != torch.float32 or n * c * h * w > 100_000):
        pytest.skip("CPU: the torch backend (the reference itself) is checked on small fp32 cases only")
    gen = torch.Generator().manual_seed(_seed(case, layout))
    x = torch.randn(n + (1 if layout == "row_slice" else 0), c, h, w, generator=gen).to(device, dtype)
    if layout == "contiguous":
        x = x.contiguous()
    else:
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "row_slice":  # the model passes x[start:stop] of a channels-last batch
        x = x[1:]
    params = _dw_params(c, 9, dtype, device, gen)
    eps = 1e-6
    ref64 = mod.dwconv_layernorm_reference(x.double(), *(p.double() for p in params), eps)
    ref_lowp = mod.dwconv_layernorm_reference(x, *params, eps)
    _poison_allocator(0xFF)
    with _forced_backend("dwconv_layernorm", backend):
        out = mod.dwconv_layernorm(x, *params, eps)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (n, h, w, c)
    _assert_close_like_torch(out, ref64, ref_lowp, dtype, f"dwconv_layernorm[{backend}]")


def test_dwconv_layernorm_cuda_rejects_unsupported_shapes():
    """K != 9 or C outside {32, 64, 128}: a clear error, and the backend says why (auto skips it)."""
    x = torch.randn(1, 96, 8, 8)
    w = torch.randn(96, 1, 9, 9)
    v = torch.randn(96)
    assert cuda_extension.dwconv_layernorm_reasons(x, w) == ["C = 96 channels (the CUDA kernel takes 32, 64 or 128)"]
    with pytest.raises(ValueError, match="32, 64 or 128"):
        cuda_extension.dwconv_layernorm_cuda(x, w, v, v, v)
    x, w, v = torch.randn(1, 64, 8, 8), torch.randn(64, 1, 7, 7), torch.randn(64)
    assert cuda_extension.dwconv_layernorm_reasons(x, w) == ["a 7x7 kernel (the CUDA kernel is 9x9 only)"]
    with pytest.raises(ValueError, match="9x9 only"):
        cuda_extension.dwconv_layernorm_cuda(x, w, v, v, v)


def test_supports_follows_the_launch_limits_of_csrc():
    """The backend gives reasons where csrc/ops.cpp would raise, so auto never picks a launch that
    fails (meta tensors: the shapes are huge, the memory is not)."""
    w = torch.empty(32, 1, 9, 9, device="meta")
    assert cuda_extension.dwconv_layernorm_reasons(torch.empty(847, 32, 96, 96, device="meta"), w) == []
    assert cuda_extension.dwconv_layernorm_reasons(torch.empty(2 ** 20, 32, 512, 512, device="meta"), w)  # 2^32 tiles
    assert cuda_extension.topk_union_reject_reasons(torch.empty(1, 847, 24, 24, device="meta"), 8) == []
    assert cuda_extension.topk_union_reject_reasons(torch.empty(65536, 1, 1, 1, device="meta"), 8)
    assert cuda_extension.topk_union_reject_reasons(torch.empty(40000, 60000, 1, 1, device="meta"), 8)
    cuda = dispatch.backend("topk_union_reject", "cuda")
    assert cuda.not_supported_reasons is cuda_extension.topk_union_reject_reasons


def test_topk_union_reject_cuda_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be >= 1"):
        cuda_extension.topk_union_reject_cuda(torch.randn(1, 3, 2, 2), 0)
    with pytest.raises(ValueError, match="T = 0"):
        cuda_extension.topk_union_reject_cuda(torch.randn(1, 0, 2, 2), 1)
    with pytest.raises(ValueError, match=r"\(B, T, h, w\)"):
        cuda_extension.topk_union_reject_cuda(torch.randn(3, 2, 2), 1)
    with pytest.raises(TypeError):
        cuda_extension.topk_union_reject_cuda(torch.randn(1, 3, 2, 2), 2.0)


def _needs_cuda_ext():
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU (none here)")
    if not cuda_extension.load_extension():
        pytest.skip(f"the CUDA extension is not available: {cuda_extension.load_error()}")


def test_cuda_ops_check_their_inputs():
    """The C++ TORCH_CHECKs: clear messages for what the Python wrappers do not catch."""
    _needs_cuda_ext()
    ops = torch.ops.sed_fast_cuda
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        ops.topk_union_reject(torch.randn(1, 4, 2, 2, device="cuda"), 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.topk_union_reject(torch.randn(1, 4, 2, 2, device="cuda", dtype=torch.float64), 1)
    with pytest.raises(RuntimeError, match=r"\(B, T, h, w\)"):
        ops.topk_union_reject(torch.randn(4, 2, 2, device="cuda"), 1)
    x = torch.randn(1, 64, 8, 8, device="cuda")
    w, v = torch.randn(64, 1, 9, 9, device="cuda"), torch.randn(64, device="cuda")
    with pytest.raises(RuntimeError, match="parameters must have x's dtype"):
        ops.dwconv_layernorm(x, w.half(), v, v, v, 1e-6)
    with pytest.raises(RuntimeError, match="K = 9 and C in"):
        ops.dwconv_layernorm(torch.randn(1, 96, 8, 8, device="cuda"), torch.randn(96, 1, 9, 9, device="cuda"),
                             torch.randn(96, device="cuda"), torch.randn(96, device="cuda"),
                             torch.randn(96, device="cuda"), 1e-6)
    with pytest.raises((RuntimeError, NotImplementedError)):
        ops.topk_union_reject(torch.randn(1, 4, 2, 2), 1)  # no CPU kernel


def test_cuda_ops_empty_inputs():
    """No pixels / no images: well-formed outputs, no launch errors."""
    _needs_cuda_ext()
    kept, flat, offsets = torch.ops.sed_fast_cuda.topk_union_reject(torch.randn(2, 5, 0, 3, device="cuda"), 2)
    assert not kept.any() and (flat == -1).all() and offsets.tolist() == [0, 0, 0]
    kept, flat, offsets = torch.ops.sed_fast_cuda.topk_union_reject(torch.randn(0, 5, 3, 3, device="cuda"), 2)
    assert kept.shape == (0, 5) and flat.numel() == 0 and offsets.tolist() == [0]
    y = torch.ops.sed_fast_cuda.dwconv_layernorm(torch.randn(0, 32, 8, 8, device="cuda"),
                                                 torch.randn(32, 1, 9, 9, device="cuda"),
                                                 *(torch.randn(32, device="cuda") for _ in range(3)), 1e-6)
    assert y.shape == (0, 8, 8, 32)


def test_cuda_ops_under_cuda_graph_capture():
    """The kernels run on the current stream: a captured graph replays them with new inputs."""
    _needs_cuda_ext()
    mod = _op_module("topk_union_reject")
    aux = torch.randn(1, 150, 24, 24, device="cuda")
    x = torch.randn(4, 128, 24, 24, device="cuda").contiguous(memory_format=torch.channels_last)
    params = _dw_params(128, 9, torch.float32, "cuda", torch.Generator().manual_seed(0))
    ops = torch.ops.sed_fast_cuda
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (the smem opt-in happens here)
        ops.topk_union_reject(aux, 8)
        ops.dwconv_layernorm(x, *params, 1e-6)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kept, flat, offsets = ops.topk_union_reject(aux, 8)
        y = ops.dwconv_layernorm(x, *params, 1e-6)
    aux.copy_(torch.randn_like(aux))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip((kept, flat, offsets), mod.topk_union_reject_reference(aux, 8)):
        assert torch.equal(g, e)
    ref = _op_module("dwconv_layernorm").dwconv_layernorm_reference(x.double(), *(p.double() for p in params), 1e-6)
    assert (y.double() - ref).abs().max().item() < 1e-3


# ---------------------------------------------------------------------------------------------------
# (c) op registration: opcheck on CUDA, fake kernels anywhere the library loads
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_library():
    """The sed_fast_cuda ops loaded in this process (prebuilt, or JIT-built even without a GPU)."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} has no CUDA support")
    if not cuda_extension.load_extension():
        if cuda_extension.find_cuda_home() is None or not cuda_extension.sources_present():
            pytest.skip(f"the CUDA extension is not available and cannot be built here: {cuda_extension.load_error()}")
        if HAS_GPU:
            assert cuda_extension.load_extension(jit=True), \
                f"the CUDA extension failed to build: {cuda_extension.load_error()}"
        else:  # no GPU: the same build as test_cuda_extension_compiles (a no-op when it ran first)
            cuda_extension.jit_build(cuda_extension.default_build_directory(CI_ARCHS), archs=CI_ARCHS, max_jobs=2)
            assert cuda_extension.load_extension(), f"the CUDA extension does not load: {cuda_extension.load_error()}"
    return torch.ops.sed_fast_cuda


def test_cuda_library_schemas(cuda_library):
    assert str(cuda_library.topk_union_reject.default._schema) == \
        "sed_fast_cuda::topk_union_reject(Tensor aux_logits, int k) -> (Tensor, Tensor, Tensor)"
    assert str(cuda_library.dwconv_layernorm.default._schema) == (
        "sed_fast_cuda::dwconv_layernorm(Tensor x, Tensor dw_weight, Tensor dw_bias, Tensor ln_weight, "
        "Tensor ln_bias, float eps) -> Tensor")
    # the fake kernels live in the module the C++ library names (torch.compile imports it from there)
    assert torch._C._dispatch_pystub("sed_fast_cuda::topk_union_reject", "")[0] == "sed_fast.kernels.cuda_extension"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_library_fake_kernels_on_meta(cuda_library, dtype):
    aux = torch.empty(3, 37, 7, 5, device="meta", dtype=dtype)
    kept, flat, offsets = cuda_library.topk_union_reject(aux, 4)
    assert (kept.shape, kept.dtype) == ((3, 37), torch.bool)
    assert (flat.shape, flat.dtype) == ((111,), torch.int32)
    assert (offsets.shape, offsets.dtype) == ((4,), torch.int32)
    x = torch.empty(2, 64, 11, 30, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
    params = [torch.empty(64, 1, 9, 9, device="meta", dtype=dtype)] + \
        [torch.empty(64, device="meta", dtype=dtype) for _ in range(3)]
    y = cuda_library.dwconv_layernorm(x, *params, 1e-6)
    assert y.shape == (2, 11, 30, 64) and y.dtype == dtype and y.is_contiguous()


def test_cuda_library_traces_with_symbolic_shapes(cuda_library):
    """make_fx with fake tensors and symbolic shapes runs only the fake kernels: the ops compose
    with torch.compile / export (the real kernels are not run, so this works without a GPU)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(aux, x, w, b, g, beta):
        kept, flat, offsets = cuda_library.topk_union_reject(aux, 8)
        return offsets[-1] + flat.sum(), cuda_library.dwconv_layernorm(x, w, b, g, beta, 1e-6)

    args = (torch.randn(2, 150, 24, 24), torch.randn(3, 32, 10, 12).contiguous(memory_format=torch.channels_last),
            torch.randn(32, 1, 9, 9), torch.randn(32), torch.randn(32), torch.randn(32))
    graph = make_fx(f, tracing_mode="symbolic")(*args)
    code = graph.code
    assert "sed_fast_cuda.topk_union_reject" in code and "sed_fast_cuda.dwconv_layernorm" in code


def test_cuda_ops_under_torch_compile(cuda_library):
    """The ops in a torch.compile'd function (fullgraph): same results as eager."""
    _needs_cuda_ext()

    def f(aux, x, w, b, g, beta):
        kept, flat, offsets = cuda_library.topk_union_reject(aux * 2.0, 8)
        return kept, flat, offsets, cuda_library.dwconv_layernorm(x + 1.0, w, b, g, beta, 1e-6)

    aux = torch.randn(2, 150, 24, 24, device="cuda")
    x = torch.randn(3, 64, 24, 24, device="cuda").contiguous(memory_format=torch.channels_last)
    params = _dw_params(64, 9, torch.float32, "cuda", torch.Generator().manual_seed(3))
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    for got, want in zip(compiled(aux, x, *params), f(aux, x, *params)):
        assert torch.equal(got, want) if got.dtype != torch.float32 else torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_registrations_on_meta(cuda_library, dtype):
    """opcheck (schema, autograd registration, fake tensor, AOT dispatch with dynamic shapes) on meta
    tensors: the registrations and fake kernels, without a GPU (the real kernels: the tests below)."""
    aux = torch.empty(2, 37, 7, 5, device="meta", dtype=dtype)
    torch.library.opcheck(cuda_library.topk_union_reject.default, (aux, 3))
    x = torch.empty(2, 64, 11, 9, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
    params = [torch.empty(64, 1, 9, 9, device="meta", dtype=dtype)] + \
        [torch.empty(64, device="meta", dtype=dtype) for _ in range(3)]
    torch.library.opcheck(cuda_library.dwconv_layernorm.default, (x, *params, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_topk_union_reject_cuda(cuda_library, dtype):
    _needs_cuda_ext()
    aux = torch.randn(2, 37, 7, 5, device="cuda", dtype=dtype)
    torch.library.opcheck(cuda_library.topk_union_reject.default, (aux, 3))
    torch.library.opcheck(cuda_library.topk_union_reject.default, (aux, 40))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels", [32, 64, 128])
def test_opcheck_dwconv_layernorm_cuda(cuda_library, dtype, channels):
    _needs_cuda_ext()
    x = torch.randn(2, channels, 11, 9, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    params = _dw_params(channels, 9, dtype, "cuda", torch.Generator().manual_seed(1))
    torch.library.opcheck(cuda_library.dwconv_layernorm.default, (x, *params, 1e-6))


# ---------------------------------------------------------------------------------------------------
# (d) backend selection with dummy implementations
# ---------------------------------------------------------------------------------------------------
DUMMY = "sed_fast_test_dummy_op"


@pytest.fixture
def dummy_op(monkeypatch):
    """A dummy op with torch / triton / cuda impls that say who ran; availability switchable."""
    calls = []
    avail = {"triton": True, "cuda": True}

    def impl(name):
        def fn(x, scale=1):
            calls.append(name)
            return x * scale
        return fn

    dispatch.register_impl(DUMMY, "torch", impl("torch"))
    dispatch.register_impl(DUMMY, "triton", impl("triton"), unavailable=lambda d: None if avail["triton"] else "off")
    dispatch.register_impl(DUMMY, "cuda", impl("cuda"), unavailable=lambda d: None if avail["cuda"] else "off")
    for var in ("SED_FAST_BACKEND", f"SED_FAST_BACKEND_{DUMMY.upper()}"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("SED_FAST_AUTOTUNE", raising=False)
    autotune.clear_cache()
    yield calls, avail
    for table in (dispatch._backends, dispatch._overrides):
        table.pop(DUMMY, None)
    dispatch.set_autotune(None)
    autotune.clear_cache()


def test_set_backend_and_env_vars(dummy_op, monkeypatch):
    cpu = torch.device("cpu")
    assert dispatch.resolve_name(DUMMY, cpu) == "cuda"  # no autotune: preference order, availability faked
    monkeypatch.setenv("SED_FAST_BACKEND", "triton")
    assert dispatch.resolve_name(DUMMY, cpu) == "triton"
    monkeypatch.setenv(f"SED_FAST_BACKEND_{DUMMY.upper()}", "torch")  # per-op beats global
    assert dispatch.resolve_name(DUMMY, cpu) == "torch"
    dispatch.set_backend(DUMMY, "cuda")  # set_backend beats both
    assert dispatch.resolve_name(DUMMY, cpu) == "cuda"
    dispatch.set_backend(DUMMY, None)
    assert dispatch.resolve_name(DUMMY, cpu) == "torch"
    monkeypatch.setenv(f"SED_FAST_BACKEND_{DUMMY.upper()}", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        dispatch.resolve_name(DUMMY, cpu)
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.set_backend(DUMMY, "fortran")
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.set_backend("no_such_op", "torch")


def test_forced_backend_that_cannot_run_is_an_error(dummy_op):
    calls, avail = dummy_op
    avail["cuda"] = False
    dispatch.set_backend(DUMMY, "cuda")
    with pytest.raises(RuntimeError, match="cannot run"):
        dispatch.resolve(DUMMY, torch.device("cpu"))
    dispatch.set_backend(DUMMY, None)
    assert dispatch.resolve_name(DUMMY, torch.device("cpu")) in ("triton", "torch")


def test_cuda_backend_unavailable_without_extension_warns_once(monkeypatch):
    monkeypatch.setattr(cuda_extension._State, "loaded", False)
    monkeypatch.setattr(cuda_extension._State, "error", "test: no extension")
    monkeypatch.setattr(cuda_extension._State, "warned", False)
    monkeypatch.setattr(cuda_extension, "ops_defined", lambda: False)
    assert cuda_extension.cuda_available(torch.device("cpu")) is False  # CPU: no load attempt, no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cuda_extension.cuda_available(torch.device("cuda")) is False
        assert cuda_extension.cuda_available(torch.device("cuda")) is False
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "test: no extension" in messages[0] and "SED_FAST_JIT_BUILD" in messages[0]


def test_cuda_backend_is_registered_for_its_ops():
    for op in cuda_extension.OPS:
        cuda = dispatch.backend(op, "cuda")
        assert cuda.fn.__name__ == f"{op}_cuda"
        assert "CUDA tensor" in cuda.unavailable(torch.device("cpu"))


def test_jit_policy(monkeypatch):
    monkeypatch.setenv("SED_FAST_JIT_BUILD", "1")
    assert cuda_extension._jit_policy()[0] is True
    monkeypatch.setenv("SED_FAST_JIT_BUILD", "0")
    assert cuda_extension._jit_policy()[0] is False
    monkeypatch.delenv("SED_FAST_JIT_BUILD")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    want, why = cuda_extension._jit_policy()
    assert want is False and "no CUDA GPU" in why


def test_build_helpers(monkeypatch, tmp_path):
    assert cuda_extension.gencode_flags("9.0+PTX") == ["-gencode=arch=compute_90,code=sm_90",
                                              "-gencode=arch=compute_90,code=compute_90"]
    assert cuda_extension.gencode_flags("8.0;9.0a") == ["-gencode=arch=compute_80,code=sm_80",
                                               "-gencode=arch=compute_90a,code=sm_90a"]
    assert cuda_extension.default_max_jobs() >= 1
    monkeypatch.setenv("SED_FAST_CUDA_BUILD_DIR", str(tmp_path))
    assert cuda_extension.default_build_directory() == tmp_path
    monkeypatch.delenv("SED_FAST_CUDA_BUILD_DIR")
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path))
    assert str(cuda_extension.default_build_directory("9.0")).startswith(str(tmp_path / "cuda_ext"))


def test_setup_cuda_extensions_opt_in(monkeypatch):
    """setup.py's _cuda_extensions(): unset or SED_FAST_BUILD_CUDA=0 builds nothing (a plain
    `pip install -e .` needs no torch at build time); =1, with torch CUDA and a toolkit, one
    CUDAExtension named sed_fast._C with ninja; any other value is an error."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign))
            and not (isinstance(n, ast.ImportFrom) and n.module == "setuptools")
            and not (isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Tuple))]
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102
    monkeypatch.delenv("SED_FAST_BUILD_CUDA", raising=False)
    assert namespace["_cuda_extensions"]() == ([], {})
    monkeypatch.setenv("SED_FAST_BUILD_CUDA", "0")
    assert namespace["_cuda_extensions"]() == ([], {})
    monkeypatch.setenv("SED_FAST_BUILD_CUDA", "maybe")
    with pytest.raises(RuntimeError, match="SED_FAST_BUILD_CUDA"):
        namespace["_cuda_extensions"]()
    if torch.version.cuda is None or cuda_extension.find_cuda_home() is None:
        return
    monkeypatch.setenv("SED_FAST_BUILD_CUDA", "1")
    for var in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CUDA_HOME"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test
    monkeypatch.chdir(ROOT)
    exts, cmdclass = namespace["_cuda_extensions"]()
    assert [e.name for e in exts] == ["sed_fast._C"] and "build_ext" in cmdclass
    assert sorted(Path(s).name for s in exts[0].sources) == sorted(cuda_extension.SOURCES)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == os.environ.get("SED_FAST_CUDA_ARCHS", "9.0+PTX")


# -- the auto chooser ------------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu_timing(monkeypatch):
    """Make the chooser believe it is on a GPU; timings come from a table (ms per backend)."""
    table = {"cuda": 1.0, "triton": 2.0, "torch": 3.0}
    timed = []

    def fake_time(fn, args, kwargs, device, iters=None):
        name = next(n for n, b in dispatch._backends[DUMMY].items() if b.fn is fn)
        timed.append(name)
        fn(*args, **kwargs)
        return table[name]

    monkeypatch.setattr(autotune, "time_backend", fake_time)
    monkeypatch.setattr(autotune, "_device_name", lambda device: "FakeGPU 80GB")
    monkeypatch.setattr(autotune, "measuring_allowed", lambda device, args=(), kwargs=None: True)
    return table, timed


def test_auto_measures_once_per_shape_bucket(dummy_op, fake_gpu_timing):
    calls, _ = dummy_op
    table, timed = fake_gpu_timing
    dispatch.set_autotune(True)
    dev = torch.device("cuda", 0)
    x = torch.randn(3, 150)
    table.update(cuda=5.0, triton=1.0)
    assert dispatch.resolve_name(DUMMY, dev, (x,)) == "triton"
    assert sorted(timed) == ["cuda", "torch", "triton"]
    assert dispatch.resolve_name(DUMMY, dev, (torch.randn(3, 160),)) == "triton"  # same bucket (256)
    assert len(timed) == 3  # cached
    table.update(cuda=0.5)
    assert dispatch.resolve_name(DUMMY, dev, (torch.randn(3, 600),)) == "cuda"  # new bucket: measured
    assert len(timed) == 6


def test_auto_drops_a_backend_that_raises(dummy_op, fake_gpu_timing):
    dispatch.set_autotune(True)

    def broken(x, scale=1):
        raise RuntimeError("kernel exploded")

    dispatch.register_impl(DUMMY, "cuda", broken, unavailable=lambda d: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dispatch.resolve_name(DUMMY, torch.device("cuda", 0), (torch.randn(4),)) == "triton"


def test_auto_respects_supports(dummy_op, fake_gpu_timing):
    _, timed = fake_gpu_timing
    dispatch.set_autotune(True)
    dispatch.register_impl(DUMMY, "cuda", dispatch.backend(DUMMY, "cuda").fn, unavailable=lambda d: None,
                           not_supported_reasons=lambda x, scale=1: ["96 columns"] if x.shape[-1] == 96 else [])
    assert dispatch.resolve_name(DUMMY, torch.device("cuda", 0), (torch.randn(2, 96),)) == "triton"
    assert "cuda" not in timed


def test_auto_never_measures_during_graph_capture(dummy_op, monkeypatch):
    dispatch.set_autotune(True)
    monkeypatch.setattr(autotune, "_device_name", lambda device: "FakeGPU 80GB")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    before = autotune.measurements
    assert dispatch.resolve_name(DUMMY, torch.device("cuda", 0), (torch.randn(4),)) == "cuda"
    assert autotune.measurements == before
    assert not autotune.measuring_allowed(torch.device("cuda", 0), (torch.randn(4),))


def test_auto_never_measures_fake_tensors(dummy_op):
    assert not autotune.measuring_allowed(torch.device("cuda", 0), (torch.empty(3, device="meta"),))
    assert not autotune.measuring_allowed(torch.device("cpu"), (torch.randn(3),))


def test_auto_is_opt_in_and_without_inputs_uses_the_preference_order(dummy_op, fake_gpu_timing):
    table, timed = fake_gpu_timing
    dev = torch.device("cuda", 0)
    table.update(cuda=9.0)
    assert dispatch.resolve_name(DUMMY, dev, (torch.randn(8),)) == "cuda"  # autotune off: preference order
    dispatch.set_autotune(True)
    assert dispatch.resolve_name(DUMMY, dev) == "cuda"  # no inputs: nothing to measure on
    assert timed == []
    assert dispatch.resolve_name(DUMMY, dev, (torch.randn(8),)) == "triton"
    assert len(timed) == 3


def test_no_usable_backend_lists_every_reason(dummy_op):
    calls, avail = dummy_op
    dispatch.register_impl(DUMMY, "torch", lambda x, scale=1: x, unavailable=lambda d: "torch is off too")
    avail.update(cuda=False, triton=False)
    with pytest.raises(dispatch.BackendError, match="cuda: off; triton: off; torch: torch is off too"):
        dispatch.resolve(DUMMY, torch.device("cpu"), (torch.randn(2),))


def test_auto_disk_cache_round_trip(dummy_op, fake_gpu_timing, monkeypatch, tmp_path):
    table, timed = fake_gpu_timing
    monkeypatch.setenv("SED_FAST_AUTOTUNE_CACHE", "1")
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path))
    dispatch.set_autotune(True)
    dev = torch.device("cuda", 0)
    table.update(torch=0.1)
    assert dispatch.resolve_name(DUMMY, dev, (torch.randn(5, 7),), {"scale": 2}) == "torch"
    files = list((tmp_path / "autotune").glob("*.json"))
    assert len(files) == 1
    autotune.clear_cache()  # a new process: the choice comes back from disk, unmeasured
    n = len(timed)
    assert dispatch.resolve_name(DUMMY, dev, (torch.randn(5, 7),), {"scale": 2}) == "torch"
    assert len(timed) == n


def test_shape_bucket():
    a = autotune.shape_bucket((torch.randn(3, 150), 8))
    b = autotune.shape_bucket((torch.randn(4, 200), 8))
    c = autotune.shape_bucket((torch.randn(4, 200), 9))
    d = autotune.shape_bucket((torch.randn(4, 200, dtype=torch.float16), 8))
    assert a == b and b != c and b != d


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none here)")
def test_auto_on_gpu_picks_a_working_backend():
    mod = _op_module("dwconv_layernorm")
    autotune.clear_cache()
    dispatch.set_autotune(True)
    x = torch.randn(6, 96, 12, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    params = _dw_params(96, 9, torch.float32, "cuda", torch.Generator().manual_seed(2))
    name = dispatch.resolve_name("dwconv_layernorm", x.device, (x, *params, 1e-6))
    assert name in ("triton", "torch")  # C=96: the cuda kernel does not support it
    out = mod.dwconv_layernorm(x, *params, 1e-6)
    assert torch.isfinite(out).all()
