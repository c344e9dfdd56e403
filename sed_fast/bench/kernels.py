"""Per-kernel benchmark: each sed_fast op against the official PyTorch code, at SED-B's real shapes.

    python -m sed_fast.bench.kernels                       # SED-B at 768: T = 150 and 847, float32
    python -m sed_fast.bench.kernels --dtypes float32,bfloat16 --backends
    python -m sed_fast.bench.kernels --smoke               # tiny shapes, CPU, seconds

Shapes (SED-B, 768x768 input; N = T classes of one image):

=====================  ====================================================================
cost_map               img (1, 640, 24, 24), text (T, 80, 640) -> (T, 80, 24, 24)
dwconv_layernorm       x (T, 128, 24, 24), (T, 64, 48, 48), (T, 32, 96, 96); 9x9 taps
class_attention        q, k, v (T, 576, 128), (T, 2304, 64), (T, 9216, 32); 4 heads
topk_union_reject      aux logits (1, T, 24, 24), (1, T, 48, 48), (1, T, 96, 96); k = 8
gather_rows            x (T, C, H, W) at the three levels (channels-last), 32 rows kept
=====================  ====================================================================

"official" is the official PyTorch formulation (what the reference model runs):

* cost map: ``F.normalize`` + ``einsum('bchw,btpc->bpthw')`` + rearrange to (B*T, P, h, w);
* dwconv + LN: ``nn.Conv2d(C, C, 9, padding=4, groups=C)`` on NCHW + permute + ``F.layer_norm(eps=1e-6)``;
* class attention: ``decoder.linear_attention`` (einsums) on q, k, v laid out (H*W, T, heads, C/heads);
* rejection: ``argsort(descending)[:, :k]`` + ``bincount`` + boolean index (``TopKUnion.keep_mask``);
* gather: boolean index ``x[keep]``.

"sed_fast" is the public op (``sed_fast.kernels.<op>``) with the backend ``auto`` picks; with
``--backends`` every available backend is timed as well (``sed_fast[torch]``, ``[cpu]``, ``[triton]``, ``[cuda]``).
The op gets its inputs in the layout the fast model gives it (channels-last activations, q/k/v as
views of one fused qkv projection).

Inputs and costs come from each op's file: ``example_inputs(device, dtype, "model", **shape)``
and its cost model (``flops``, ``bytes_moved``; es = bytes per element), FLOPs counted as
``torch.utils.flop_counter`` counts the op's reference (matmuls and convolutions only):

* cost_map: bytes es*(B*D*h*w + T*P*D + B*T*P*h*w) (read both inputs, write the map once);
  FLOPs 2*B*h*w*T*P*D.
* dwconv_layernorm: bytes es*(2*N*C*H*W + C*(81 + 3)) (read x, write the normalised tokens);
  FLOPs 2*N*C*H*W*81 (the taps; LayerNorm is elementwise).
* class_attention: bytes 4*T*P*C*es (read q, k, v, write out); FLOPs 4*T*P*C*d + 2*T*P*C,
  d = C/heads (K^T V, Q (K^T V) and the normaliser).
* topk_union_reject: bytes es*B*T*h*w + 5*B*T + 4*(B+1); no FLOPs (comparisons).
* gather_rows: bytes 2*kept*C*H*W*es; no FLOPs.

Training (``--ops cost_map_backward,dwconv_layernorm_backward,class_attention_backward``, not in
the default set): each op's forward and backward together, at the same shapes, against the
official formulation's forward and autograd backward; the cost map differentiates the image side
only (training freezes the text). The output checked is every gradient; bytes and FLOPs are
nominal: the forward's x 2 for the cost map (one backward matmul), x 3 for the others (input and
parameter gradients).

Achieved rates are these bytes / time and FLOPs / time; "% peak" divides by the datasheet peaks
of the device model (``sed_fast.bench.common.DATASHEET_PEAKS``: DRAM bandwidth, dense FLOP/s of the
dtype; the bytes are the least a kernel must move and CUDA timing flushes the L2 cache between
calls, so no correct row exceeds 100%); on other devices (every CPU) there is none. A row is
``valid`` when its output matches the official output: max |diff| <= tolerance * max(1, max |official|)
(tolerance 1e-4 float32, 3e-2 bfloat16, 5e-3 float16), identical kept sets for the rejection and
identical rows for the gather. Rows are appended to ``<results dir>/kernels.jsonl``.
"""
from __future__ import annotations

