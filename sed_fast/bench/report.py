"""Report of the benchmark results: a Markdown file and PNG plots.

    python -m sed_fast.bench.report                                  # ./sed_fast_results/*.jsonl
    python -m sed_fast.bench.report --results-dir DIR --out DIR
    python -m sed_fast.bench.report FILE.jsonl ... --print           # also a short text summary

Writes into ``--out`` (default: the results folder):

* ``report.md``: environment, the end-to-end table (one line per row; speed-up against the float32
  reference of the same variant / batch / vocabulary / setting; rows whose outputs did not match the
  reference are listed as WRONG OUTPUT without a time), the paper's SED-B latencies on an A6000 beside
  ours (a different GPU, and the paper's trained weights: its CER rows reject far more classes than
  our random weights do, compare with our forced kept-class rows), the kernel table and the profiles;
* ``latency_vs_classes.png``: median latency against the number of classes, one line per
  implementation / dtype / setting (with more than 14 lines, only the exact, cer8 and kept32
  settings), log scales, one panel per (variant, batch); the paper's A6000
  figures dashed in grey (marked as a different GPU) in the SED-B batch-1 panel;
* ``stages.png``: per-stage stacked bars of the end-to-end rows (``stages_ms`` as shares of the
  recorded forwards scaled to the median latency, else encoder / text / decoder) and of the profile
  rows (at most 24 bars: profiles first, then batch 1, biggest vocabularies first);
* ``roofline.png``: per profile (the last four), its stage bars beside its roofline: each stage a
  point at its arithmetic intensity (FLOP/B) and achieved FLOP rate, the compute roof (the GEMM
  peak of the profile's precision) and the memory roof (bandwidth x intensity) as lines, from the
  peaks recorded with the profile (measured on the machine on CPU; datasheet on CUDA).

A plot the data cannot support is not drawn; the report says which and why instead (e.g. after
``bench --smoke``, one class count per line: no latency-vs-classes line; profiles without peaks or
FLOP counts: no roofline).
"""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..toolkit.errors import EXIT_USAGE, UsageError
from . import common

#: SED-B, 768x768, one A6000, batch 1 (Xie et al., CVPR 2024): latency in ms with CER top-k.
PAPER_GPU = "A6000"
PAPER_KS = (1, 2, 4, 8, None)  # None: no rejection ("all")
PAPER_LATENCY_MS = OrderedDict([
    ("PAS-20", (20, (37.2, 38.9, 42.2, 47.3, 44.9))),
    ("PC-59", (59, (40.5, 44.2, 49.7, 59.8, 84.7))),
    ("A-150", (150, (51.3, 55.8, 67.5, 82.4, 177.7))),
    ("PC-459", (459, (74.8, 84.2, 93.4, 120.1, 468.1))),
    ("A-847", (847, (120.8, 136.4, 151.5, 181.6, 861.0))),
])
PAPER_VOCAB = {"PAS-20": "voc20", "PC-59": "pc59", "A-150": "ade150", "PC-459": "pc459", "A-847": "ade847"}

MAX_SERIES = 14
HEADLINE_SETTINGS = ("exact", "cer8", "kept32")

STAGE_GROUPS = OrderedDict([
    ("image encoder", ("image_encoder",)),
    ("text", ("text",)),
    ("cost map + conv1", ("cost_map", "conv1")),
    ("guidance", ("decoder_guidance", "corr_guidance")),
    ("dwconv + LN", ("dwconv",)),
    ("ConvNeXt MLP", ("convnext_mlp",)),
    ("class attention", ("class_attention",)),
    ("upsample + DoubleConv", ("upsample", "double_conv")),
    ("rejection / aux heads", ("reject", "aux_head")),
    ("heads + output", ("head", "scatter", "resize")),
])


def stage_group(name: str) -> str:
    base = name.split(".", 1)[-1] if name.startswith("decoder") and "." in name else name
    for group, keys in STAGE_GROUPS.items():
        for key in keys:
            if base == key or (key in ("reject", "aux_head") and base.startswith(key)):
                return group
    return "other"


