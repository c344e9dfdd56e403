"""``sed-fast bench`` with the export rows at a tiny size (64 px encoder input, 3 classes, 640x640
images: the exports leave the official resize to the caller): the reference and fast exports, pt2
and ONNX, run in the same run as the eager reference, each checked against it, and each format's
pair compared with a verdict saying which export wins. Two AOTInductor compiles and two ONNX
exports; the verdict rule itself is checked on made-up rows."""
import contextlib
import io
import json

import pytest

from sed_fast.bench import common, e2e

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

EXPORT_IMPLS = ("export-pt2", "export-fast-pt2", "export-onnx", "export-fast-onnx")


def _absent(name):
    import importlib.util
    return importlib.util.find_spec(name) is None


def test_bench_runs_and_checks_the_reference_and_fast_exports(tmp_path):
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _absent(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e \".[export]\")")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = e2e.main(["--smoke", "--clip-resolution", "64", "--image-size", "640", "--vocabs", "random3",
                         "--cer-topk", "", "--kept-classes", "", "--no-stages", "--results-dir", str(tmp_path),
                         "--impls", ",".join(("reference",) + EXPORT_IMPLS)])
    output = buffer.getvalue()
    assert code == 0, output
    rows = [json.loads(line) for line in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    by_impl = {row["impl"]: row for row in rows}
    assert sorted(by_impl) == sorted(("reference",) + EXPORT_IMPLS)
    for impl in EXPORT_IMPLS:
        row = by_impl[impl]
        assert row["error"] is None and row["valid"] is True, row
        assert 0 <= row["max_abs_diff_vs_reference"] <= common.E2E_TOLERANCE["float32"]
        assert row["median_ms"] > 0 and row["compile_ms"] > 0 and row["T"] == 3 and row["setting"] == "exact"
    for fmt in ("pt2", "onnx"):  # the later row of each pair carries the comparison
        comparison = by_impl[f"export-fast-{fmt}"]["export_comparison"]
        assert comparison["format"] == fmt and comparison["recommended"] in ("fast", "reference")
        assert comparison["reference_median_ms"] == by_impl[f"export-{fmt}"]["median_ms"]
        assert comparison["fast_median_ms"] == by_impl[f"export-fast-{fmt}"]["median_ms"]
        assert comparison["verdict"] in output and "export_comparison" not in by_impl[f"export-{fmt}"]
    assert "exports, fast decoder vs reference decoder:" in output


def _row(impl, median_ms, vocab="ade150"):
    return {"impl": impl, "median_ms": median_ms, "variant": "b", "batch": 1, "vocab": vocab, "setting": "exact"}


@pytest.mark.parametrize("reference_ms, fast_ms, recommended, words", [
    (100.0, 80.0, "fast", "recommended: the fast export"),
    (100.0, 120.0, "reference", "the fast one does not win here"),
    (100.0, None, "reference", "no valid time for the fast export"),
    (None, 90.0, "fast", "the fast export (the only one checked)"),
    (None, None, None, "recommended: neither"),
])
def test_the_fast_export_is_recommended_only_where_it_wins(reference_ms, fast_ms, recommended, words):
    earlier = [_row("export-onnx", reference_ms), _row("export-pt2", 1.0), _row("export-onnx", 1.0, vocab="voc20")]
    comparison = e2e.export_comparison(_row("export-fast-onnx", fast_ms), earlier)
    assert comparison["recommended"] == recommended and words in comparison["verdict"]
    assert comparison["reference_median_ms"] == reference_ms and comparison["fast_median_ms"] == fast_ms
    # in either order; no pair yet, or a row that is not an export of the two: no comparison
    assert e2e.export_comparison(_row("export-onnx", reference_ms), [_row("export-fast-onnx", fast_ms)])[
        "recommended"] == recommended
    assert e2e.export_comparison(_row("export-fast-pt2", 1.0), [_row("export-onnx", 1.0)]) is None
    assert e2e.export_comparison(_row("fast", 1.0), earlier) is None