import argparse
import sys
import importlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import common

OPS = ("cost_map", "dwconv_layernorm", "class_attention", "topk_union_reject", "gather_rows")
BACKWARD_OPS = ("cost_map_backward", "dwconv_layernorm_backward", "class_attention_backward")
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}

# SED-B at a 768x768 input: cost map 24x24, D = 640, P = 80 prompts, decoder levels.
FULL = {"dim": 640, "prompts": 80, "size": 24, "levels": ((128, 24), (64, 48), (32, 96)), "k": 8, "kept": 32,
        "classes": (150, 847)}
SMOKE = {"dim": 32, "prompts": 8, "size": 4, "levels": ((16, 6), (8, 12)), "k": 2, "kept": 3, "classes": (5, 9)}


@dataclass
class Case:
    op: str
    shape: str
    classes: int
    make: Callable[[torch.device, torch.dtype], Dict[str, object]]
    official: Callable[[Dict[str, object]], object]
    fast: Callable[[object, Dict[str, object]], object]  # (kernels module, inputs) -> output
    compare: Callable[[object, object], float]           # (official out, fast out) -> max abs diff
    scale: Callable[[object], float] = lambda out: 1.0   # max(1, max |official|) for the tolerance
    bytes: Callable[[int], float] = lambda es: 0.0
    flops: Optional[float] = None
    exact: bool = False                                  # outputs must be identical (index ops)
    params: Dict[str, object] = field(default_factory=dict)
    op_args: Optional[Callable[[Dict[str, object]], tuple]] = None  # what the op hands the backend chooser


def _max_abs_scale(out) -> float:
    return max(1.0, float(out.abs().max())) if isinstance(out, torch.Tensor) and out.numel() else 1.0


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: official {tuple(a.shape)}, sed_fast {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max())


# -- the cases --------------------------------------------------------------------------------------
def cost_map_case(classes: int, dim: int, prompts: int, size: int) -> Case:
    from sed_fast.models.decoder import SEDDecoder

    op = importlib.import_module("sed_fast.kernels.cost_map")

    def make(device, dtype):
        img, text, _ = op.example_inputs(device, dtype, "model", batch=1, dim=dim, height=size, width=size,
                                         classes=classes, prompts=prompts)
        return {"img": img, "text": text}

    def official(x):
        return SEDDecoder.per_class(SEDDecoder.cost_map(x["img"], x["text"]))

    return Case("cost_map", f"img (1,{dim},{size},{size}) text ({classes},{prompts},{dim})", classes, make, official,
                lambda k, x: k.cost_map(x["img"], x["text"], channels_last=True), _diff, _max_abs_scale,
                bytes=lambda es: op.bytes_moved(1, dim, size, size, classes, prompts, es),
                flops=float(op.flops(1, dim, size, size, classes, prompts)),
                params={"B": 1, "D": dim, "P": prompts, "h": size, "w": size},
                op_args=lambda x: (x["img"], x["text"], True))


def dwconv_case(classes: int, channels: int, size: int) -> Case:
    op = importlib.import_module("sed_fast.kernels.dwconv_layernorm")

    def make(device, dtype):
        x_cl, w, b, ln_w, ln_b, _ = op.example_inputs(device, dtype, "model", batch=classes, channels=channels,
                                                      height=size, width=size, kernel_size=9)
        return {"x": x_cl.contiguous(), "x_cl": x_cl, "w": w, "b": b, "ln_w": ln_w, "ln_b": ln_b}

    def official(x):
        y = F.conv2d(x["x"], x["w"], x["b"], padding=4, groups=channels).permute(0, 2, 3, 1)
        return F.layer_norm(y, (channels,), x["ln_w"], x["ln_b"], 1e-6)

    return Case("dwconv_layernorm", f"({classes},{channels},{size},{size})", classes, make, official,
                lambda k, x: k.dwconv_layernorm(x["x_cl"], x["w"], x["b"], x["ln_w"], x["ln_b"], 1e-6),
                _diff, _max_abs_scale, bytes=lambda es: op.bytes_moved(classes, channels, size, size, 9, es),
                flops=float(op.flops(classes, channels, size, size, 9)),
                params={"N": classes, "C": channels, "H": size, "W": size},
                op_args=lambda x: (x["x_cl"], x["w"], x["b"], x["ln_w"], x["ln_b"], 1e-6))


