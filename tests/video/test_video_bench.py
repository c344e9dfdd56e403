"""benchmarks/video_throughput.py on the CPU at tiny sizes: one valid row, both throughputs."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "video_throughput.py"


def test_video_throughput_row(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("video_throughput", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    code = bench.main(["--device", "cpu", "--frames", "5", "--width", "96", "--height", "64", "--batch-size", "2",
                       "--classes", "4", "--resolution", "64", "--out", str(out)])
    assert code == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["kind"] == "video" and row["valid"] is True and row["frames"] == row["frames_written"] == 5
    assert row["model_only_fps"] > 0 and row["pipeline_fps"] > 0
    assert row["pipeline_vs_model"] == pytest.approx(row["pipeline_fps"] / row["model_only_fps"], rel=1e-2)
    assert set(row["pipeline_seconds_per_frame"]) == {"decode", "model", "overlay", "encode"}
    assert "decode+model+encode" in capsys.readouterr().err
