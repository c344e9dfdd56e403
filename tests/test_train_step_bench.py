"""The training-step benchmark (sed-fast bench-train): a tiny CPU run and its usage errors."""
import json

import pytest

from sed_fast.bench import train_step


def test_tiny_cpu_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert train_step.main(["--device", "cpu", "--resolution", "64", "--classes", "3", "--iters", "1",
                            "--warmup", "0", "--impls", "reference,fast", "--checkpointing", "off,on",
                            "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["impl"], r["checkpointing"]) for r in rows] == [
        ("reference", False), ("reference", True), ("fast", False), ("fast", True)]
    for row in rows:
        assert row["kind"] == "train_step" and row["seconds_per_image"] > 0 and row["peak_bytes"] > 0
    # The same weights and batch: every mode computes the same training loss.
    assert max(r["loss"] for r in rows) - min(r["loss"] for r in rows) <= 1e-4 * rows[0]["loss"]
    assert "| reference | off |" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--impls", "quick"], ["--checkpointing", "maybe"], ["--resolution", "50"],
                                  ["--classes", "300"], ["--iters", "0"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as error:
        train_step.main(["--device", "cpu"] + argv)
    assert error.value.code == 2