def class_attention_case(classes: int, channels: int, size: int, heads: int = 4) -> Case:
    from sed_fast.models.decoder import linear_attention

    pixels = size * size
    head_dim = channels // heads

    op = importlib.import_module("sed_fast.kernels.class_attention")

    def make(device, dtype):
        q, k, v, offsets, _, _ = op.example_inputs(device, dtype, "model", classes=(classes,), pixels=pixels,
                                                   channels=channels, num_heads=heads)  # a fused projection

        def official_layout(t):  # (T, P, C) -> (P, T, heads, d) contiguous, as the official q/k/v linears give
            return t.transpose(0, 1).reshape(pixels, classes, heads, head_dim).contiguous()

        return {"q": q, "k": k, "v": v, "offsets": offsets,
                "q_o": official_layout(q), "k_o": official_layout(k), "v_o": official_layout(v)}

    def official(x):
        return linear_attention(x["q_o"], x["k_o"], x["v_o"])  # (P, T, heads, d)

    def compare(ref, out):
        return _diff(ref.reshape(pixels, classes, channels).transpose(0, 1), out)

    return Case("class_attention", f"({classes},{pixels},{channels}) h={heads}", classes, make, official,
                lambda k, x: k.class_attention(x["q"], x["k"], x["v"], x["offsets"], num_heads=heads),
                compare, _max_abs_scale, bytes=lambda es: op.bytes_moved(classes, pixels, channels, es),
                flops=float(op.flops(classes, pixels, channels, heads)),
                params={"T": classes, "P": pixels, "C": channels, "heads": heads},
                op_args=lambda x: (x["q"], x["k"], x["v"], x["offsets"], heads, 1e-6))


def rejection_case(classes: int, size: int, k: int) -> Case:
    from sed_fast.models.rejection import TopKUnion

    op = importlib.import_module("sed_fast.kernels.topk_union_reject")

    def make(device, dtype):  # distinct values (no ties)
        aux, _ = op.example_inputs(device, dtype, "model", batch=1, classes=classes, height=size, width=size, k=k)
        return {"aux": aux}

    def official(x):
        keep = TopKUnion(k).keep_mask(x["aux"])
        return torch.arange(classes, device=keep.device)[keep]  # boolean index: the official host sync

    def fast(kernels, x):
        _, flat_idx, offsets = kernels.topk_union_reject(x["aux"], k)
        return flat_idx, offsets

    def compare(ref, out):
        flat_idx, offsets = out
        got = flat_idx[: int(offsets[-1])].long().sort().values
        if got.shape != ref.shape:
            return float(abs(got.numel() - ref.numel()))
        return float((got != ref).sum())

    return Case("topk_union_reject", f"(1,{classes},{size},{size}) k={k}", classes, make, official, fast, compare,
                bytes=lambda es: op.bytes_moved(1, classes, size, size, es), flops=None, exact=True,
                params={"B": 1, "T": classes, "h": size, "w": size, "k": k}, op_args=lambda x: (x["aux"], k))


def gather_case(classes: int, channels: int, size: int, kept: int) -> Case:
    kept = min(kept, classes)

    op = importlib.import_module("sed_fast.kernels.topk_union_reject")

    def make(device, dtype):
        x, flat_idx, _ = op.gather_example_inputs(device, dtype, "model", batch=1, classes=classes,
                                                  channels=channels, height=size, width=size, kept=kept)
        mask = torch.zeros(classes, dtype=torch.bool, device=device)
        mask[flat_idx[:kept].long()] = True
        return {"x": x, "idx": flat_idx, "mask": mask}

    return Case("gather_rows", f"({classes},{channels},{size},{size}) kept={kept}", classes, make,
                lambda x: x["x"][x["mask"]], lambda k, x: k.gather_rows(x["x"], x["idx"], kept), _diff,
                bytes=lambda es: op.gather_bytes_moved(kept, channels * size * size, es), flops=None, exact=True,
                params={"T": classes, "C": channels, "H": size, "W": size, "kept": kept},
                op_args=lambda x: (x["x"], x["idx"], kept))


def _leaves(x: Dict[str, object], names: Sequence[str]) -> List[torch.Tensor]:
    return [x[name].detach().requires_grad_() for name in names]


def _grad_diff(ref, out) -> float:
    return max(_diff(a, b) for a, b in zip(ref, out))


def _grad_scale(ref) -> float:
    return max(_max_abs_scale(g) for g in ref)


