"""Compile every Triton kernel for a GPU target, on any machine (no GPU needed), and report its resources.

    python -m sed_fast.bench.compile_report                      # sm_90 (H100/H200), SED-B and SED-L shapes
    python -m sed_fast.bench.compile_report --arch 80 --dtypes bfloat16 --json out.json --md out.md

Why: the Triton interpreter (how CI runs the kernels on a CPU) checks what a kernel computes, not
whether it compiles for a GPU: it accepts code the compiler rejects (a ``tl.dot`` on tiles under 16,
dtype mismatches in a dot, non-power-of-two blocks), and says nothing about registers, spills or
shared memory. This report closes that gap without a GPU.

How: each case calls the op's Triton launcher (the code the model runs) with CPU tensors at the
model's real shapes, while Triton's driver is replaced by a compile-only one for the target and each
launch by a compile through its compile hook. So what is compiled is exactly what the launcher would launch on
that GPU: the same block sizes, warps, stages and argument specialisation (divisibility, strides of 1).
Nothing runs: the outputs are never written.

The CUDA extension's kernels (``sed_fast._C``, when built) are listed too: registers, stack and static
shared memory per template instance, read from the built library with ``cuobjdump``.

Per compiled kernel it reports registers per thread, spill stores/loads and the stack frame (``ptxas
-v`` on the kernel's PTX, with the ptxas Triton itself uses), the dynamic shared memory, and static
counts of barriers and shared-memory accesses in the SASS (in a loop body, a layout conversion or a
cross-warp reduction paid per iteration: how the class-attention kernel's were found); and it
checks the target's hard limits: shared memory per block, 255 registers per thread, the registers of
one block within the SM's register file. A kernel that fails to compile or breaks a limit makes the
command exit 1. Spills are reported (a performance problem, not an error), and count as over a limit
beyond ``--max-spill-bytes`` (CI sets it, so a change that makes a kernel spill fails there).

Must run in a process where Triton is not in interpreter mode (``TRITON_INTERPRET`` unset): Triton
fixes its mode at import.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from sed_fast.models.encoder import VARIANTS

from . import common
from .kernels import FULL

# Hard per-block limits by compute capability: (max dynamic shared memory per block with opt-in,
# 32-bit registers per SM). From the CUDA C Programming Guide's table of technical specifications.
TARGET_LIMITS = {
    80: (166912, 65536),   # A100
    86: (101376, 65536),   # RTX 30xx, A6000
    89: (101376, 65536),   # RTX 40xx, L4, L40
    90: (232448, 65536),   # H100, H200
}
MAX_REGISTERS_PER_THREAD = 255

# The model's real shapes (768x768 input), as the kernel benchmark times them; D per variant.
PROMPTS, COST_SIZE, LEVELS = FULL["prompts"], FULL["size"], FULL["levels"]
TOPK, KEPT = FULL["k"], FULL["kept"]
VARIANT_DIMS = {name: spec.embed_dim for name, spec in VARIANTS.items()}


@dataclass
class CompiledKernel:
    case: str
    kernel: str
    dtype: str
    constants: Dict[str, object]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_bytes: Optional[int] = None
    barriers: Optional[int] = None        # BAR instructions in the SASS (static count)
    shared_accesses: Optional[int] = None  # LDS/STS (and matrix variants) in the SASS (static count)
    problems: List[str] = field(default_factory=list)


@dataclass
class FailedCase:
    case: str
    dtype: str
    error: str


# ---------------------------------------------------------------------------------------------------
# Compile-only Triton driver
# ---------------------------------------------------------------------------------------------------
class _CompileOnlyDriver:
    """Just enough of Triton's driver interface for a launch to reach the compile hook."""

    DEVICE = "compile-only"  # a key no real device uses in Triton's per-device caches

    def __init__(self, target):
        self.target = target

    def is_active(self):
        return True

    def get_current_device(self):
        return self.DEVICE

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


class _NoDriver:
    """Stands where Triton had no driver (a machine without a GPU): any use raises what Triton raised."""

    def __init__(self, error: Exception):
        self.error = error

    def __getattr__(self, name):
        raise RuntimeError(str(self.error))