# -- helpers ----------------------------------------------------------------------------------------
def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def _setting(row) -> str:
    if row.get("setting"):
        return str(row["setting"])
    if row.get("kept_classes") is not None:
        return f"kept{row['kept_classes']}"
    return "exact" if row.get("cer_topk") is None else f"cer{row['cer_topk']}"


#: What makes two rows one run: the machine, the code, and every setting that changes the work or
#: its speed but is not in a row's label (image size, encoder resolution, threads, TF32). Rows of
#: different runs are shown in separate tables and never compared (no speed-up across them).
RUN_FIELDS = ("device", "threads", "git_commit", "torch", "triton", "cuda", "image_size", "clip_resolution", "tf32")


def run_key(row) -> Tuple:
    return tuple(bool(row.get(f)) if f == "tf32" else row.get(f) for f in RUN_FIELDS)


def group_runs(rows) -> "OrderedDict[Tuple, List[dict]]":
    """Rows by :func:`run_key`, in order of first appearance."""
    runs: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for row in rows:
        runs.setdefault(run_key(row), []).append(row)
    return runs


def run_label(key: Tuple) -> str:
    """The settings of a run in words (those a row has; kernel rows have no image size)."""
    values = dict(zip(RUN_FIELDS, key))
    parts = [str(values["device"])]
    if values["threads"] is not None:
        parts.append(f"{values['threads']} threads")
    parts.append(f"commit {str(values['git_commit'])[:12]}")
    if values["image_size"] is not None:
        parts.append(f"image {values['image_size']}px")
    if values["clip_resolution"] is not None:
        parts.append(f"encoder {values['clip_resolution']}px")
    parts.append(f"TF32 {'on' if values['tf32'] else 'off'}")
    parts.append(f"torch {values['torch']}")
    return ", ".join(parts)


def _key(row) -> Tuple:
    return run_key(row) + (row.get("variant"), row.get("batch"), row.get("vocab"), _setting(row))


def _dtype(row) -> str:
    return f"{row.get('dtype')}" + ("+tf32" if row.get("tf32") and row.get("dtype") == "float32" else "")


def _reference_times(rows) -> Dict[Tuple, float]:
    out = {}
    for row in rows:
        if row.get("impl") == "reference" and row.get("dtype") == "float32" and row.get("median_ms"):
            out[_key(row)] = row["median_ms"]  # the last one wins (latest run)
    return out


def _status(row) -> str:
    if row.get("error"):
        return "error: " + str(row["error"])[:120]
    if row.get("valid") is False:
        return str(row.get("note") or "WRONG OUTPUT")
    if row.get("valid") is None:
        return "unchecked" + (f" ({row['note']})" if row.get("note") and row["note"] != "unchecked" else "")
    return "ok"


def _series_label(row) -> str:
    label = f"{row['impl']} {_dtype(row)} {_setting(row)}"
    return label


# -- Markdown ---------------------------------------------------------------------------------------
def e2e_table(rows) -> List[str]:
    refs = _reference_times(rows)
    body = []
    for r in rows:
        ref = refs.get(_key(r))
        speedup = ref / r["median_ms"] if ref and r.get("median_ms") else None
        spread = (f"{common.fmt(r.get('p20_ms'), 1)}-{common.fmt(r.get('p80_ms'), 1)}"
                  if r.get("p20_ms") is not None else "-")
        body.append([f"SED-{str(r.get('variant')).upper()}", r.get("impl"), _dtype(r), r.get("vocab"), r.get("T"),
                     r.get("batch"), _setting(r), common.fmt(r.get("median_ms"), 1), spread,
                     common.fmt(speedup, 2) + ("x" if speedup else ""),
                     common.fmt(r.get("encoder_ms"), 1), common.fmt(r.get("text_ms"), 2),
                     common.fmt(r.get("decoder_ms"), 1), common.fmt(r.get("peak_mem_mb"), 0),
                     common.fmt(r.get("kept_mean"), 1), common.fmt(r.get("max_abs_diff_vs_reference"), 6),
                     _status(r)])
    header = ["model", "impl", "dtype", "vocab", "T", "batch", "setting", "median ms", "p20-p80 ms", "vs ref",
              "encoder ms", "text ms", "decoder ms", "peak MB", "kept", "max diff", "status"]
    return _table(header, body)


