"""Per-stage profile of one SED configuration.

    sed-fast profile --impl fast --vocab ade847 --cer-topk 8
    sed-fast profile --impl reference --vocab ade150 --trace trace.json
    nsys profile -t cuda,nvtx -o sed sed-fast profile --impl fast --vocab ade150   # NVTX ranges
    python -m sed_fast.bench.profile --smoke                                            # tiny, CPU

Runs warm-up forwards, then ``--reps`` forwards with a stage recorder (``sed_fast.base.stages``: CUDA
events per stage on GPU, wall clock on CPU; NVTX ranges on CUDA), and prints for each stage its
median time per forward, its share of the rows' sum, the achieved FLOP rate and op traffic, its
arithmetic intensity (FLOP/B) and ``%peak``: its rate over its binding roof (``C`` compute, ``M`` memory,
by the intensity against the ridge point; ``sed_fast.bench.common.roofline``). The roofs: on CPU this
machine's float32 / bfloat16 GEMM rate and memory bandwidth with the run's threads, measured in about
two seconds or read from the cache under the cache root keyed by CPU model, threads and library
versions (``--measure-peaks`` measures again); on CUDA the datasheet peaks
(``sed_fast.bench.common.DATASHEET_PEAKS``), none for an unlisted GPU. The peaks are in the record.

Stages (both models use the same names; the reference is instrumented from outside by
``sed_fast.bench.instrument.instrument``): ``image_encoder``, ``text`` (cached embeddings, per forward),
``cost_map``, ``conv1``, ``decoder_guidance``, per decoder layer i: ``decoder{i}.corr_guidance``,
``decoder{i}.dwconv`` (depthwise conv + LayerNorm), ``decoder{i}.convnext_mlp``,
``decoder{i}.class_attention``, ``decoder{i}.upsample``, ``decoder{i}.double_conv``; each
rejection step ``reject{i}`` (aux head + rule + gathers; exact reference: ``aux_head{i}``),
``head``, ``scatter`` (fast), ``resize``. ``other (outside stages)`` is, per forward, the forward's
time minus its stages' (input checks, the reference's boolean-index gathers, launches between
stages), then the median. Each row is a median over the forwards taken on its own, so the rows add
up to about, not exactly, the median total (the footer gives both); shares are of the rows' sum and
add up to 100%.

FLOPs and bytes per stage come from one extra forward under ``sed_fast.bench.instrument.OpCounter``:
FLOPs by the formulas ``FlopCounterMode`` uses (``torch.utils.flop_counter``, including those the
kernels register with ``register_flop_formula``), the kernels' cost models, and the oneDNN-routed
linears; the profile prints the total, any multiplying op it could not count, and the kernels'
explanation of where the fast model's FLOPs differ from the reference's when they provide one. Bytes:
the kernels' bytes models where registered, else the tensors each op reads and writes (unfused
traffic: an upper bound of what a fused implementation must move, and more than the memory traffic
where data stays in cache, so a memory-bound stage can pass 100%, marked ``!``). The record and the
output name, per stage, where each multiplying op ran (``linear: oneDNN``, ``matmul: MKL``,
``class_attention: cpu`` ...), the threads, the CPU (family, model, features) and the library
versions; a run whose linears do not take the documented route says so on its first line.

``--trace FILE`` writes a ``torch.profiler`` Chrome trace of two forwards (chrome://tracing or
Perfetto), with the stage ranges. ``--json FILE`` writes the breakdown; ``--save`` appends it as a
row (``kind: "profile"``) to ``<results dir>/profile.jsonl`` for ``sed_fast.bench.report``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from . import common

OTHER = "other (outside stages)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sed-fast profile", description="Per-stage profile of one SED configuration.")
    parser.add_argument("--variant", default="b", help="b or l (default b)")
    parser.add_argument("--impl", choices=("fast", "reference"), default="fast")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    parser.add_argument("--autocast", default=None, metavar="DTYPE",
                        help="run the (float32) model under torch.autocast with this dtype")
    parser.add_argument("--vocab", default="ade150", help="voc20, pc59, ade150, pc459, ade847 or randomN")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cer-topk", type=int, default=None, metavar="K", help="category early rejection top-k")
    parser.add_argument("--kept-classes", type=int, default=None, metavar="N",
                        help="force each rejection step to keep N classes (benchmarks; see sed-fast bench)")
    parser.add_argument("--fast-options", default="", metavar="KEY=VALUE,...",
                        help="attributes set on the fast model, e.g. cuda_graphs=true")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--clip-resolution", type=int, default=768)
    parser.add_argument("--text", choices=("image", "random", "vocab"), default="image",
                        help="text embeddings (see sed-fast bench --help)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up forwards (default 3; smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="recorded forwards (default 10; smoke 2)")
    parser.add_argument("--trace", default=None, metavar="FILE", help="write a torch.profiler Chrome trace")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the breakdown as JSON")
    parser.add_argument("--save", action="store_true", help="append the breakdown to <results dir>/profile.jsonl")
    parser.add_argument("--results-dir", default=None, help="results folder (--save)")
    parser.add_argument("--measure-peaks", action="store_true",
                        help="measure this CPU's GEMM rate and bandwidth again instead of reading the cache")
    parser.add_argument("--no-counts", action="store_true", help="skip the FLOP / byte counting forward")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in float32 (default off)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: clip resolution 64, 64x64 image, voc20")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; --smoke: 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


@contextlib.contextmanager
def _quiet_kineto():
    """Without CUDA, keep the profiler library (Kineto) quiet: it asks the CUDA driver for devices
    whatever activities are profiled and logs ``ERROR: gpuGetDeviceCount failed with code 35``
    (and ``USDT`` lines) on a CPU-only machine. Its level is read when profiling starts; a
    ``KINETO_LOG_LEVEL`` set by the user wins."""
    import os

    if torch.cuda.is_available() or "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["KINETO_LOG_LEVEL"] = "6"  # above ERROR (4) and Kineto's USDT lines (5)
    try:
        yield
    finally:
        os.environ.pop("KINETO_LOG_LEVEL", None)


def build_model(args, device: torch.device):
    import sed_fast
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sed_fast.RandomWeightsWarning)
        model = sed_fast.build_sed(args.variant, impl=args.impl, device=device, dtype=common.parse_dtype(args.dtype),
                                   clip_resolution=args.clip_resolution)
    from .e2e import rejection_rule
    model.rejection = rejection_rule(args.cer_topk, args.kept_classes)
    if args.impl == "fast":
        from .e2e import parse_options
        for key, value in parse_options(args.fast_options).items():
            if not hasattr(model, key):
                raise ValueError(f"the fast model has no option {key!r}")
            setattr(model, key, value)
    return model


def breakdown(stage_ms: Dict[str, float], depths: Dict[str, int], order: Sequence[str], total_ms: float,
              flops: Dict[str, float], nbytes: Dict[str, float], peaks, dtype,
              other_ms: Optional[float] = None, paths: Optional[Dict[str, Dict[str, int]]] = None,
              uncounted: Optional[Dict[str, set]] = None) -> List[Dict[str, object]]:
    """Rows (stage, ms, share, rates, roofline) for the stages plus "other" (``other_ms``, the median
    per-forward time outside the stages; default: the total minus the stages, at least 0); shares
    are of the top-level rows' sum and add up to 100%. ``peaks``: the roofs
    (:func:`sed_fast.bench.common.machine_peaks`) or None (no % of peak). ``frac_peak_flops`` is the
    fraction of the binding roof (``bound``: compute or memory, by the stage's arithmetic intensity)."""
    top = [name for name in order if depths.get(name, 0) == 0]
    tracked = sum(stage_ms.get(name, 0.0) for name in top)
    other = max(0.0, total_ms - tracked) if other_ms is None else max(0.0, other_ms)
    total = tracked + other
    paths, uncounted = paths or {}, uncounted or {}
    rows = []
    for name in order:
        ms = stage_ms.get(name, 0.0)
        row = {"stage": name, "depth": depths.get(name, 0), "ms": ms,
               "share": ms / total if total > 0 and depths.get(name, 0) == 0 else None,
               "flops": flops.get(name) or None, "bytes": nbytes.get(name) or None,
               "paths": dict(paths.get(name, {})), "uncounted_ops": sorted(uncounted.get(name, ()))}
        row.update(common.rates(row["bytes"], row["flops"], ms, None, dtype))
        roof = common.roofline(row["flops"], row["bytes"], ms, peaks, dtype)
        row.update(intensity=roof["intensity"], bound=roof["bound"], roof_tflop_per_s=roof["roof_tflop_per_s"],
                   frac_peak_flops=roof["frac_peak"], frac_peak_bw=None)
        rows.append(row)
    rows.append({"stage": OTHER, "depth": 0, "ms": other, "share": other / total if total > 0 else None,
                 "flops": None, "bytes": (nbytes.get("(none)") or None), "gb_per_s": None, "tflop_per_s": None,
                 "frac_peak_bw": None, "frac_peak_flops": None, "intensity": None, "bound": None,
                 "roof_tflop_per_s": None, "paths": dict(paths.get("(none)", {})),
                 "uncounted_ops": sorted(uncounted.get("(none)", ()))})
    return rows


def print_breakdown(rows: Sequence[Dict[str, object]], total_ms: float, title: str, file=None,
                    forwards: Optional[int] = None) -> None:
    print(title, file=file)
    header = (f"{'stage':<30} {'ms':>9} {'share':>7} {'GFLOP':>9} {'MB moved':>10} {'TFLOP/s':>8} {'GB/s':>8} "
              f"{'FLOP/B':>7} {'%peak':>10}")
    common.print_header(header, file)
    for r in rows:
        fraction = r.get("frac_peak_flops")
        peak = "-" if fraction is None else (f"{100 * fraction:.0f}%" + ("!" if fraction > 1 else "")
                                             + (" " + str(r.get("bound") or "?")[0].upper()))
        name = ("  " * int(r.get("depth") or 0) + str(r["stage"]))[:30]
        share = f"{100 * r['share']:.1f}%" if r.get("share") is not None else ""
        gflop = r["flops"] / 1e9 if r.get("flops") else None
        mbytes = r["bytes"] / 1e6 if r.get("bytes") else None
        print(f"{name:<30} {common.fmt(r['ms'], 3):>9} {share:>7} {common.fmt(gflop, 2):>9} "
              f"{common.fmt(mbytes, 1):>10} "
              f"{common.fmt(r.get('tflop_per_s'), 2):>8} {common.fmt(r.get('gb_per_s'), 1):>8} "
              f"{common.fmt(r.get('intensity'), 1):>7} {peak:>10}", file=file)
    shares = sum(r["share"] for r in rows if r.get("share") is not None)
    summed = sum(r["ms"] for r in rows if r.get("depth", 0) == 0)
    print(f"{'sum of the rows':<30} {common.fmt(summed, 3):>9} {100 * shares:>6.1f}%", file=file)
    print(f"{'total (median forward)':<30} {common.fmt(total_ms, 3):>9}   the median of "
          f"{forwards if forwards is not None else 'the'} whole forwards; each row is the median of that stage "
          f"alone (other: of each forward's time outside the stages), so the rows add up to "
          f"{100 * summed / total_ms if total_ms > 0 else 100:.1f}% of it", file=file)


def peaks_note(device: str, peaks, precision: str) -> str:
    """What %peak means here, or why there is none."""
    if not peaks:
        return (f"%peak: none: {device} has no datasheet peaks listed (listed: {', '.join(common.DATASHEET_PEAKS)}); "
                "FLOP rates and bytes are still exact")
    flops = common.peak_flops(peaks, precision)
    bandwidth = float(peaks["copy_gb_per_s"])
    where = peaks["source"]
    if "measure_seconds" in peaks:
        where = (f"{'read from the cache of ' + str(peaks.get('measured')) if peaks.get('cached') else 'measured'} "
                 f"(a {peaks['measure_seconds']:.1f} s measurement: {peaks['how']})")
    return (f"%peak: the stage's rate over its binding roof (C: compute, {flops:.3f} TFLOP/s {precision} GEMM, "
            f"{peaks['source']}; "
            f"M: memory, {bandwidth:.0f} GB/s; the ridge at {flops * 1e3 / bandwidth:.1f} FLOP/B), by its "
            f"arithmetic intensity FLOP/B; peaks {where}. Bytes are op-by-op traffic (an upper bound of what a "
            "fused execution moves; data kept in cache is counted again), so a memory-bound stage can exceed "
            "100% (marked !)")


def flop_notes(rows: Sequence[Dict[str, object]], bytes_source: Dict[str, Dict[str, int]]) -> List[str]:
    """Lines on what the counts miss: multiplying ops without a FLOP formula, bytes not modelled."""
    notes = []
    missing = {str(r["stage"]): r["uncounted_ops"] for r in rows if r.get("uncounted_ops")}
    if missing:
        notes.append("FLOPs not counted (no formula registered for these ops): "
                     + "; ".join(f"{stage}: {', '.join(ops)}" for stage, ops in missing.items()))
    sized = sum(counts.get("tensor sizes", 0) for counts in bytes_source.values())
    modeled = sum(counts.get("bytes model", 0) for counts in bytes_source.values())
    if sized or modeled:
        notes.append(f"bytes: {modeled} op calls from the kernels' bytes models, {sized} from the sizes of the "
                     "tensors each op reads and writes" + ("" if modeled else " (no bytes model registered)"))
    return notes


def paths_summary(rows: Sequence[Dict[str, object]]) -> List[str]:
    """Per stage, where its multiplying ops ran (``linear: oneDNN x12`` ...)."""
    lines = []
    for r in rows:
        if r.get("paths"):
            lines.append(f"  {r['stage']}: " + ", ".join(f"{path} x{count}" for path, count in r["paths"].items()))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:

    from .e2e import vocab_size

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for key, value in {"image_size": 64, "clip_resolution": 64, "vocab": "voc20"}.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    reps = args.reps if args.reps is not None else (2 if args.smoke else 10)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available (use --device cpu)", file=sys.stderr)
        return 2
    try:
        classes = vocab_size(args.vocab)
        dtype = common.parse_dtype(args.dtype)
        autocast_dtype = common.parse_dtype(args.autocast) if args.autocast else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with common.settings(args.threads, args.smoke, args.tf32):
        return _run(args, device, classes, dtype, autocast_dtype, warmup, reps)


def _run(args, device, classes, dtype, autocast_dtype, warmup, reps) -> int:
    from sed_fast.base.stages import recording

    from .instrument import OpCounter, explained_differences, instrument

    from .e2e import synthetic_text

    cuda = device.type == "cuda"

    try:
        model = build_model(args, device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    generator = torch.Generator(device="cpu").manual_seed(args.seed + args.batch)
    images = (torch.rand(args.batch, 3, args.image_size, args.image_size, generator=generator) * 255).to(device)
    text, names, _ = synthetic_text(model, args.vocab, classes, args.text, images, args.seed)
    model.text_embeddings, model.class_names = text.to(device), list(names)
    compute_dtype = autocast_dtype or dtype
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext

    def forward():
        with torch.no_grad(), autocast():
            return model(images)

    for _ in range(max(1, warmup)):
        forward()
    common.synchronize(device)

    totals: List[float] = []
    outside: List[float] = []  # per forward: its time minus its top-level stages'
    per_stage: Dict[str, List[float]] = {}
    calls: Dict[str, int] = {}
    depths: Dict[str, int] = {}
    order: List[str] = []
    for _ in range(max(1, reps)):
        with recording(device) as recorder, instrument(model):
            common.synchronize(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward()
                end.record()
                torch.cuda.synchronize(device)
                totals.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                forward()
                totals.append((time.perf_counter() - begin) * 1e3)
            times = recorder.times_ms()
        for name in recorder.order:
            if name not in order:
                order.append(name)
            per_stage.setdefault(name, []).append(sum(times.get(name, [0.0])))
            calls[name] = len(times.get(name, []))
            depths[name] = min(depths.get(name, 99), recorder.depths.get(name, 0))
        outside.append(totals[-1] - sum(sum(times.get(name, [0.0])) for name in recorder.order
                                        if recorder.depths.get(name, 0) == 0))
    stage_ms = {name: common.quantile(values, 0.5) for name, values in per_stage.items()}
    total_ms = common.quantile(totals, 0.5)

    flops: Dict[str, float] = {}
    nbytes: Dict[str, float] = {}
    counter = None
    if not args.no_counts:
        counter = OpCounter(device)
        with recording(device, nvtx=False), instrument(model), counter:
            forward()
        flops, nbytes = dict(counter.flops), dict(counter.bytes)

    peaks = None  # the roofs of % of peak, or None: no percentage
    try:
        peaks = common.machine_peaks(device, refresh=args.measure_peaks)
    except Exception as error:  # noqa: BLE001 - the times are still worth printing
        print(f"warning: could not measure this machine's GEMM rate and bandwidth: {error}", file=sys.stderr)

    if args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with _quiet_kineto():
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(2):
                    with recording(device) as recorder, instrument(model):
                        forward()
                        recorder.times_ms()
            prof.export_chrome_trace(args.trace)

    precision = common.precision_name(compute_dtype, tf32=args.tf32)
    rows = breakdown(stage_ms, depths, order, total_ms, flops, nbytes, peaks, precision,
                     other_ms=common.quantile(outside, 0.5), paths=counter.paths if counter else None,
                     uncounted=counter.uncounted if counter else None)
    env = common.environment(device)
    warning = common.routing_warning(env)
    if warning:
        print(warning)
    setting = ("exact" if args.cer_topk is None and args.kept_classes is None else
               f"kept{args.kept_classes}" if args.kept_classes is not None else f"cer{args.cer_topk}")
    impl = args.impl + ("+autocast" if autocast_dtype else "") + (f"[{args.fast_options}]" if args.impl == "fast"
                                                                 and args.fast_options else "")
    title = (f"SED-{args.variant.upper()} {impl} {common.dtype_name(compute_dtype)}"
             + (" (autocast)" if autocast_dtype else "")
             + f", {args.vocab} (T={classes}), batch {args.batch}, {setting}, {args.image_size}px "
               f"(encoder at {args.clip_resolution}) on {env['device']}; median of {len(totals)} forwards")
    print_breakdown(rows, total_ms, title, forwards=len(totals))
    print(peaks_note(env["device"], peaks, precision))
    notes = flop_notes(rows, counter.bytes_source) if counter else ["FLOPs and bytes not counted (--no-counts)"]
    total_flops = sum(value for key, value in flops.items())
    if counter:
        notes.insert(0, f"FLOPs per forward: {total_flops / 1e9:.3f} GFLOP in all")
    explained = explained_differences(order) if counter else None
    if explained:
        notes.append("where the fast and the reference model's FLOPs differ by design at this configuration "
                     "(the kernels' cost registry):")
        notes += [f"  {d['stages']} (fast: {d['fast_count']}"
                  f"{'' if d['in_this_profile'] else '; no such stage in this profile'}): {d['reason']}"
                  for d in explained]
    for line in notes:
        print(line)
    where = paths_summary(rows)
    if where:
        print(f"where the multiplying ops ran ({env['threads']} threads; CPU {env['cpu']['name']} family "
              f"{env['cpu'].get('family')} model {env['cpu'].get('model')}, "
              f"{' '.join(env['cpu']['features']) or 'no reported features'}):")
        print("\n".join(where))
    if cuda:
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MB")
    record = dict(env, kind="profile", variant=args.variant, impl=impl,
                  dtype=common.dtype_name(compute_dtype), vocab=args.vocab, T=classes, batch=args.batch,
                  cer_topk=args.cer_topk, kept_classes=args.kept_classes, setting=setting,
                  image_size=args.image_size, clip_resolution=args.clip_resolution, median_ms=total_ms,
                  p20_ms=common.quantile(totals, 0.2), p80_ms=common.quantile(totals, 0.8), reps=len(totals),
                  stages=rows, stages_ms={r["stage"]: r["ms"] for r in rows if r["depth"] == 0},
                  peaks_source=peaks["source"] if peaks else None, peaks=peaks, precision=precision,
                  tf32=bool(args.tf32), calls=calls, config=title, total_flops=total_flops if counter else None,
                  notes=notes, explained_differences=explained)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(common._jsonable(record), f, indent=2)
            f.write("\n")
        print(f"profile written to {args.json}")
    if args.save:
        path = common.results_dir(args.results_dir) / "profile.jsonl"
        common.append_rows(path, [record])
        print(f"profile row appended to {path}")
    if args.trace:
        print(f"trace written to {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