def _options_from(specialization_data: str) -> Dict[str, object]:
    """The launch's full compile options, from the JSON Triton hands its compile hooks (lists back to tuples)."""
    options = json.loads(specialization_data)["options"]
    return {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[List[object]]:
    """Within: every Triton launch compiles for ``sm_<arch>`` and appends the compiled kernel to the
    yielded list instead of running.

    Through Triton's public knobs: the active driver is one that only names the target, and the
    ``jit_cache_hook`` (called before each compile, with the launch's specialisation) compiles the
    kernel itself with ``triton.compile`` and answers "handled", so the launch neither compiles again
    nor runs. Nothing is cached for the fake device: every launch is compiled.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver

    from sed_fast.kernels import dispatch

    if dispatch.triton_interpreter_mode():  # fixed at Triton's import, whatever the variable says now
        raise RuntimeError("compile_report needs Triton in compiled mode: run it in a process started "
                           "without TRITON_INTERPRET")
    compiled: List[object] = []
    target = GPUTarget("cuda", arch, 32)

    def compile_instead_of_launch(*, fn, compile, **_):
        source = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        compiled.append(triton.compile(source, target=target, options=_options_from(compile["specialization_data"])))
        return True  # handled: the launch returns without compiling or running

    previous_hook = knobs.runtime.jit_cache_hook
    try:
        previous_driver = driver.active
    except RuntimeError as error:  # no GPU driver on this machine
        previous_driver = _NoDriver(error)
    driver.set_active(_CompileOnlyDriver(target))
    knobs.runtime.jit_cache_hook = compile_instead_of_launch
    try:
        yield compiled
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver.set_active(previous_driver)


# ---------------------------------------------------------------------------------------------------
# Resource usage from ptxas
# ---------------------------------------------------------------------------------------------------
def find_ptxas(arch: int) -> Optional[str]:
    """The ptxas Triton compiles with for ``sm_<arch>`` (Triton picks one of those it bundles per
    architecture), else one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        pass
    return shutil.which("ptxas")


_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, arch: int, ptxas: str) -> Dict[str, int]:
    """Registers, stack frame and spill bytes of the PTX's kernel on ``sm_<arch>`` (``ptxas -v``)."""
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", str(source), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")
    used, spills = _USED.search(text), _SPILLS.search(text)
    if used is None or spills is None:
        raise RuntimeError(f"could not read ptxas -v output: {text.strip()[-500:]}")
    return {"registers": int(used.group(1)), "stack_bytes": int(spills.group(1)),
            "spill_stores": int(spills.group(2)), "spill_loads": int(spills.group(3))}


@dataclass
class ExtensionKernel:
    kernel: str       # demangled name, template arguments included
    registers: int
    stack_bytes: int  # local memory per thread: spills or local arrays
    shared_bytes: int  # static shared memory


def find_cuobjdump() -> Optional[str]:
    """cuobjdump: bundled with Triton's NVIDIA backend, else on PATH."""
    try:
        import triton.backends.nvidia as nvidia
        bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


_RESOURCE_LINE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")


def extension_usage(library: Optional[str] = None) -> List[ExtensionKernel]:
    """Registers, stack and static shared memory of every kernel in the built CUDA extension
    (``sed_fast._C``, read with ``cuobjdump --dump-resource-usage``, no GPU needed); [] when the
    extension is not built. The SASS is that of the build's architectures (SED_FAST_CUDA_ARCHS)."""
    if library is None:
        import importlib.util
        spec = importlib.util.find_spec("sed_fast._C")
        library = spec.origin if spec is not None else None
    tool = find_cuobjdump()
    if not library or not tool:
        return []
    result = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {library}: {result.stderr.strip()[-500:]}")
    text = re.sub(r"\n\s+", " ", result.stdout)  # each function's usage is on the line after its name
    rows = []
    for mangled, registers, stack, shared in _RESOURCE_LINE.findall(text):
        rows.append(ExtensionKernel(_demangle(mangled), int(registers), int(stack), int(shared)))
    return rows


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    result = subprocess.run([tool, name], capture_output=True, text=True)
    text = re.sub(r"\(anonymous namespace\)::|sed_fast::|c10::", "", result.stdout.strip() or name)
    return re.sub(r"^void ", "", text.split("(", 1)[0])  # no return type, no parameter list


def sass_counts(cubin: bytes, cuobjdump: str) -> Dict[str, int]:
    """Static counts of block barriers and shared-memory accesses in a cubin's SASS. Inside a loop,
    they are layout conversions or cross-warp reductions that every iteration pays for."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {result.stderr.strip()[-500:]}")
    opcodes = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", result.stdout)
    return {"barriers": sum(op == "BAR" for op in opcodes),
            "shared_accesses": sum(op in ("LDS", "STS", "LDSM", "STSM") for op in opcodes)}


# ---------------------------------------------------------------------------------------------------
# Cases: the launchers at the model's shapes
# ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    launch: Callable[[torch.dtype], None]  # calls a Triton launcher with CPU tensors of that dtype


def _model_inputs(module: str, maker: str, dtype: torch.dtype, **shape) -> tuple:
    """The op file's example inputs at these model shapes, unset (nothing is run, only launched)."""
    make = getattr(importlib.import_module(f"sed_fast.kernels.{module}"), maker)
    return make("cpu", dtype, "model", None, True, **shape)