def paper_table(rows) -> List[str]:
    """The paper's figures beside ``rows`` (of one run: :func:`group_runs`)."""
    ours = defaultdict(dict)
    for r in rows:
        if r.get("kind") != "e2e" or r.get("variant") != "b" or r.get("batch") != 1 or not r.get("median_ms"):
            continue
        if r.get("image_size") not in (None, 768) or r.get("clip_resolution") not in (None, 768):
            continue
        ours[r.get("vocab")][(r.get("impl"), _dtype(r), _setting(r))] = r["median_ms"]
    picks = [("reference", "float32", "exact"), ("reference", "float32+tf32", "exact"),
             ("reference", "float32", "cer8"), ("fast", "float32", "exact"),
             ("fast", "float32", "cer8"), ("fast", "float32", "kept32"), ("fast", "bfloat16", "exact"),
             ("fast", "bfloat16", "kept32")]
    header = ["dataset (T)"] + [f"paper k={k}" if k else "paper all" for k in PAPER_KS] + \
             [f"ours {impl} {dtype} {setting}" for impl, dtype, setting in picks]
    body = []
    for dataset, (classes, values) in PAPER_LATENCY_MS.items():
        mine = ours.get(PAPER_VOCAB[dataset], {})
        body.append([f"{dataset} ({classes})"] + [f"{v:.1f}" for v in values]
                    + [common.fmt(mine.get(p), 1) for p in picks])
    return _table(header, body)


def kernel_table(rows) -> List[str]:
    body = []
    for r in rows:
        fractions = [f for f in (r.get("frac_peak_bw"), r.get("frac_peak_flops")) if f is not None]
        impl = str(r.get("impl")) + (f" ({r['backend']})" if r.get("impl") == "sed_fast" and r.get("backend") else "")
        status = "error: " + str(r["error"])[:80] if r.get("error") else \
            {True: "ok", False: "WRONG OUTPUT", None: "unchecked"}[r.get("valid")]
        body.append([r.get("op"), r.get("shape"), r.get("dtype"), impl, common.fmt(r.get("median_ms"), 3),
                     common.fmt(r.get("gb_per_s"), 1), common.fmt(r.get("tflop_per_s"), 2),
                     f"{100 * max(fractions):.0f}%" if fractions else "-",
                     common.fmt(r.get("speedup_vs_official"), 2), common.fmt(r.get("max_abs_diff_vs_reference"), 6),
                     status])
    return _table(["op", "shape", "dtype", "impl", "median ms", "GB/s", "TFLOP/s", "% peak", "speed-up",
                   "max diff", "status"], body)


def stage_peak_table(rows, most: int = 6) -> List[str]:
    """End-to-end rows with per-stage counts: their longest stages with time, roof and %peak."""
    body = []
    for r in rows:
        fractions, stages = r.get("stages_frac_peak") or {}, r.get("stages_ms") or {}
        if not fractions or r.get("valid") is False:
            continue
        longest = sorted(stages, key=lambda name: -(stages[name] or 0))[:most]
        cells = [f"{name} {common.fmt(stages[name], 1)} ms "
                 + (f"{100 * fractions[name]:.0f}% {(r.get('stages_bound') or {}).get(name) or ''}".rstrip()
                    if fractions.get(name) is not None else "-")
                 for name in longest]
        body.append([f"SED-{str(r.get('variant')).upper()} {r.get('impl')} {_dtype(r)} {r.get('vocab')} "
                     f"B={r.get('batch')} {_setting(r)}", "; ".join(cells)])
    return _table(["row", f"longest {most} stages: ms, %peak of the binding roof"], body) if body else []


