"""``sed-fast export`` at tiny settings (64 px encoder input, 3 or 8 classes, random weights): the
exported model's labels equal the eager model's on the sample images, scores within 1e-5; the pt2
package loads and runs in a new process that never imports sed_fast; category early rejection with
a static kept-class budget equals the eager model's; 16-bit exports agree at their precision. Two
AOTInductor compiles (exact, CER); the other checks run the exported graph itself."""
import json
import sys

import pytest

from sed_fast import cli

EIGHT_CLASSES = 8  # at --resolution 64 the first aux map is 2x2: a top-1 union keeps at most 4 of 8
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


def test_export_pt2_with_rejection(tmp_path, capsys):
    """CER through AOTInductor too: its compiled CPU code is not the exported graph's (a masked k in
    the class attention once made it corrupt memory at some image sizes)."""
    out = tmp_path / "cer.pt2"
    vocab = ",".join(f"class{i}" for i in range(EIGHT_CLASSES))
    code = cli.main(["export", "--vocab", vocab, "--random-weights", "--resolution", "64", "--scores", "--json",
                     "--cer-topk", "1", "--kept-budget", "4", "--no-fresh-process-check",
                     "--format", "pt2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and result["outputs"] == ["labels", "scores", "kept_counts"]
    for row in result["checks"]:
        assert row["max_score_diff"] <= 1e-5 and row["labels_differ_not_ties"] == 0
        assert row["kept_counts"][0] <= 4 and not row["budget_exceeded"]


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
    (["--format", "pt2", "--out", "m.pt2", "--cer-topk", "0"], "--cer-topk must be at least 1"),
    (["--format", "pt2", "--out", "m.pt2", "--kept-budget", "4"], "give --cer-topk too"),
    (["--format", "pt2", "--out", "m.pt2", "--cer-topk", "2", "--kept-budget", "0"], "must be at least 1"),
    (["--format", "onnx", "--out", "m.onnx", "--dtype", "bfloat16"], "exports float32 only"),
    (["--format", "pt2", "--out", "m.pt2", "--dtype", "int8"], "expected float32, bfloat16 or float16"),
    (["--format", "pt2", "--out", "m.pt2", "--max-side", "100"], "--max-side must be in [256, 2560]"),
    (["--format", "pt2", "--out", "m.pt2", "--max-memory-gb", "0"], "--max-memory-gb must be positive"),
    (["--format", "onnx", "--out", "m.pt2"], "must end in .onnx"),
    (["--format", "pt2", "--out", "m.pt2", "--resolution", "50"], "multiple of 32"),
    (["--format", "pt2", "--out", "no/such/folder/m.pt2"], "does not exist"),
])
def test_export_usage_errors(options, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", *options])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_vocabulary_too_large_for_the_size_bound_is_refused(capsys, tmp_path):
    """ADE-847 at 2560x2560 would hold 847 full-size float32 score planes (22 GB)."""
    code = cli.main(["export", "--vocab", "ade847", "--random-weights", "--format", "pt2",
                     "--out", str(tmp_path / "m.pt2")])
    assert code == 2
    err = capsys.readouterr().err
    assert "847 classes" in err and "22.2 GB" in err and "lower --max-side" in err
    assert not (tmp_path / "m.pt2").exists()


def test_export_onnx_without_the_extra_names_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert 'pip install -e ".[export]"' in capsys.readouterr().err


# -- the exported graph itself (torch.export, no AOTInductor compile: seconds, not minutes) ---------


def _tiny_model(dtype, cer_topk=None):
    import torch

    from sed_fast.export import core

    torch.manual_seed(0)
    model = core.build_model("b", torch.randn(EIGHT_CLASSES, 80, 640), None, 64, dtype)
    model.cer_topk = cer_topk
    return model


@pytest.mark.parametrize("budget", [4, EIGHT_CLASSES])
def test_exported_rejection_with_a_static_budget_equals_eager(budget):
    """CER exported with static shapes: the program's scores and labels equal the eager CER model's
    (which indexes its rows by data-dependent kept sets) whenever the budget covers the kept set."""
    import torch

    from sed_fast.export import core

    model = _tiny_model(torch.float32, cer_topk=1)
    module = core.ExportableSED(model, return_scores=True, cer_topk=1, kept_budget=budget).eval()
    assert module.output_names == ["labels", "scores", "kept_counts"]
    program = core.export_program(module).module()
    for image in core.sample_images([(96, 128), (131, 77)]):
        with torch.no_grad():
            labels, scores, kept = program(image)
            expected = model(image)[0]
        assert 1 <= int(kept[0]) <= 4 and int(kept[2]) <= int(kept[1]) <= int(kept[0])
        assert scores.shape == expected.shape
        assert (scores - expected).abs().max() <= 1e-5
        rejected = expected.flatten(1).amax(1) == 0
        assert int(rejected.sum()) >= EIGHT_CLASSES - 4 and torch.all(scores[rejected] == 0)
        assert torch.equal(labels, expected.argmax(0))
    checks = core.check(program, model, module, [(96, 128)])
    assert checks[0]["ok"] and not checks[0]["budget_exceeded"]


def test_a_budget_smaller_than_the_kept_set_fails_the_check():
    import torch

    from sed_fast.export import core

    model = _tiny_model(torch.float32, cer_topk=2)
    module = core.ExportableSED(model, return_scores=True, cer_topk=2, kept_budget=1).eval()
    (row,) = core.check(module, model, module, [(96, 128)])
    assert row["kept_counts"][0] > 1 and row["budget_exceeded"] and not row["ok"]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_exported_16_bit_model_agrees_with_eager_at_that_precision(dtype_name):
    import torch

    from sed_fast.export import core

    dtype = core.DTYPES[dtype_name]
    model = _tiny_model(dtype)
    module = core.ExportableSED(model, return_scores=True).eval()
    program = core.export_program(module).module()
    (image,) = core.sample_images([(96, 128)])
    with torch.no_grad():
        labels, scores = program(image)
        expected = model(image)[0]
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert (scores - expected).abs().max() <= core.SCORE_TOLERANCES[dtype]
    assert core.check(program, model, module, [(96, 128)])[0]["ok"]


def test_export_onnx_with_rejection(tmp_path, capsys):
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _absent(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e \".[export]\")")
    out = tmp_path / "cer.onnx"
    vocab = ",".join(f"class{i}" for i in range(EIGHT_CLASSES))
    code = cli.main(["export", "--vocab", vocab, "--random-weights", "--resolution", "64", "--scores", "--json",
                     "--cer-topk", "1", "--kept-budget", "4", "--format", "onnx", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and result["outputs"] == ["labels", "scores", "kept_counts"]
    assert result["cer_topk"] == 1 and result["kept_budget"] == 4
    for row in result["checks"]:
        assert row["max_score_diff"] <= 1e-5 and row["labels_differ_not_ties"] == 0
        assert row["kept_counts"][0] <= 4 and not row["budget_exceeded"]
