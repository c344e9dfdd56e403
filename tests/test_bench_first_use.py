"""Benchmark outputs a new user reads: the report keeps runs apart, the profile's percentages are
physical (issue 23, items 3 and 4)."""
import io
import re

import pytest
import torch

from sed_fast.bench import common, profile, report


def _e2e(impl, ms, image_size, commit="a" * 40, **extra):
    row = dict(common.environment("cpu"), kind="e2e", variant="b", impl=impl, dtype="float32", vocab="voc20", T=20,
               batch=1, cer_topk=None, kept_classes=None, setting="exact", median_ms=ms, p20_ms=ms, p80_ms=ms,
               valid=True, error=None, image_size=image_size, clip_resolution=image_size, tf32=False)
    row.update(git_commit=commit, **extra)
    return row


def _tables(markdown, title):
    """{heading: table lines} for the '### ' sections after ``title``."""
    part = markdown.split(title, 1)[1].split("\n## ", 1)[0]
    tables = {}
    for section in part.split("### ")[1:]:
        heading, _, body = section.partition("\n")
        tables[heading] = [line for line in body.splitlines() if line.startswith("|")]
    return tables


def test_report_keeps_runs_with_other_settings_or_commits_apart(tmp_path):
    rows = [_e2e("reference", 76.0, 64), _e2e("fast", 38.0, 64),          # run 1
            _e2e("reference", 3165.0, 768),                                # run 2: another image size
            _e2e("fast", 1000.0, 768, commit="b" * 40),                    # run 3: another commit
            _e2e("fast", 20.0, 64, threads=99)]                            # run 4: other threads
    common.append_rows(tmp_path / "e2e.jsonl", rows)
    assert report.main(["--results-dir", str(tmp_path), "--no-plots"]) == 0
    markdown = (tmp_path / "report.md").read_text()
    tables = _tables(markdown, "## End to end")
    assert len(tables) == 4, list(tables)
    headings = list(tables)
    assert "image 64px, encoder 64px" in headings[0] and "image 768px, encoder 768px" in headings[1]
    assert "commit " + "b" * 12 in headings[2] and "99 threads" in headings[3]
    body = {heading: [line for line in table[2:]] for heading, table in tables.items()}
    assert len(body[headings[0]]) == 2 and "| 2.00x |" in body[headings[0]][1]  # within one run
    assert "| 3,165.0 |" in body[headings[1]][0]
    assert "| - |" in body[headings[2]][0] and "x |" not in body[headings[2]][0]  # no reference in its run
    assert "x |" not in body[headings[3]][0]
    summary = io.StringIO()
    report.print_summary(common.read_rows([tmp_path]), file=summary)
    text = summary.getvalue()
    assert text.count("run ") >= 4 and "image 768px" in text


def test_report_runs_table_names_every_setting(tmp_path):
    common.append_rows(tmp_path / "e2e.jsonl", [_e2e("reference", 76.0, 64), _e2e("reference", 70.0, 64, tf32=True)])
    assert report.main(["--results-dir", str(tmp_path), "--no-plots"]) == 0
    markdown = (tmp_path / "report.md").read_text()
    header = [line for line in markdown.splitlines() if line.startswith("| run |")][0]
    for column in ("device", "threads", "commit", "image px", "encoder px", "TF32"):
        assert f"| {column} |" in header
    assert len(_tables(markdown, "## End to end")) == 2  # TF32 on and off: two runs


# -- profile: % of peak ---------------------------------------------------------------------------
H100 = "NVIDIA H100 80GB HBM3"


def test_percent_of_peak_is_the_flop_rate_over_the_datasheet_peak():
    peaks = common.datasheet_peaks(name=H100)
    rows = profile.breakdown({"encoder": 100.0, "decoder": 50.0}, {"encoder": 0, "decoder": 0},
                             ["encoder", "decoder"], 160.0, {"encoder": 6.7e12, "decoder": 1e9},
                             {"encoder": 1e9, "decoder": 1e12}, peaks, "float32", other_ms=10.0)
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["encoder"]["frac_peak_flops"] == pytest.approx(1.0)  # 67 TFLOP/s: the fp32 peak
    assert by_stage["decoder"]["frac_peak_bw"] is None  # 20 TB/s of op traffic: not a DRAM rate
    assert sum(r["share"] for r in rows) == pytest.approx(1.0) and by_stage[profile.OTHER]["ms"] == 10.0
    bf16 = profile.breakdown({"encoder": 100.0}, {"encoder": 0}, ["encoder"], 100.0, {"encoder": 6.7e12}, {},
                             peaks, "bfloat16")
    assert bf16[0]["frac_peak_flops"] == pytest.approx(67.0 / 989.4)
    tf32 = common.precision_name(torch.float32, tf32=True)
    assert common.peak_flops(peaks, tf32) == 494.7
    # an unlisted device (every CPU): no percentage at all
    none = profile.breakdown({"encoder": 100.0}, {"encoder": 0}, ["encoder"], 100.0, {"encoder": 6.7e12}, {},
                             common.datasheet_peaks(name="CPU Some Processor (2 threads)"), "float32")
    assert none[0]["frac_peak_flops"] is None and none[0]["tflop_per_s"] == pytest.approx(67.0)


def _profile(argv, monkeypatch=None, name=None):
    out = io.StringIO()
    if name is not None:
        monkeypatch.setattr(common, "device_name", lambda device: name)
    import contextlib
    with contextlib.redirect_stdout(out):
        code = profile.main(argv)
    return code, out.getvalue()


def test_profile_on_a_known_device_model_gives_every_percentage_in_0_100(tmp_path, monkeypatch):
    """A real (smoke) profile with the peaks of a listed model: every % of peak is in [0, 100]."""
    argv = ["--smoke", "--reps", "1", "--warmup", "1", "--results-dir", str(tmp_path), "--json",
            str(tmp_path / "p.json")]
    code, text = _profile(argv, monkeypatch, H100)
    assert code == 0, text
    import json
    stages = json.loads((tmp_path / "p.json").read_text())["stages"]
    fractions = [s["frac_peak_flops"] for s in stages if s["frac_peak_flops"] is not None]
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions)
    assert all(s["frac_peak_bw"] is None for s in stages)
    percents = [int(p) for p in re.findall(r"\s(\d+)%!? [CM]$", text, flags=re.M)]
    assert percents and all(0 <= p <= 100 for p in percents) and "%!" not in text
    assert "C: compute, 67.000 TFLOP/s float32 GEMM, H100 SXM5 datasheet;" in text
    assert re.search(r"^total \(median forward\).*the rows add up to [\d.]+% of it", text, flags=re.M)