def profile_section(row) -> List[str]:
    lines = [f"**{row.get('config')}**", ""]
    body = []
    for s in row.get("stages") or []:
        fractions = [f for f in (s.get("frac_peak_bw"), s.get("frac_peak_flops")) if f is not None]
        body.append([s.get("stage"), common.fmt(s.get("ms"), 3),
                     f"{100 * s['share']:.1f}%" if s.get("share") is not None else "",
                     common.fmt(s.get("tflop_per_s"), 2), common.fmt(s.get("gb_per_s"), 1),
                     common.fmt(s.get("intensity"), 1), s.get("bound") or "-",
                     f"{100 * max(fractions):.0f}%" if fractions else "-"])
    lines += _table(["stage", "ms", "share", "TFLOP/s", "GB/s", "FLOP/B", "roof", "% peak"], body)
    peaks = row.get("peaks")
    if peaks:
        lines += ["", f"Roofs ({peaks.get('source')}): "
                  + ", ".join(f"{k} GEMM {v:.3f} TFLOP/s" for k, v in (peaks.get("matmul_tflop_per_s") or {}).items())
                  + f", memory {float(peaks.get('copy_gb_per_s') or 0):.0f} GB/s."]
    routing = row.get("linear_routing") or {}
    if routing.get("differs"):
        lines += ["", f"NOTE: linears on {routing.get('fast_float32')}, not the default {routing.get('default')} "
                  f"({routing.get('why')})."]
    return lines


def write_markdown(path: Path, rows, plots: Sequence[str], not_plotted: Optional[Dict[str, str]] = None) -> None:
    e2e = [r for r in rows if r.get("kind", "e2e") == "e2e"]
    kernels = [r for r in rows if r.get("kind") == "kernel"]
    profiles = [r for r in rows if r.get("kind") == "profile"]
    lines = [_REPORT_TITLE, ""]
    runs = group_runs(rows)
    names = {key: f"run {i}" for i, key in enumerate(runs, 1)}
    lines += ["Runs: rows measured on one machine, at one commit, with the same image size, encoder resolution, "
              "threads and TF32. Each run has its own tables; speed-ups compare rows of one run only.", ""]
    body = []
    for key, group in runs.items():
        values = dict(zip(RUN_FIELDS, key))
        body.append([names[key]] + [common.fmt(values[f]) for f in RUN_FIELDS[:-1]]
                    + ["on" if values["tf32"] else "off", len(group), max(str(r.get("timestamp")) for r in group)])
    lines += _table(["run", "device", "threads", "commit", "torch", "triton", "CUDA", "image px", "encoder px",
                     "TF32", "rows", "last row"], body)
    lines += ["", "Weights are random (no checkpoint): times are real, segmentations meaningless. float32 rows "
              "run with TF32 off unless the run says TF32 on. Rows marked WRONG OUTPUT differ from the float32 "
              "reference beyond the tolerance and are not results.", ""]
    if e2e:
        lines += ["## End to end", ""]
        for key, group in group_runs(e2e).items():
            lines += [f"### {names[key]}: {run_label(key)}", ""] + e2e_table(group) + [""]
            peaks = next((r.get("peaks") for r in group if r.get("peaks")), None)
            stage_peaks = stage_peak_table(group)
            if stage_peaks:
                lines += [f"Per stage, against the roofs {peaks.get('source') if peaks else '-'} "
                          "(compute: GEMM rate; memory: bandwidth):", ""] + stage_peaks + [""]
        lines += [f"## Beside the paper (SED-B, 768x768, batch 1; paper: one {PAPER_GPU}, a DIFFERENT GPU)", "",
                  "The paper's CER rows come from trained weights that reject most classes; random weights keep "
                  "almost all, so compare the paper's k columns with our forced kept-class rows (kept32).", ""]
        official = [(key, group) for key, group in group_runs(e2e).items()
                    if any(r.get("image_size") in (None, 768) and r.get("clip_resolution") in (None, 768)
                           for r in group)]
        for key, group in official or [(None, [])]:
            if key is not None:
                lines += [f"Ours: {names[key]} ({run_label(key)}).", ""]
            lines += paper_table(group) + [""]
    if kernels:
        lines += ["## Kernels", ""]
        for key, group in group_runs(kernels).items():
            lines += [f"### {names[key]}: {run_label(key)}", ""] + kernel_table(group) + [""]
    if profiles:
        lines += ["## Profiles", ""]
        for row in profiles:
            lines += [f"{names[run_key(row)]}: {run_label(run_key(row))}", ""] + profile_section(row) + [""]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    if not_plotted:
        lines += ["## Plots not drawn", ""] + [f"* {name}: {why}" for name, why in not_plotted.items()] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- plots ------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _latency_panels(rows) -> "OrderedDict[Tuple, List[dict]]":
    """Panels of the latency plot: (variant, batch, run) -> rows, only those where some line has
    at least two class counts (a line of one point says nothing about how latency grows)."""
    valid = [r for r in rows if r.get("kind", "e2e") == "e2e" and r.get("median_ms") and r.get("T")]
    panels: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for r in valid:  # one panel per run: lines never join rows of different runs
        panels.setdefault((r.get("variant"), r.get("batch"), run_key(r)), []).append(r)
    kept: "OrderedDict[Tuple, List[dict]]" = OrderedDict()
    for key, group in panels.items():
        classes_per_line: Dict[str, set] = defaultdict(set)
        for r in group:
            classes_per_line[_series_label(r)].add(r["T"])
        if any(len(counts) >= 2 for counts in classes_per_line.values()):
            kept[key] = group
    return kept