def backward_case(forward: Case) -> Case:
    """``forward``'s op trained: forward + backward of the op against the official forward +
    autograd, every gradient compared (see the module docstring)."""
    names = {"cost_map": ("img",), "dwconv_layernorm": ("x", "w", "b", "ln_w", "ln_b"),
             "class_attention": ("qkv",)}[forward.op]
    attention = forward.op == "class_attention"

    def make(device, dtype):
        x = forward.make(device, dtype)
        if attention:  # the leaf is the fused projection q, k and v are views of
            x["qkv"] = torch.cat([x["q"], x["k"], x["v"]], -1)
            shape = x["q"].shape
        else:
            with torch.no_grad():
                shape = forward.official(x).shape
        x["grad_out"] = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
        return x

    def official(x):
        leaves = _leaves(x, names)
        y = dict(x, **dict(zip(names, leaves)))
        grad_out = x["grad_out"]
        if attention:  # the official layout: (P, T, heads, d)
            heads, channels = forward.params["heads"], forward.params["C"]
            pixels, classes = forward.params["P"], forward.params["T"]

            def official_layout(t):
                return t.transpose(0, 1).reshape(pixels, classes, heads, channels // heads)

            y["q_o"], y["k_o"], y["v_o"] = (official_layout(t) for t in leaves[0].split(channels, dim=-1))
            grad_out = official_layout(grad_out)
        return torch.autograd.grad(forward.official(y), leaves, grad_out)

    def fast(kernels, x):
        leaves = _leaves(x, names)
        y = dict(x, **dict(zip(names, leaves)))
        if attention:
            y["q"], y["k"], y["v"] = leaves[0].split(forward.params["C"], dim=-1)
        if forward.op == "dwconv_layernorm":
            y["x_cl"] = leaves[0].contiguous(memory_format=torch.channels_last)
        return torch.autograd.grad(forward.fast(kernels, y), leaves, x["grad_out"])

    factor = 2 if forward.op == "cost_map" else 3
    return Case(f"{forward.op}_backward", forward.shape + " fwd+bwd", forward.classes, make, official, fast,
                _grad_diff, _grad_scale, bytes=lambda es: factor * forward.bytes(es),
                flops=None if forward.flops is None else factor * forward.flops, params=forward.params)


def build_cases(ops: Sequence[str], classes: Sequence[int], spec: Dict[str, object]) -> List[Case]:
    cases: List[Case] = []
    for t in classes:
        for op in ops:
            if op in BACKWARD_OPS:
                cases += [backward_case(case) for case in build_cases([op[:-len("_backward")]], [t], spec)]
            elif op == "cost_map":
                cases.append(cost_map_case(t, spec["dim"], spec["prompts"], spec["size"]))
            elif op == "dwconv_layernorm":
                cases += [dwconv_case(t, c, s) for c, s in spec["levels"]]
            elif op == "class_attention":
                cases += [class_attention_case(t, c, s) for c, s in spec["levels"]]
            elif op == "topk_union_reject":
                cases += [rejection_case(t, s, spec["k"]) for _, s in spec["levels"]]
            elif op == "gather_rows":
                cases += [gather_case(t, c, s, spec["kept"]) for c, s in spec["levels"]]
            else:
                raise ValueError(f"unknown op {op!r}; expected some of {', '.join(OPS + BACKWARD_OPS)}")
    return cases


# -- running ----------------------------------------------------------------------------------------
def _import_kernels():
    try:
        import sed_fast.kernels as kernels
        return kernels, None
    except Exception as error:  # noqa: BLE001 - the official rows are still worth having
        return None, f"sed_fast.kernels unavailable: {type(error).__name__}: {error}"


def _backend_names(op: str, device: torch.device) -> List[str]:
    try:
        from sed_fast.kernels import dispatch
        return dispatch.available_backends(op, device)
    except Exception:  # noqa: BLE001
        return []


def _resolved_backend(op: str, device: torch.device, args: Optional[tuple]) -> Optional[str]:
    """The backend "auto" runs for these inputs (after the warm-up: the chooser's cached choice)."""
    try:
        from sed_fast.kernels import dispatch
        return dispatch.resolve_name(op, device, args=args)
    except Exception:  # noqa: BLE001
        return None


def run_case(case: Case, device: torch.device, dtype: torch.dtype, kernels, kernels_error: Optional[str],
             backends: Sequence[Optional[str]], peaks, timing: Dict[str, object]) -> List[Dict[str, object]]:
    """Time the official code and the op (per backend) on one case; rows for each."""
    env = common.environment(device)
    name = common.dtype_name(dtype)
    base = dict(env, kind="kernel", op=case.op, shape=case.shape, T=case.classes, dtype=name, params=case.params,
                config=f"{case.op} {case.shape} {name}")
    rows = []
    try:
        inputs = case.make(device, dtype)
    except Exception as error:  # noqa: BLE001
        common.free_memory(device)
        return [dict(base, impl="official", backend=None, error=_error_text(error), valid=False, median_ms=None)]
    es = torch.empty((), dtype=dtype).element_size()
    nbytes, flops = float(case.bytes(es)), case.flops

    def measure(impl: str, backend: Optional[str], fn: Callable[[], object]):
        row = dict(base, impl=impl, backend=backend, bytes=nbytes, flops=flops, error=None)
        try:
            out = fn()  # first call: compiles / autotunes; also the output that is checked
            common.synchronize(device)
            t = common.time_fn(fn, device, kernel=True, **timing)
            row.update(t.to_dict())
            row.update(common.rates(nbytes, flops, t.median_ms, peaks, dtype))
            return row, out
        except Exception as error:  # noqa: BLE001 - one failing impl is a row, not a crash
            row.update(median_ms=None, p20_ms=None, p80_ms=None, reps=0, valid=False, error=_error_text(error))
            common.free_memory(device)
            return row, None

    ref_row, ref_out = measure("official", None, lambda: case.official(inputs))
    ref_row.update(max_abs_diff_vs_reference=0.0 if ref_out is not None else None, tolerance=None,
                   speedup_vs_official=1.0 if ref_out is not None else None, valid=ref_out is not None)
    rows.append(ref_row)
    for backend in backends:
        impl = "sed_fast" if backend is None else f"sed_fast[{backend}]"
        if kernels is None:
            rows.append(dict(base, impl=impl, backend=backend, median_ms=None, valid=False, error=kernels_error))
            continue
        try:
            if backend is not None:
                kernels.set_backend(case.op, backend)
            row, out = measure(impl, backend, lambda: case.fast(kernels, inputs))
            if backend is None and row.get("error") is None:
                row["backend"] = _resolved_backend(case.op, device, case.op_args(inputs) if case.op_args else None)
        finally:
            if backend is not None:
                kernels.set_backend(case.op, None)
        tolerance = 0.0 if case.exact else TOLERANCE.get(name, 1e-4)
        row["tolerance"] = tolerance
        if out is not None and ref_out is not None:
            try:
                diff = case.compare(ref_out, out)
                row["max_abs_diff_vs_reference"] = diff
                row["valid"] = bool(diff <= tolerance * (1.0 if case.exact else case.scale(ref_out)))
            except Exception as error:  # noqa: BLE001
                row.update(max_abs_diff_vs_reference=None, valid=False, error=_error_text(error))
        else:
            row.setdefault("max_abs_diff_vs_reference", None)
            row["valid"] = False if out is None else None  # no official output: unchecked
        if row.get("median_ms") and ref_row.get("median_ms"):
            row["speedup_vs_official"] = ref_row["median_ms"] / row["median_ms"]
        else:
            row["speedup_vs_official"] = None
        rows.append(row)
        del out
    inputs = ref_out = None  # free them before the next case
    common.free_memory(device)
    return rows


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    message = text[0] if text else type(error).__name__
    return ("out of memory: " if common.is_oom(error) else "") + message[:300]


def print_rows(rows: Sequence[Dict[str, object]], file=None) -> None:
    header = (f"{'op':<18} {'shape':<34} {'dtype':<9} {'impl':<17} {'median ms':>10} {'GB/s':>8} {'TFLOP/s':>8} "
              f"{'%peak':>6} {'speedup':>8} {'max diff':>9}  ok")
    common.print_header(header, file)
    for r in rows:
        fractions = [f for f in (r.get("frac_peak_bw"), r.get("frac_peak_flops")) if f is not None]
        peak = f"{100 * max(fractions):.0f}%" if fractions else "-"
        impl = str(r.get("impl")) + (f"->{r['backend']}" if r.get("impl") == "sed_fast" and r.get("backend") else "")
        ok = common.verdict(r.get("valid"), bool(r.get("median_ms")))
        line = (f"{r['op']:<18} {r['shape'][:34]:<34} {r['dtype']:<9} {impl[:17]:<17} "
                f"{common.fmt(r.get('median_ms'), 3):>10} {common.fmt(r.get('gb_per_s'), 1):>8} "
                f"{common.fmt(r.get('tflop_per_s'), 2):>8} {peak:>6} "
                f"{common.fmt(r.get('speedup_vs_official'), 2):>8} "
                f"{common.fmt(r.get('max_abs_diff_vs_reference'), 6):>9}  {ok}")
        if r.get("error"):
            line += f"  ({r['error'][:80]})"
        print(line, file=file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sed-fast bench-kernels",
                                     description="Per-kernel benchmark of the sed_fast ops against the official "
                                                 "PyTorch code.")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default: all: {','.join(OPS)})")
    parser.add_argument("--classes", default=None, help="comma-separated class counts T (default 150,847; smoke 5,9)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated dtypes: float32,bfloat16,float16")
    parser.add_argument("--backends", action="store_true", help="also time every available backend of each op")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats (CPU, seconds)")
    parser.add_argument("--target-seconds", type=float, default=None, help="timed seconds per measurement")
    parser.add_argument("--reps", type=int, default=None, help="exact number of timed calls (default: adaptive)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="stop starting new cases after this many seconds")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls/convolutions (default off)")
    parser.add_argument("--results-dir", default=None,
                        help="folder of the results (default ./sed_fast_results, or $SED_FAST_RESULTS_DIR)")
    parser.add_argument("--name", default="kernels", help="results file name (<name>.jsonl)")
    parser.add_argument("--no-save", action="store_true", help="print only, write no results")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; --smoke: 1)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available", file=sys.stderr)
        return 2
    with common.settings(args.threads, args.smoke, args.tf32):
        return _run(args, device)