def _cost_map_case(classes: int, dim: int, variant: str) -> Case:
    shape = dict(dim=dim, classes=classes, prompts=PROMPTS, height=COST_SIZE, width=COST_SIZE)

    def launch(dtype):
        from sed_fast.kernels.cost_map import cost_map_triton
        cost_map_triton(*_model_inputs("cost_map", "example_inputs", dtype, **shape))
    return Case(f"cost_map SED-{variant.upper()} D={dim} T={classes} {COST_SIZE}x{COST_SIZE}", launch)


def _cost_map_backward_case(classes: int, dim: int, variant: str) -> Case:
    shape = dict(dim=dim, classes=classes, prompts=PROMPTS, height=COST_SIZE, width=COST_SIZE)

    def launch(dtype):
        from sed_fast.kernels.cost_map import cost_map_backward_triton
        cost_map_backward_triton(*_model_inputs("cost_map", "backward_example_inputs", dtype, **shape))
    return Case(f"cost_map backward SED-{variant.upper()} D={dim} T={classes} {COST_SIZE}x{COST_SIZE}", launch)


def _dwconv_case(classes: int, channels: int, side: int) -> Case:
    shape = dict(batch=classes, channels=channels, height=side, width=side)

    def launch(dtype):
        from sed_fast.kernels.dwconv_layernorm import dwconv_layernorm_triton
        dwconv_layernorm_triton(*_model_inputs("dwconv_layernorm", "example_inputs", dtype, **shape))
    return Case(f"dwconv_layernorm N={classes} C={channels} {side}x{side}", launch)


def _dwconv_backward_case(classes: int, channels: int, side: int) -> Case:
    shape = dict(batch=classes, channels=channels, height=side, width=side)

    def launch(dtype):
        from sed_fast.kernels.dwconv_layernorm import dwconv_layernorm_backward_triton
        dwconv_layernorm_backward_triton(*_model_inputs("dwconv_layernorm", "backward_example_inputs", dtype,
                                                        **shape))
    return Case(f"dwconv_layernorm backward N={classes} C={channels} {side}x{side}", launch)


def _class_attention_case(classes: int, channels: int, side: int) -> Case:
    shape = dict(classes=(classes,), pixels=side * side, channels=channels)

    def launch(dtype):  # q, k, v: views of one fused projection
        from sed_fast.kernels.class_attention import class_attention_triton
        q, k, v, offsets, heads, eps = _model_inputs("class_attention", "example_inputs", dtype, **shape)
        class_attention_triton(q, k, v, offsets, num_heads=heads, eps=eps)
    return Case(f"class_attention T={classes} P={side * side} C={channels}", launch)


def _class_attention_backward_case(classes: int, channels: int, side: int) -> Case:
    shape = dict(classes=(classes,), pixels=side * side, channels=channels)

    def launch(dtype):
        from sed_fast.kernels.class_attention import class_attention_backward_triton
        grad, q, k, v, offsets, heads, eps = _model_inputs("class_attention", "backward_example_inputs", dtype,
                                                           **shape)
        class_attention_backward_triton(grad, q, k, v, offsets, num_heads=heads, eps=eps)
    return Case(f"class_attention backward T={classes} P={side * side} C={channels}", launch)


def _rejection_case(classes: int, side: int) -> Case:
    def launch(dtype):
        from sed_fast.kernels.topk_union_reject import topk_union_reject_triton
        topk_union_reject_triton(*_model_inputs("topk_union_reject", "example_inputs", dtype, classes=classes,
                                                height=side, width=side, k=TOPK))
    return Case(f"topk_union_reject T={classes} {side}x{side} k={TOPK}", launch)


def _gather_case(classes: int, channels: int, side: int) -> Case:
    def launch(dtype):
        from sed_fast.kernels.topk_union_reject import gather_rows_triton
        gather_rows_triton(*_model_inputs("topk_union_reject", "gather_example_inputs", dtype, classes=classes,
                                          channels=channels, height=side, width=side, kept=KEPT))
    return Case(f"gather_rows {KEPT} of {classes} C={channels} {side}x{side}", launch)