def latency_plot_gap(rows) -> Optional[str]:
    """Why the latency-vs-classes plot cannot be drawn from ``rows``, or None when it can."""
    valid = [r for r in rows if r.get("kind", "e2e") == "e2e" and r.get("median_ms") and r.get("T")]
    if not valid:
        return "no end-to-end row with a valid time"
    if not _latency_panels(rows):
        counts = sorted({f"{r.get('vocab')} (T={r['T']})" for r in valid})
        return (f"every run measured one class count per line ({', '.join(counts)}): a latency-vs-classes line "
                "needs at least two; run sed-fast bench with several --vocabs (e.g. voc20,ade150)")
    return None


def roofline_plot_gap(rows) -> Optional[str]:
    """Why no roofline can be drawn from ``rows``, or None when at least one profile has one."""
    profiles = [r for r in rows if r.get("kind") == "profile"]
    if not profiles:
        return "no profile rows (run sed-fast profile --save)"
    if not _roofline_profiles(rows):
        return ("no profile has both the machine's peaks and per-stage FLOP and byte counts (profiles saved "
                "with --no-counts, by an older version, or on a GPU without datasheet peaks)")
    return None


def _roofline_profiles(rows, most: int = 4) -> List[dict]:
    usable = [r for r in rows if r.get("kind") == "profile" and (r.get("peaks") or {}).get("copy_gb_per_s")
              and any(s.get("flops") and s.get("bytes") and s.get("ms") for s in r.get("stages") or [])]
    return usable[-most:]