def _run(args, device: torch.device) -> int:
    spec = SMOKE if args.smoke else FULL
    classes = common.parse_list(args.classes, int) or list(spec["classes"])
    try:
        ops = common.parse_list(args.ops)
        cases = build_cases(ops, classes, spec)
        dtypes = [common.parse_dtype(d) for d in common.parse_list(args.dtypes)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.smoke:
        timing = {"warmup": 1, "reps": args.reps or 3}
    else:
        timing = {"warmup": 3, "reps": args.reps, "target_s": args.target_seconds or 0.3}
    out_dir = None if args.no_save else common.results_dir(args.results_dir)
    measured = common.device_peaks(device, out_dir) if out_dir else common.measure_device_peaks(device)
    peaks = common.datasheet_peaks(device)  # % of peak only against a datasheet, which nothing exceeds
    print(f"device: {common.device_name(device)}; measured: copy {measured['copy_gb_per_s']:.1f} GB/s, matmul "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in measured["matmul_tflop_per_s"].items())
          + (f"; % peak against the {peaks['source']}" if peaks else "; no datasheet peak for this device: no % peak"))
    if args.tf32:
        peaks = peaks and dict(peaks, matmul_tflop_per_s=dict(peaks["matmul_tflop_per_s"],
                                                              float32=peaks["matmul_tflop_per_s"]["tf32"]))
    kernels, kernels_error = _import_kernels()
    if kernels_error:
        print(f"warning: {kernels_error}", file=sys.stderr)
    start = time.perf_counter()
    all_rows: List[Dict[str, object]] = []
    skipped = 0
    for dtype in dtypes:
        for case in cases:
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                skipped += 1
                continue
            backends: List[Optional[str]] = [None]
            if args.backends:
                backends += _backend_names(case.op, device)
            rows = run_case(case, device, dtype, kernels, kernels_error, backends, peaks, timing)
            if out_dir:
                common.append_rows(out_dir / f"{args.name}.jsonl", rows)
            all_rows += rows
            print_rows(rows) if len(all_rows) == len(rows) else print_rows_body(rows)
    if skipped:
        print(f"time budget ({args.time_budget:.0f} s) reached: {skipped} case(s) skipped")
    if out_dir:
        print(f"{len(all_rows)} rows appended to {out_dir / (args.name + '.jsonl')}")
    wrong = [r for r in all_rows if r.get("valid") is False and r.get("median_ms")]
    if wrong:
        print(f"WARNING: {len(wrong)} row(s) with outputs that do not match the official code", file=sys.stderr)
    return 0


def print_rows_body(rows) -> None:
    import io
    buffer = io.StringIO()
    print_rows(rows, file=buffer)
    print("\n".join(buffer.getvalue().splitlines()[2:]))


if __name__ == "__main__":
    sys.exit(main())
