"""``sed-fast export`` at tiny settings (64 px encoder input, 3 classes, random weights): the
exported model's labels equal the eager model's on the sample images, scores within 1e-5; the pt2
package loads and runs in a new process that never imports sed_fast. One AOTInductor compile."""
import json
import sys

import pytest

from sed_fast import cli

TINY = ["--vocab", "cat,dog,grass", "--random-weights", "--resolution", "64", "--scores", "--json"]


def _run(capsys, *options):
    code = cli.main(["export", *TINY, *options])
    captured = capsys.readouterr()
    return code, captured


def test_export_pt2_checked_and_loaded_with_torch_alone(tmp_path, capsys):
    out = tmp_path / "sed.pt2"
    code, captured = _run(capsys, "--format", "pt2", "--out", str(out))
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and out.is_file() and result["classes"] == 3
    assert len(result["checks"]) == 2 and all(c["labels_differ_not_ties"] == 0 and c["max_score_diff"] <= 1e-5
                                              for c in result["checks"])
    assert result["fresh_process_labels_equal"] is True


def test_export_onnx_checked_with_onnxruntime(tmp_path, capsys):
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _absent(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e \".[export]\")")
    out = tmp_path / "sed.onnx"
    code, captured = _run(capsys, "--format", "onnx", "--out", str(out))
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and out.is_file()
    assert all(c["labels_differ_not_ties"] == 0 and c["max_score_diff"] <= 1e-5 for c in result["checks"])


def _absent(name):
    import importlib.util
    return importlib.util.find_spec(name) is None


@pytest.mark.parametrize("options, message", [
    (["--format", "pt2", "--out", "m.pt2", "--cer-topk", "8"], "--cer-topk is not exportable yet"),
    (["--format", "pt2", "--out", "m.pt2", "--dtype", "bfloat16"], "only float32"),
    (["--format", "onnx", "--out", "m.pt2"], "must end in .onnx"),
    (["--format", "pt2", "--out", "m.pt2", "--resolution", "50"], "multiple of 32"),
    (["--format", "pt2", "--out", "no/such/folder/m.pt2"], "does not exist"),
])
def test_export_usage_errors(options, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", *options])
    assert code == 2
    assert message in capsys.readouterr().err


def test_export_onnx_without_the_extra_names_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert 'pip install -e ".[export]"' in capsys.readouterr().err