def plot_roofline(path: Path, rows) -> bool:
    """Per profile: its top-level stage times as bars beside its roofline (stages as points)."""
    profiles = _roofline_profiles(rows)
    if not profiles:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(profiles), 2, figsize=(15, 5.5 * len(profiles)), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for (bars, roof), row in zip(axes, profiles):
        stages = [s for s in row["stages"] if s.get("depth", 0) == 0 and s.get("ms")]
        bars.barh(range(len(stages)), [s["ms"] for s in stages],
                  color=[colors[list(STAGE_GROUPS).index(stage_group(str(s["stage"]))) % len(colors)]
                         if stage_group(str(s["stage"])) in STAGE_GROUPS else "grey" for s in stages])
        bars.set_yticks(range(len(stages)))
        bars.set_yticklabels([str(s["stage"]) for s in stages], fontsize=6)
        bars.invert_yaxis()
        bars.set_xlabel("ms per forward (median)")
        bars.set_title(str(row.get("config"))[:120], fontsize=7)
        peaks = row["peaks"]
        precision = str(row.get("precision") or row.get("dtype") or "float32")
        peak = common.peak_flops(peaks, precision) or 0.0
        bandwidth = float(peaks["copy_gb_per_s"])
        points = [s for s in row["stages"] if s.get("flops") and s.get("bytes") and s.get("ms")]
        xs = [s["flops"] / s["bytes"] for s in points]
        ys = [s["flops"] / (s["ms"] * 1e-3) / 1e12 for s in points]
        low, high = min(xs + [0.1]) / 2, max(xs + [peak * 1e3 / bandwidth]) * 4
        ridge = peak * 1e3 / bandwidth  # FLOP/B where the two roofs meet
        roof.plot([low, ridge], [low * bandwidth / 1e3, peak], "--", color="tab:blue",
                  label=f"memory roof {bandwidth:.0f} GB/s")
        roof.plot([ridge, high], [peak, peak], "--", color="tab:red",
                  label=f"compute roof {peak:.3f} TFLOP/s ({precision}); ridge {ridge:.1f} FLOP/B")
        for s, x, y in zip(points, xs, ys):
            group = stage_group(str(s["stage"]))
            color = colors[list(STAGE_GROUPS).index(group) % len(colors)] if group in STAGE_GROUPS else "grey"
            roof.scatter([x], [y], s=16, color=color, zorder=3)
            roof.annotate(str(s["stage"]), (x, y), fontsize=5, xytext=(3, 2), textcoords="offset points")
        roof.set_xscale("log")
        roof.set_yscale("log")
        roof.set_xlabel("arithmetic intensity (FLOP / byte moved, op by op)")
        roof.set_ylabel("achieved TFLOP/s")
        roof.set_title(f"roofline: {peaks.get('source')}", fontsize=7)
        roof.grid(True, which="both", alpha=0.3)
        roof.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_latency(path: Path, rows) -> bool:
    """Latency against the number of classes (False, nothing written, when :func:`latency_plot_gap`)."""
    panels = _latency_panels(rows)
    if not panels:
        return False
    runs = {key: i for i, key in enumerate(group_runs([r for group in panels.values() for r in group]), 1)}
    plt = _pyplot()
    count = len(panels)
    fig, axes = plt.subplots(1, count, figsize=(7 * count, 5.5), squeeze=False)
    for ax, ((variant, batch, key), group) in zip(axes[0], panels.items()):
        series = OrderedDict()
        for r in sorted(group, key=lambda r: r["T"]):
            series.setdefault(_series_label(r), {})[r["T"]] = r["median_ms"]
        if len(series) > MAX_SERIES:  # keep the headline settings readable
            series = OrderedDict((k, v) for k, v in series.items() if k.rsplit(" ", 1)[-1] in HEADLINE_SETTINGS)
        for label, points in series.items():
            xs = sorted(points)
            style = "-o" if "fast" in label else "-s"
            ax.plot(xs, [points[x] for x in xs], style, label=label, markersize=4)
        official = key is None or (dict(zip(RUN_FIELDS, key)).get("image_size") in (None, 768)
                                   and dict(zip(RUN_FIELDS, key)).get("clip_resolution") in (None, 768))
        if variant == "b" and batch == 1 and official:
            for i, k in enumerate(PAPER_KS):
                xs = [c for c, _ in PAPER_LATENCY_MS.values()]
                ys = [v[i] for _, v in PAPER_LATENCY_MS.values()]
                ax.plot(xs, ys, "--", color=str(0.35 + 0.1 * i), marker="x", markersize=4,
                        label=f"paper {PAPER_GPU} (different GPU) " + (f"CER k={k}" if k else "no CER"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes T")
        ax.set_ylabel("median latency (ms)")
        where = f"run {runs[key]}: {run_label(key)}"
        ax.set_title(f"SED-{str(variant).upper()}, batch {batch}\n({where})", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bar_parts(row) -> Optional[Dict[str, float]]:
    total = row.get("median_ms")
    if not total:
        return None
    parts: Dict[str, float] = OrderedDict((g, 0.0) for g in list(STAGE_GROUPS) + ["other"])
    stages = row.get("stages_ms")
    if stages:
        for name, ms in stages.items():
            if name.startswith("other") or ms is None:
                continue
            parts[stage_group(name)] += float(ms)
    elif row.get("encoder_ms") is not None:
        parts = OrderedDict([("image encoder", float(row["encoder_ms"])), ("text", float(row.get("text_ms") or 0.0)),
                             ("decoder (all)", float(row.get("decoder_ms") or 0.0)), ("other", 0.0)])
    else:
        return None
    recorded_total = row.get("stages_total_ms") if stages else None
    tracked = sum(v for k, v in parts.items() if k != "other")
    if recorded_total:  # shares of the recorded forwards, scaled to the median latency
        parts["other"] = max(0.0, float(recorded_total) - tracked)
        scale = float(total) / max(float(recorded_total), tracked)
        parts = OrderedDict((k, v * scale) for k, v in parts.items())
    else:
        parts["other"] = max(0.0, float(total) - tracked)
    return parts


def plot_stages(path: Path, rows, max_bars: int = 24) -> bool:
    candidates = [r for r in rows if r.get("kind", "e2e") in ("e2e", "profile") and _bar_parts(r)]
    if len(candidates) > max_bars:  # keep the biggest vocabularies of batch 1 first
        candidates.sort(key=lambda r: (r.get("kind") != "profile", r.get("batch") != 1, -(r.get("T") or 0)))
        candidates = candidates[:max_bars]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(candidates) + 3), 6))
    groups: List[str] = []
    bars = []
    for r in candidates:
        parts = _bar_parts(r)
        bars.append(parts)
        for g in parts:
            if g not in groups:
                groups.append(g)
    runs = {key: i for i, key in enumerate(group_runs(candidates), 1)}
    labels = [f"{'[profile] ' if r.get('kind') == 'profile' else ''}{r.get('impl')} {_dtype(r)}\n"
              f"{r.get('vocab')} B={r.get('batch')} {_setting(r)}\nrun {runs[run_key(r)]} {r.get('image_size')}px"
              for r in candidates]
    colors = plt.get_cmap("tab20").colors
    bottoms = [0.0] * len(bars)
    for i, g in enumerate(groups):
        values = [b.get(g, 0.0) for b in bars]
        if not any(values):
            continue
        ax.bar(range(len(bars)), values, bottom=bottoms, label=g, color=colors[i % len(colors)])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("ms per forward")
    ax.set_title("Per-stage time (bar = median latency; shares from recorded forwards; other = outside stages)",
                 fontsize=9)
    if bars:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- summary ----------------------------------------------------------------------------------------