def _pil_resize_case(height: int, width: int, new_h: int, new_w: int, horizontal_first: bool) -> Case:
    def launch(dtype):  # uint8 images: the case's dtype does not apply
        from sed_fast.kernels.pil_bilinear_resize import pil_bilinear_resize_triton
        image, new_h_, new_w_, _ = _model_inputs("pil_bilinear_resize", "example_inputs", torch.uint8,
                                                 height=height, width=width, new_h=new_h, new_w=new_w)
        pil_bilinear_resize_triton(image, new_h_, new_w_, horizontal_first)  # a decoded HWC photo, permuted
    order = "horizontal first" if horizontal_first else "vertical first"
    return Case(f"pil_bilinear_resize uint8 RGB {width}x{height} -> {new_w}x{new_h} ({order})", launch)


def build_cases(classes: Sequence[int], variants: Sequence[str]) -> List[Case]:
    # The official test-time resize (ResizeShortestEdge(640, 2560)) of a 1920x1080 photo, and of a tall
    # 1000x3000 one, which Pillow 13 resizes vertically first (each pass then reads the other layout).
    cases: List[Case] = [_pil_resize_case(1080, 1920, 640, 1138, horizontal_first=True),
                         _pil_resize_case(3000, 1000, 1920, 640, horizontal_first=False)]
    for t in classes:
        cases += [_cost_map_case(t, VARIANT_DIMS[v], v) for v in variants]
        cases += [_cost_map_backward_case(t, VARIANT_DIMS[v], v) for v in variants]
        for channels, side in LEVELS:
            cases += [_dwconv_case(t, channels, side), _dwconv_backward_case(t, channels, side),
                      _class_attention_case(t, channels, side),
                      _class_attention_backward_case(t, channels, side),
                      _rejection_case(t, side), _gather_case(t, channels, side)]
    return cases


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------
def _constants(kernel) -> Dict[str, object]:
    """The kernel's constexpr arguments that are block sizes or switches (names in capitals)."""
    src = getattr(kernel, "src", None)
    fn = getattr(src, "fn", None)
    constants = getattr(src, "constants", {}) or {}
    names = getattr(fn, "arg_names", [])
    result = {}
    for key, value in constants.items():
        index = key[0] if isinstance(key, tuple) and len(key) == 1 else key
        name = names[index] if isinstance(index, int) and index < len(names) else str(index)
        if isinstance(name, str) and name.isupper():
            result[name] = value
    return dict(sorted(result.items()))


def _check_limits(row: CompiledKernel, arch: int, max_spill_bytes: Optional[int] = None) -> None:
    max_shared, registers_per_sm = TARGET_LIMITS.get(arch, TARGET_LIMITS[90])
    if max_spill_bytes is not None and row.spill_stores is not None and row.spill_stores > max_spill_bytes:
        row.problems.append(f"spills {row.spill_stores} B per thread > {max_spill_bytes} B allowed")
    if row.shared_bytes > max_shared:
        row.problems.append(f"shared memory {row.shared_bytes} B > {max_shared} B per block on sm_{arch}")
    if row.registers is not None:
        if row.registers > MAX_REGISTERS_PER_THREAD:
            row.problems.append(f"{row.registers} registers per thread > {MAX_REGISTERS_PER_THREAD}")
        block_registers = row.registers * row.num_warps * 32
        if block_registers > registers_per_sm:
            row.problems.append(f"a block needs {block_registers} registers > {registers_per_sm} per SM")


