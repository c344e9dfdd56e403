"""CPU smoke tests of the benchmarks: the kernel benchmark, the end-to-end benchmark, the profile
command and the report run at tiny sizes, and their outputs are checked for shape and sanity (never
for speed). The runs share one results folder (module fixture) and take a few seconds each."""
import datetime as dt
import json
import math
import re

import pytest
import torch

from sed_fast.bench import common, e2e, kernels, profile, report

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

TINY = ["--smoke", "--clip-resolution", "32", "--image-size", "48"]
ENV_FIELDS = ("device", "torch", "triton", "cuda", "git_commit", "timestamp")
E2E_FIELDS = ENV_FIELDS + ("config", "impl", "dtype", "vocab", "T", "batch", "cer_topk", "kept_classes", "median_ms",
                           "p20_ms", "p80_ms", "peak_mem_mb", "max_abs_diff_vs_reference", "encoder_ms", "text_ms",
                           "decoder_ms", "valid")
KERNEL_FIELDS = ENV_FIELDS + ("op", "shape", "T", "dtype", "impl", "median_ms", "p20_ms", "p80_ms", "bytes",
                              "gb_per_s", "frac_peak_bw", "speedup_vs_official", "max_abs_diff_vs_reference", "valid")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run kernels, e2e and two profiles into one folder; return (folder, outputs by command)."""
    folder = tmp_path_factory.mktemp("bench_results")
    outputs = {}
    import contextlib
    import io
    for name, main, argv in [
        ("kernels", kernels.main, ["--smoke", "--classes", "5", "--reps", "2", "--results-dir", str(folder)]),
        ("e2e", e2e.main, TINY + ["--impls", "reference,reference+autocast,fast", "--fast-dtypes", "float32",
                                  "--cer-topk", "1", "--kept-classes", "4", "--autocast-settings", "exact",
                                  "--results-dir", str(folder)]),
        ("profile_fast", profile.main, TINY + ["--reps", "1", "--cer-topk", "1", "--results-dir", str(folder), "--save",
                                               "--json", str(folder / "profile_fast.json"),
                                               "--trace", str(folder / "trace.json")]),
        ("profile_reference", profile.main, TINY + ["--impl", "reference", "--reps", "1", "--results-dir", str(folder),
                                                    "--json", str(folder / "profile_reference.json")]),
    ]:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(argv)
        outputs[name] = buffer.getvalue()
        assert code == 0, f"{name} exited with {code}:\n{outputs[name]}"
    return folder, outputs


def _check_env(row):
    for field in ENV_FIELDS:
        assert field in row, field
    assert isinstance(row["device"], str) and row["device"]
    assert row["torch"] == torch.__version__
    assert row["triton"] is None or isinstance(row["triton"], str)
    assert row["cuda"] is None or isinstance(row["cuda"], str)
    assert row["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", row["git_commit"])
    dt.datetime.fromisoformat(row["timestamp"])


def _check_timing(row):
    for field in ("median_ms", "p20_ms", "p80_ms"):
        assert isinstance(row[field], float) and math.isfinite(row[field]) and row[field] > 0, (field, row)
    assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]


# -- kernels ----------------------------------------------------------------------------------------
def test_kernel_benchmark_rows(results):
    folder, outputs = results
    rows = _rows(folder / "kernels.jsonl")
    assert {r["op"] for r in rows} == set(kernels.OPS)
    assert len(rows) == 2 * (1 + 2 * 4)  # official + op, cost map once, the others at 2 smoke levels
    for row in rows:
        for field in KERNEL_FIELDS:
            assert field in row, field
        _check_env(row)
        _check_timing(row)
        assert row["kind"] == "kernel" and row["T"] == 5 and row["dtype"] == "float32"
        assert row["impl"] in ("official", "sed_fast")
        assert row["error"] is None and row["valid"] is True
        assert 0 <= row["max_abs_diff_vs_reference"] <= 1e-4
        assert row["bytes"] > 0 and row["gb_per_s"] > 0
        assert row["frac_peak_bw"] is None if common.datasheet_peaks(name=row["device"]) is None \
            else 0 < row["frac_peak_bw"] <= 1  # % of peak only against a datasheet
        assert row["speedup_vs_official"] > 0
        if row["op"] in ("cost_map", "dwconv_layernorm", "class_attention"):
            assert row["flops"] > 0 and row["tflop_per_s"] > 0
        if row["impl"] == "sed_fast":
            # What "auto" picks on CPU without the interpreter.
            assert row["backend"] == ("cpu" if row["op"] == "class_attention" else "torch")
    peaks = json.loads((folder / "device_peaks.json").read_text())
    entry = peaks[rows[0]["device"]]
    assert entry["copy_gb_per_s"] > 0 and entry["matmul_tflop_per_s"]["float32"] > 0
    assert "cost_map" in outputs["kernels"] and "speedup" in outputs["kernels"]


# -- end to end -------------------------------------------------------------------------------------
def test_e2e_rows(results):
    folder, outputs = results
    rows = _rows(folder / "e2e.jsonl")
    seen = {(r["impl"], r["dtype"], r["setting"]) for r in rows}
    assert seen == {("reference", "float32", "exact"), ("reference", "float32", "cer1"),
                    ("reference", "float32", "kept4"), ("reference+autocast", "bfloat16", "exact"),
                    ("fast", "float32", "exact"), ("fast", "float32", "cer1"), ("fast", "float32", "kept4")}
    for row in rows:
        for field in E2E_FIELDS:
            assert field in row, field
        _check_env(row)
        _check_timing(row)
        assert row["kind"] == "e2e" and row["vocab"] == "voc20" and row["T"] == 20 and row["batch"] == 1
        assert row["error"] is None and row["valid"] is True, row
        assert row["peak_mem_mb"] is None  # CPU
        assert 0 <= row["max_abs_diff_vs_reference"] <= common.E2E_TOLERANCE[row["dtype"]]
        for field in ("encoder_ms", "text_ms", "decoder_ms"):
            assert isinstance(row[field], float) and row[field] >= 0
        assert row["stages_ms"]["image_encoder"] > 0 and row["stages_total_ms"] > 0
        # what ran and how close to the roofs: the stage's %peak against this machine's measured peaks
        assert row["peaks"]["matmul_tflop_per_s"]["float32"] > 0 and row["peaks"]["copy_gb_per_s"] > 0
        assert row["linear_routing"]["fast_float32"] and row["cpu"]["name"] and row["libraries"]["torch"]
        assert row["stages_flops"]["image_encoder"] > 0 and row["total_flops"] > 0
        assert row["stages_frac_peak"]["image_encoder"] > 0 and row["stages_bound"]["image_encoder"]
        assert any(path.startswith(("linear:", "matmul:")) for path in row["stages_paths"]["image_encoder"])
        if row["setting"] == "exact":
            assert row["cer_topk"] is None and row["kept_classes"] is None and row["kept_mean"] is None
        elif row["setting"] == "cer1":
            assert row["cer_topk"] == 1 and row["kept_classes"] is None and 1 <= row["kept_mean"] <= 20
        else:
            assert row["cer_topk"] is None and row["kept_classes"] == 4 and row["kept_mean"] == 4
            assert row["kept_mismatch"] == 0
    assert len(re.findall(r"^SED-B .*\s+ok$", outputs["e2e"], flags=re.M)) == len(rows)


class _ToyModel(torch.nn.Module):
    """Stands in for a SED model in run_row: scores = sigmoid(mean of each image) + offset."""

    def __init__(self, offset=0.0, classes=3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.offset, self.classes = offset, classes
        self.rejection = None

    def forward(self, images):
        scores = torch.sigmoid(images.mean(dim=(1, 2, 3)) * self.weight) + self.offset  # per image
        return scores[:, None, None, None].expand(-1, self.classes, *images.shape[-2:]).clone()

    def clip_input(self, batch):
        return torch.stack(batch.images)

    def encode_image(self, images):
        return images, [images] * 4

    def _text_for_decoder(self):
        return torch.zeros(self.classes)

    def decode(self, dense, text, features):
        return self(dense)


def _toy_row(model, **kw):
    images = torch.rand(2, 3, 32, 32) * 255
    check = e2e.ReferenceOutputs(_ToyModel(), images, e2e.Setting())
    base = dict(common.environment("cpu"), kind="e2e", variant="b", vocab="toy", T=3, batch=2, image_size=32,
                clip_resolution=32, text_source="random", text_setup_ms=None, tf32=False)
    return e2e.run_row("fast", model, "float32", e2e.Setting(), images, check, base,
                       {"warmup": 0, "reps": 2}, stage_timing=False, **kw)


def test_e2e_wrong_outputs_are_flagged_and_not_reported():
    good = _toy_row(_ToyModel(offset=0.0))
    assert good["valid"] is True and good["median_ms"] > 0 and good["max_abs_diff_vs_reference"] == 0
    wrong = _toy_row(_ToyModel(offset=1e-3))
    assert wrong["valid"] is False
    assert wrong["median_ms"] is None and wrong["p20_ms"] is None and wrong["unchecked_median_ms"] > 0
    assert wrong["max_abs_diff_vs_reference"] == pytest.approx(1e-3, rel=1e-3)
    assert "WRONG OUTPUT" in wrong["note"]


def test_e2e_compile_failure_is_a_row(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    row = _toy_row(_ToyModel(), compile_mode="default")
    assert row["error"] == "torch.compile failed: RuntimeError: no compiler here"
    assert row["valid"] is False and row["median_ms"] is None


def test_e2e_bad_arguments_are_usage_errors(capsys):
    assert e2e.main(["--smoke", "--impls", "nope"]) == 2
    assert e2e.main(["--smoke", "--vocabs", "not_a_vocab"]) == 2
    assert "error" in capsys.readouterr().err
    assert e2e.vocab_size("ade847") == 847 and e2e.vocab_size("random7") == 7


# -- profile ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, stages", [
    ("profile_fast", ["image_encoder", "text", "cost_map", "conv1", "reject0", "reject1", "reject2",
                      "decoder1.dwconv", "decoder2.class_attention", "decoder3.upsample", "decoder3.double_conv",
                      "head", "resize"]),
    ("profile_reference", ["image_encoder", "text", "cost_map", "conv1", "aux_head0", "decoder1.dwconv",
                           "decoder1.convnext_mlp", "decoder2.class_attention", "decoder3.upsample",
                           "decoder3.double_conv", "head", "resize"]),
])
def test_profile_lists_the_stages_with_shares_summing_to_100(results, name, stages):
    folder, outputs = results
    text = outputs[name]
    listed = {line.split()[0] for line in text.splitlines() if line and not line.startswith(("-", " "))}
    for stage in stages + ["other"]:
        assert stage in listed, (stage, text)
    shares = [float(m) for m in re.findall(r"^\S.*?\s(\d+\.\d)%", text.split("\nsum of the rows")[0], flags=re.M)]
    assert abs(sum(shares) - 100.0) <= 0.1 * len(shares) + 0.5
    assert re.search(r"^sum of the rows\s+\S+\s+100\.0%", text, flags=re.M)
    assert re.search(r"^total \(median forward\)\s+\S+\s+the median of \d+ whole forwards", text, flags=re.M)
    record = json.loads((folder / f"{name}.json").read_text())
    top = [s for s in record["stages"] if s["depth"] == 0]
    assert abs(sum(s["share"] for s in top) - 1.0) < 1e-6
    counted = [s for s in top if s["flops"]]
    assert any(s["stage"] == "image_encoder" for s in counted) and all(s["tflop_per_s"] > 0 for s in counted)


def test_profile_trace_and_saved_row(results):
    folder, _ = results
    trace = json.loads((folder / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "decoder1.class_attention" in names  # the stage ranges are in the trace
    rows = _rows(folder / "profile.jsonl")
    assert len(rows) == 1 and rows[0]["kind"] == "profile" and rows[0]["cer_topk"] == 1
    _check_env(rows[0])
    _check_timing(rows[0])


def test_breakdown_shares_sum_to_one_even_when_stages_exceed_the_total():
    rows = profile.breakdown({"a": 6.0, "b": 5.0, "a.inner": 1.0}, {"a": 0, "b": 0, "a.inner": 1},
                             ["a", "a.inner", "b"], 10.0, {}, {}, None, torch.float32)
    top = [r for r in rows if r["depth"] == 0]
    assert sum(r["share"] for r in top) == pytest.approx(1.0)
    assert rows[-1]["stage"] == profile.OTHER and rows[-1]["ms"] == 0.0


# -- report -----------------------------------------------------------------------------------------
def test_report_markdown_and_plots(results, tmp_path, capsys):
    folder, _ = results
    assert report.main(["--results-dir", str(folder), "--out", str(tmp_path), "--print"]) == 0
    printed = capsys.readouterr().out
    assert "fast float32 voc20 B=1 exact" in printed
    markdown = (tmp_path / "report.md").read_text()
    e2e_rows, kernel_rows = _rows(folder / "e2e.jsonl"), _rows(folder / "kernels.jsonl")

    def table_after(title):  # the first Markdown table after the title
        lines = markdown.split(title, 1)[1].strip().splitlines()
        table = []
        for line in lines:
            if line.startswith("|"):
                table.append(line)
            elif table:
                break
        return table

    e2e_table = table_after("## End to end")
    assert e2e_table[0].startswith("| model | impl | dtype |") and set(e2e_table[1]) <= set("|-")
    assert len(e2e_table) == 2 + len(e2e_rows)
    kernel_table = table_after("## Kernels")
    assert kernel_table[0].startswith("| op | shape |") and len(kernel_table) == 2 + len(kernel_rows)
    paper = table_after("DIFFERENT GPU)")
    assert len(paper) == 2 + len(report.PAPER_LATENCY_MS) and "861.0" in markdown
    assert "| FLOP/B | roof | % peak |" in markdown and "Roofs (measured on this CPU" in markdown
    stage_peaks = table_after("(compute: GEMM rate; memory: bandwidth):")
    assert len(stage_peaks) == 2 + len(e2e_rows) and re.search(r"image_encoder [\d.,]+ ms \d+% (compute|memory)",
                                                              stage_peaks[2])
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the `plots` extra)")
    for png in ("stages.png", "roofline.png"):
        _check_png(tmp_path / png)
        assert f"]({png})" in markdown
    # --smoke measured one class count: a latency line would be one point, so it is not drawn, and said
    assert not (tmp_path / "latency_vs_classes.png").exists()
    assert "## Plots not drawn" in markdown and "latency_vs_classes.png: every run measured one class count" in markdown
    assert "not drawn: latency_vs_classes.png: every run measured one class count per line (voc20 (T=20))" in printed


def _check_png(path):
    import matplotlib.image
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_report_draws_latency_with_two_class_counts_and_says_why_no_roofline(results, tmp_path, capsys):
    folder, _ = results
    rows = _rows(folder / "e2e.jsonl")
    more = [dict(r, vocab="random40", T=40, median_ms=r["median_ms"] * 2) for r in rows]
    common.append_rows(tmp_path / "e2e.jsonl", rows + more)
    assert report.main(["--results-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    markdown = (tmp_path / "report.md").read_text()
    assert "](latency_vs_classes.png)" in markdown and "latency_vs_classes.png:" not in markdown
    assert "roofline.png: no profile rows" in markdown and "not drawn: roofline.png" in printed
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the `plots` extra)")
    _check_png(tmp_path / "latency_vs_classes.png")
    assert not (tmp_path / "roofline.png").exists()


def test_report_flags_wrong_rows(tmp_path):
    row = dict(common.environment("cpu"), kind="e2e", variant="b", impl="fast", dtype="float32", vocab="voc20", T=20,
               batch=1, cer_topk=None, kept_classes=None, setting="exact", median_ms=None, p20_ms=None, p80_ms=None,
               unchecked_median_ms=3.0, valid=False, max_abs_diff_vs_reference=0.5, note="WRONG OUTPUT: max diff 0.5",
               error=None)
    common.append_rows(tmp_path / "e2e.jsonl", [row])
    assert report.main(["--results-dir", str(tmp_path), "--no-plots"]) == 0
    line = [x for x in (tmp_path / "report.md").read_text().splitlines() if x.startswith("| SED-B | fast")][0]
    assert "WRONG OUTPUT" in line and "| 3.0" not in line


# -- small pieces -----------------------------------------------------------------------------------
def test_quantiles_and_rates():
    timing = common.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.median_ms, timing.p20_ms, timing.p80_ms, timing.reps) == (3.0, 1.8, 4.2, 5)
    peaks = {"copy_gb_per_s": 100.0, "matmul_tflop_per_s": {"float32": 10.0}}
    rates = common.rates(2e9, 1e12, 1000.0, peaks, "bfloat16")  # bf16 not measured: float32 peak
    assert rates == {"gb_per_s": 2.0, "tflop_per_s": 1.0, "frac_peak_bw": 0.02, "frac_peak_flops": 0.1}
    assert common.git_commit() == "unknown" or len(common.git_commit()) >= 40


def test_stage_groups():
    assert report.stage_group("decoder2.dwconv") == "dwconv + LN"
    assert report.stage_group("reject1") == report.stage_group("aux_head0") == "rejection / aux heads"
    assert report.stage_group("decoder3.corr_guidance") == "guidance"
    assert report.stage_group("something_new") == "other"


def test_cli_dispatches_bench_and_profile(capsys):
    from sed_fast import cli
    assert cli.main(["bench", "--help"]) == 0
    assert "--kept-classes" in capsys.readouterr().out
    assert cli.main(["profile", "--help"]) == 0
    assert "--trace" in capsys.readouterr().out


def test_fast_options_parsing():
    assert e2e.parse_options("cuda_graphs=true, chunk_bytes=1024,x=0.5,name=abc") == {
        "cuda_graphs": True, "chunk_bytes": 1024, "x": 0.5, "name": "abc"}
    assert e2e.parse_options("") == {}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        e2e.parse_options("cuda_graphs")


# -- profile: FLOPs, roofline, what ran -------------------------------------------------------------
def test_profile_counts_every_multiplying_stage_and_gives_each_a_percent_of_peak(results):
    folder, outputs = results
    for name in ("profile_fast", "profile_reference"):
        record = json.loads((folder / f"{name}.json").read_text())
        peaks = record["peaks"]
        assert peaks["copy_gb_per_s"] > 0 and peaks["matmul_tflop_per_s"]["float32"] > 0
        assert set(peaks["matmul_tflop_per_s"]) >= {"float32", "bfloat16"} and peaks["measure_seconds"] >= 0
        stages = [s for s in record["stages"] if s["stage"] != profile.OTHER]
        multiplying = [s for s in stages if any(path.split(":")[0] in ("matmul", "linear", "conv", "cost_map",
                                                                      "class_attention", "dwconv_layernorm")
                                                for path in s["paths"])]
        assert not any(s["uncounted_ops"] for s in record["stages"]), record["stages"]
        assert {"image_encoder", "conv1", "decoder1.convnext_mlp", "decoder2.class_attention",
                "decoder3.double_conv", "head"} <= {s["stage"] for s in multiplying}
        for s in multiplying:  # no "-" in the FLOP column for a stage that multiplies
            assert s["flops"] and s["flops"] > 0, s
        for s in stages:
            if s["ms"] > 0 and (s["flops"] or s["bytes"]):
                assert s["frac_peak_flops"] is not None and s["bound"] in ("compute", "memory"), s
        assert record["total_flops"] == pytest.approx(sum(s["flops"] or 0 for s in record["stages"]))
        assert record["linear_routing"]["fast_float32"] in ("oneDNN", common.blas_name())
        assert record["cpu"]["features"] == list(__import__("sed_fast.base.cpu_features", fromlist=["x"]).cpu_flags())
        assert record["libraries"]["torch"] == torch.__version__
        text = outputs[name]
        assert "%peak: none" not in text and "binding roof" in text
        assert re.search(r"^FLOPs per forward: \d+\.\d+ GFLOP", text, flags=re.M)
    fast = json.loads((folder / "profile_fast.json").read_text())
    mlp = next(s for s in fast["stages"] if s["stage"] == "decoder1.convnext_mlp")
    if fast["linear_routing"]["fast_float32"] == "oneDNN":
        assert "linear: oneDNN" in mlp["paths"]  # the routed linears are counted where they run


def _tiny_model(impl):
    import warnings

    import sed_fast
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sed_fast.build_sed("b", impl=impl, device="cpu", clip_resolution=32)
    images = torch.rand(1, 3, 40, 40) * 255
    text, names, _ = e2e.synthetic_text(model, "voc20", 5, "random", images)
    model.text_embeddings, model.class_names = text, names
    return model, images


def test_counter_matches_flop_counter_mode_on_the_reference():
    from torch.utils.flop_counter import FlopCounterMode

    from sed_fast.base.stages import recording
    from sed_fast.bench.instrument import OpCounter, instrument

    model, images = _tiny_model("reference")
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain:
            model(images)
        counter = OpCounter("cpu")
        with recording("cpu", nvtx=False), instrument(model), counter:
            model(images)
    assert plain.get_total_flops() > 1e6
    assert sum(counter.flops.values()) == pytest.approx(plain.get_total_flops(), rel=1e-9)
    assert not any(counter.uncounted.values())


def test_counter_counts_a_custom_op_through_its_registered_flop_formula():
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    from sed_fast.base.stages import recording, stage
    from sed_fast.bench.instrument import OpCounter

    @torch.library.custom_op("sed_fast_profile_test::double_mm", mutates_args=())
    def double_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 2 * (a @ b)

    packet = torch.ops.sed_fast_profile_test.double_mm
    register_flop_formula(packet)(lambda a_shape, b_shape, *args, **kwargs: 2 * a_shape[0] * a_shape[1] * b_shape[1])
    try:
        counter = OpCounter("cpu")
        with recording("cpu", nvtx=False), counter:
            with stage("custom"):
                packet(torch.ones(3, 4), torch.ones(4, 5))
            with stage("plain"):
                torch.ones(3, 4) @ torch.ones(4, 5)
    finally:
        flop_registry.pop(packet, None)
    assert counter.flops["custom"] == 2 * 3 * 4 * 5  # once: the op's own formula, not its inner matmul
    assert counter.flops["plain"] == 2 * 3 * 4 * 5
    assert counter.paths["plain"] == {f"matmul: {common.blas_name()}": 1}


def test_onednn_linear_is_counted_like_the_linear_it_replaces():
    from sed_fast.bench.instrument import linear_pointwise_flops
    x, weight = torch.ones(2, 7, 16), torch.ones(24, 16)
    assert linear_pointwise_flops(x, weight, None, "none", [], "") == 2 * 14 * 16 * 24


def test_roofline_picks_the_binding_roof():
    peaks = {"copy_gb_per_s": 100.0, "matmul_tflop_per_s": {"float32": 1.0, "bfloat16": 4.0}}  # ridge 10 FLOP/B
    compute = common.roofline(1e9, 1e7, 2.0, peaks, "float32")  # 100 FLOP/B, 0.5 TFLOP/s
    assert compute["bound"] == "compute" and compute["frac_peak"] == pytest.approx(0.5)
    memory = common.roofline(1e9, 1e9, 20.0, peaks, "float32")  # 1 FLOP/B: roof 0.1 TFLOP/s, achieved 0.05
    assert memory["bound"] == "memory" and memory["roof_tflop_per_s"] == pytest.approx(0.1)
    assert memory["frac_peak"] == pytest.approx(0.5)
    assert common.roofline(1e9, 1e7, 2.0, peaks, "bfloat16")["frac_peak"] == pytest.approx(0.125)
    copy = common.roofline(None, 1e9, 20.0, peaks, "float32")  # 50 GB/s of 100
    assert copy["bound"] == "memory" and copy["frac_peak"] == pytest.approx(0.5)
    assert common.roofline(1e9, 1e7, 2.0, None, "float32")["frac_peak"] is None


def test_cpu_peaks_are_cached_per_cpu_threads_and_libraries(tmp_path, monkeypatch):
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure():
        calls.append(torch.get_num_threads())
        return {"copy_gb_per_s": 10.0, "matmul_tflop_per_s": {"float32": 0.1, "bfloat16": 0.2},
                "source": "measured", "how": "fake", "measure_seconds": 0.0}
    monkeypatch.setattr(common, "measure_cpu_peaks", fake_measure)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first, again = common.machine_peaks("cpu"), common.machine_peaks("cpu")
        assert (first["cached"], again["cached"], len(calls)) == (False, True, 1)
        assert again["matmul_tflop_per_s"] == first["matmul_tflop_per_s"]
        assert str(tmp_path / "peaks") in again["cache_file"]
        assert common.machine_peaks("cpu", refresh=True)["cached"] is False and len(calls) == 2
        monkeypatch.setattr(common, "library_versions", lambda: {"torch": "another"})
        assert common.machine_peaks("cpu")["cached"] is False and len(calls) == 3  # other libraries: measured
    finally:
        torch.set_num_threads(saved)


def test_routing_that_differs_from_the_default_is_said_first(monkeypatch, capsys):
    monkeypatch.setenv("SED_FAST_ONEDNN_LINEAR", "0")
    env = common.environment("cpu")
    assert env["linear_routing"]["differs"] and env["linear_routing"]["fast_float32"] == common.blas_name()
    assert "SED_FAST_ONEDNN_LINEAR=0" in common.routing_warning(env)
    assert profile.main(TINY + ["--reps", "1", "--warmup", "1", "--no-counts"]) == 0
    assert capsys.readouterr().out.startswith("NOTE: the fast model's float32 linears run on")
    monkeypatch.delenv("SED_FAST_ONEDNN_LINEAR")
    assert common.routing_warning(common.environment("cpu")) is None


def test_profile_reads_bytes_models_and_explained_differences_from_the_cost_registry(tmp_path, monkeypatch, capsys):
    """With a cost registry (``sed_fast.kernels.costs`` where the kernels provide it; a stand-in
    here): bytes of the ops it knows come from it, and its documented differences are printed."""
    from types import SimpleNamespace

    from sed_fast.bench import instrument

    def cost_of_call(op, *args, **kwargs):
        return SimpleNamespace(flops=0, bytes=1000) if op == "sed_fast::class_attention" else None
    difference = SimpleNamespace(stages="decoder*.double_conv", fast_count="fewer", reason="guidance convolved once")
    unused = SimpleNamespace(stages="no_such_stage*", fast_count="none", reason="not run here")
    monkeypatch.setattr(instrument, "_cost_registry", lambda: SimpleNamespace(
        cost_of_call=cost_of_call, REFERENCE_DIFFERENCES=(difference, unused)))
    assert profile.main(TINY + ["--reps", "1", "--warmup", "1", "--json", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    assert "  decoder*.double_conv (fast: fewer): guidance convolved once" in text
    assert "  no_such_stage* (fast: none; no such stage in this profile): not run here" in text
    assert re.search(r"^bytes: 3 op calls from the kernels' bytes models, \d+ from the sizes", text, flags=re.M)
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["explained_differences"][0] == {"stages": "decoder*.double_conv", "fast_count": "fewer",
                                                  "reason": "guidance convolved once", "in_this_profile": True}
    attention = {s["stage"]: s for s in record["stages"]}["decoder2.class_attention"]
    assert attention["bytes"] > 1000  # its q/k/v linears by tensor sizes, plus the op's 1000 modelled bytes