def print_summary(rows, file=None) -> None:
    """A short text table: end-to-end rows with speed-up, then the auto-backend kernel speed-ups."""
    e2e = [r for r in rows if r.get("kind", "e2e") == "e2e"]
    refs = _reference_times(e2e)
    for number, (key, group) in enumerate(group_runs(e2e).items(), 1):
        print(f"run {number}: {run_label(key)}", file=file)
        print(f"{'config':<58} {'median ms':>10} {'vs ref':>7}  status", file=file)
        for r in group:
            ref = refs.get(_key(r))
            speedup = f"{ref / r['median_ms']:.2f}x" if ref and r.get("median_ms") else "-"
            config = (f"SED-{str(r.get('variant')).upper()} {r.get('impl')} {_dtype(r)} {r.get('vocab')} "
                      f"B={r.get('batch')} {_setting(r)}")
            print(f"{config[:58]:<58} {common.fmt(r.get('median_ms'), 1):>10} {speedup:>7}  {_status(r)[:60]}",
                  file=file)
    kernels = [r for r in rows if r.get("kind") == "kernel" and r.get("impl") == "sed_fast"]
    if kernels:
        print(f"\n{'kernel (auto backend) vs official':<58} {'median ms':>10} {'speedup':>7}  status", file=file)
        for r in kernels:
            name = f"{r.get('op')} {r.get('shape')} {r.get('dtype')} {r.get('backend') or ''}"
            status = "error" if r.get("error") else {True: "ok", False: "WRONG", None: "unchecked"}[r.get("valid")]
            print(f"{name[:58]:<58} {common.fmt(r.get('median_ms'), 3):>10} "
                  f"{common.fmt(r.get('speedup_vs_official'), 2):>7}  {status}", file=file)