def compile_cases(cases: Sequence[Case], dtypes: Sequence[torch.dtype], arch: int, usage: bool = True,
                  progress: bool = False, max_spill_bytes: Optional[int] = None):
    """Compile each case in each dtype; returns (rows of CompiledKernel, failures). With
    ``max_spill_bytes``, a kernel spilling more than that per thread counts as over a limit."""
    ptxas = find_ptxas(arch) if usage else None
    cuobjdump = find_cuobjdump() if usage else None
    rows: List[CompiledKernel] = []
    failures: List[FailedCase] = []
    with compile_only(arch) as compiled:
        for case in cases:
            for dtype in dtypes:
                name = common.dtype_name(dtype)
                if progress:
                    print(f"compiling {case.name} [{name}]", file=sys.stderr, flush=True)
                start = len(compiled)
                try:
                    case.launch(dtype)
                except Exception as error:  # a compile error: report it, go on with the others
                    failures.append(FailedCase(case.name, name, f"{type(error).__name__}: {str(error)[-800:]}"))
                    continue
                for kernel in compiled[start:]:
                    meta = kernel.metadata
                    row = CompiledKernel(case=case.name, kernel=meta.name, dtype=name, constants=_constants(kernel),
                                         num_warps=meta.num_warps, num_stages=meta.num_stages,
                                         shared_bytes=int(meta.shared))
                    if ptxas is not None:
                        try:
                            for key, value in ptxas_usage(kernel.asm["ptx"], arch, ptxas).items():
                                setattr(row, key, value)
                        except Exception as error:
                            row.problems.append(str(error))
                    if cuobjdump is not None and "cubin" in kernel.asm:
                        for key, value in sass_counts(kernel.asm["cubin"], cuobjdump).items():
                            setattr(row, key, value)
                    _check_limits(row, arch, max_spill_bytes)
                    rows.append(row)
    return rows, failures


def markdown(rows: Sequence[CompiledKernel], failures: Sequence[FailedCase], arch: int,
             extension: Sequence[ExtensionKernel] = ()) -> str:
    lines = [f"# Triton kernels compiled for sm_{arch} (no GPU needed)", "",
             f"triton {common._triton_version()}, torch {torch.__version__}, commit {common.git_commit()}", "",
             "| case | kernel | dtype | blocks | warps | stages | regs | spill st/ld (B) | smem (KiB) | BAR | LDS/STS "
             "| problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        blocks = " ".join(f"{k}={v}" for k, v in r.constants.items()) or "-"
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(f"| {r.case} | {r.kernel} | {r.dtype} | {blocks} | {r.num_warps} | {r.num_stages} | "
                     f"{common.fmt(r.registers, 0)} | {spills} | {r.shared_bytes / 1024:.1f} | "
                     f"{common.fmt(r.barriers, 0)} | {common.fmt(r.shared_accesses, 0)} | "
                     f"{'; '.join(r.problems) or 'ok'} |")
    if extension:
        lines += ["", "## CUDA extension (sed_fast._C, as built)", "",
                  "| kernel | regs | stack (B) | static smem (B) |", "|---|---|---|---|"]
        lines += [f"| `{k.kernel}` | {k.registers} | {k.stack_bytes} | {k.shared_bytes} |" for k in extension]
    if failures:
        lines += ["", "## Failed to compile", ""]
        lines += [f"- {f.case} [{f.dtype}]: {f.error}" for f in failures]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sed-fast compile-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(TARGET_LIMITS),
                        help="compute capability to compile for (default 90: H100/H200)")
    parser.add_argument("--classes", default="150,847", help="class counts T (default 150,847)")
    parser.add_argument("--variants", default="b,l", help="cost-map feature sizes of these variants (default b,l)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--no-usage", action="store_true", help="skip ptxas -v (registers, spills)")
    parser.add_argument("--max-spill-bytes", type=int, default=None,
                        help="treat a kernel spilling more than this many bytes per thread as over a limit "
                             "(default: spills are only reported)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--md", help="write the Markdown table here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    classes = common.parse_list(args.classes, int)
    variants = common.parse_list(args.variants)
    unknown = [v for v in variants if v not in VARIANT_DIMS]
    if unknown or not classes or any(t < 1 for t in classes):
        print(f"error: --classes must be positive integers and --variants in {sorted(VARIANT_DIMS)}", file=sys.stderr)
        return 2
    dtypes = [common.parse_dtype(d) for d in common.parse_list(args.dtypes)]
    rows, failures = compile_cases(build_cases(classes, variants), dtypes, args.arch,
                                   usage=not args.no_usage, progress=not args.quiet,
                                   max_spill_bytes=args.max_spill_bytes)
    extension = [] if args.no_usage else extension_usage()
    table = markdown(rows, failures, args.arch, extension)
    if args.md:
        Path(args.md).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "arch": args.arch, "environment": common.environment("cpu"),
            "kernels": [asdict(r) for r in rows], "failures": [asdict(f) for f in failures],
            "cuda_extension": [asdict(k) for k in extension]}, indent=1, default=str))
    print(table)
    bad = [r for r in rows if r.problems]
    print(f"{len(rows)} kernels compiled for sm_{args.arch}, {len(failures)} cases failed to compile, "
          f"{len(bad)} kernels over a limit, {sum(1 for r in rows if r.spill_stores)} spill")
    return 1 if failures or bad else 0


if __name__ == "__main__":
    sys.exit(main())