PLOTS = ("latency_vs_classes.png", "stages.png", "roofline.png")
_REPORT_TITLE = "# SED benchmark report"


def _claim_outputs(args, out: Path) -> None:
    """The ``--out`` rule: the report's files may replace only files a report wrote there."""
    from ..toolkit.outputs import claim_outputs

    names = [f"{args.name}.md", *PLOTS]

    def written_by_an_earlier_report(name: str) -> bool:  # a report of a sed-fast without claim files
        try:
            with open(out / f"{args.name}.md", encoding="utf-8") as handle:
                return handle.readline().rstrip("\n") == _REPORT_TITLE
        except (OSError, UnicodeDecodeError):
            return False

    claim_outputs(str(args.out or out), out, "report", names, legacy_owned=written_by_an_earlier_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sed-fast report", description="Markdown + PNG report of benchmark results.")
    parser.add_argument("files", nargs="*", help=".jsonl files or folders (default: the results folder)")
    parser.add_argument("--results-dir", default=None,
                        help="results folder (default ./sed_fast_results, or $SED_FAST_RESULTS_DIR)")
    parser.add_argument("--out", default=None, help="output folder (default: the results folder)")
    parser.add_argument("--name", default="report", help="Markdown file name (<name>.md)")
    parser.add_argument("--no-plots", action="store_true", help="write the Markdown only")
    parser.add_argument("--print", dest="print_summary", action="store_true", help="print a short summary table")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    folder = common.results_dir(args.results_dir)
    rows = common.read_rows(args.files or [folder])
    out = Path(args.out) if args.out else folder
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        print(f"no result rows in {', '.join(map(str, args.files or [folder]))}", file=sys.stderr)
        return 1
    try:
        _claim_outputs(args, out)
    except UsageError as error:
        print(f"sed-fast report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    plots: List[str] = []
    not_plotted: Dict[str, str] = {}
    if not args.no_plots:
        gaps = {"latency_vs_classes.png": latency_plot_gap(rows), "roofline.png": roofline_plot_gap(rows)}
        not_plotted = {name: why for name, why in gaps.items() if why}
        try:
            for name, draw in (("latency_vs_classes.png", plot_latency), ("stages.png", plot_stages),
                               ("roofline.png", plot_roofline)):
                if name not in not_plotted and draw(out / name, rows):
                    plots.append(name)
        except ImportError as error:
            print(f"warning: no plots ({error}); install matplotlib", file=sys.stderr)
    write_markdown(out / f"{args.name}.md", rows, plots, not_plotted)
    print(f"wrote {out / (args.name + '.md')}" + "".join(f", {out / p}" for p in plots))
    for name, why in not_plotted.items():
        print(f"not drawn: {name}: {why}")
    if args.print_summary:
        print_summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
