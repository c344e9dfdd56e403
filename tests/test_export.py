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
    (["--format", "pt2", "--out", "m.pt2", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["--format", "pt2", "--out", "m.pt2", "--max-side", "100"], "--max-side must be in [256, 2560]"),
    (["--format", "pt2", "--out", "m.pt2", "--max-memory-gb", "0"], "--max-memory-gb must be positive"),
    (["--format", "onnx", "--out", "m.pt2"], "must end in .onnx"),
    (["--format", "pt2", "--out", "m.pt2", "--resolution", "50"], "multiple of 32"),
    (["--format", "pt2", "--out", "no/such/folder/m.pt2"], "does not exist"),
    (["--format", "pt2", "--out", "m.pt2", "--official-resize", "included"], "included needs --sizes"),
    (["--format", "pt2", "--out", "m.pt2", "--sizes", "640x640", "--max-side", "1024"], "give one or the other"),
    (["--format", "pt2", "--out", "m.pt2", "--sizes", "640"], "'640' is not HxW"),
    (["--format", "pt2", "--out", "m.pt2", "--sizes", "640x640,axb"], "'axb' is not HxW"),
    (["--format", "pt2", "--out", "m.pt2", "--sizes", "16x640"], "must be in [32, 2560]"),
    (["--format", "pt2", "--out", "m.pt2", "--sizes", "3000x640"], "must be in [32, 2560]"),
    (["--format", "pt2", "--out", "m.pt2", "--sizes", "0x5", "--official-resize", "included"],
     "a raw image side must be in [1, 32768]"),
    (["--format", "pt2", "--out", "m.pt2", "--sizes", "10x10000", "--official-resize", "included"],
     "is 3x2560 after the official resize, smaller than 32"),
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


def test_a_cuda_export_needs_pt2_and_a_cuda_device(capsys, tmp_path):
    import torch

    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", "--format", "onnx", "--device", "cuda",
                     "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "exported from the CPU" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", "--format", "pt2", "--device", "cuda",
                     "--out", str(tmp_path / "m.pt2")])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_export_pt2_on_cuda_with_the_official_resize_included(tmp_path, capsys):
    """A CUDA package (the reference path; Inductor writes its own Triton kernels), raw image in,
    loaded with torch alone and checked against the eager CUDA reference's official pipeline."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "raw_cuda.pt2"
    code, captured = _run(capsys, "--format", "pt2", "--device", "cuda", "--official-resize", "included",
                          "--sizes", "150x97", "--out", str(out))
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and result["device"] == "cuda" and result["fresh_process_labels_equal"] is True
    assert all(c["max_score_diff"] <= 1e-5 and c["labels_differ_not_ties"] == 0 for c in result["checks"])


def test_fixed_sizes_too_large_for_the_memory_bound_are_refused(capsys, tmp_path):
    code = cli.main(["export", "--vocab", "ade847", "--random-weights", "--format", "pt2",
                     "--sizes", "640x640,2560x2560", "--out", str(tmp_path / "m.pt2")])
    assert code == 2
    err = capsys.readouterr().err
    assert "at 2560x2560" in err and "22.2 GB" in err and "give smaller --sizes" in err


def test_export_pt2_with_the_official_resize_included(tmp_path, capsys):
    """The whole official test-time pipeline in one package, loaded with torch alone: a raw uint8
    (H, W, 3) image in, labels and scores at the raw size out, as ``preprocess="official"``."""
    out = tmp_path / "raw.pt2"
    code, captured = _run(capsys, "--format", "pt2", "--official-resize", "included", "--sizes", "150x97",
                          "--out", str(out))
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and out.is_file() and result["official_resize"] == "included"
    assert result["input"].startswith("image uint8 (150, 97, 3)") and "990x640" in result["input"]
    (row,) = result["checks"]
    assert row["size"] == [150, 97] and row["max_score_diff"] <= 1e-5 and row["labels_differ_not_ties"] == 0
    assert result["fresh_process_labels_equal"] is True


def test_export_onnx_one_file_per_fixed_size(tmp_path, capsys):
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _absent(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e \".[export]\")")
    out = tmp_path / "raw.onnx"
    code, captured = _run(capsys, "--format", "onnx", "--official-resize", "included", "--sizes", "150x97,700x1000",
                          "--out", str(out))
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and "path" not in result and len(result["exports"]) == 2
    for record, (height, width) in zip(result["exports"], [(150, 97), (700, 1000)]):
        assert record["path"] == str(tmp_path / f"raw_{height}x{width}.onnx") and record["ok"]
        assert (tmp_path / f"raw_{height}x{width}.onnx").is_file()
        (row,) = record["checks"]
        assert row["size"] == [height, width] and row["max_score_diff"] <= 1e-5 and row["labels_differ_not_ties"] == 0
    assert not out.exists()


def test_export_onnx_without_the_extra_names_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert 'pip install -e ".[export]"' in capsys.readouterr().err


# -- the exported graph itself (torch.export, no AOTInductor compile: seconds, not minutes) ---------


def _labels_agree(labels, scores, expected) -> bool:
    """Labels equal the eager argmax except where the eager top two scores are closer than twice
    the scores' max difference (rounding decides those: the rule of ``core.check``)."""
    differ = labels != expected.argmax(0)
    top2 = expected.topk(2, dim=0).values
    tie = (top2[0] - top2[1]) <= 2 * (scores - expected).abs().max()
    return not bool((differ & ~tie).any())


def _tiny_model(dtype, cer_topk=None):
    import torch

    from sed_fast.export.model import build_model

    torch.manual_seed(0)
    model = build_model("b", torch.randn(EIGHT_CLASSES, 80, 640), None, 64, dtype)
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
        assert _labels_agree(labels, scores, expected)
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


# -- fixed sizes and the official resize inside the model ------------------------------------------


@pytest.mark.parametrize("raw_size", [(150, 97), (700, 1000), (640, 640), (481, 2000), (33, 2000)])
def test_the_included_resize_is_pillows(raw_size):
    """The module's baked-in resize equals Pillow's own ``Image.resize(BILINEAR)`` (what detectron2
    runs): upscaling, antialiased shrinking, no-op, a long side clamped to 2560."""
    import numpy as np
    import torch
    from PIL import Image

    from sed_fast.export import core
    from sed_fast.inputs.preprocess import official_resize_shape

    module = core.ExportableSED(_tiny_model(torch.float32), input_size=raw_size, resize_included=True)
    raw = torch.randint(0, 256, (*raw_size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    new_h, new_w = module.resized_size
    assert (new_h, new_w) == official_resize_shape(*raw_size)
    expected = np.array(Image.fromarray(raw.numpy()).resize((new_w, new_h), Image.BILINEAR))
    resized = module.official_resize(raw.permute(2, 0, 1))
    assert torch.equal(resized.permute(1, 2, 0), torch.from_numpy(expected))


def test_the_included_resize_follows_pillow_13s_pass_order(monkeypatch):
    """With a Pillow that orders the passes by the sizes (13+), a height shrinking more than twice
    as much as the width runs the vertical pass first, and the baked-in resize does too."""
    import importlib

    import torch

    from sed_fast.export import core

    resize = importlib.import_module("sed_fast.kernels.pil_bilinear_resize")  # the module, not the function
    monkeypatch.setattr(resize, "INSTALLED_PILLOW_ORDERS_PASSES", True)
    module = core.ExportableSED(_tiny_model(torch.float32), input_size=(2000, 700), resize_included=True)
    assert module.resized_size == (1829, 640) and module.resize_passes == ["v", "h"]
    raw = torch.randint(0, 256, (3, 2000, 700), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    expected = resize.pil_bilinear_resize_reference(raw, 1829, 640, horizontal_first=False)
    assert torch.equal(module.official_resize(raw), expected)
    assert not torch.equal(expected, resize.pil_bilinear_resize_reference(raw, 1829, 640, horizontal_first=True))


def test_exported_graph_with_the_resize_included_equals_the_official_pipeline():
    """torch.export of the raw-image module: its scores equal the eager reference's with
    ``preprocess="official"`` (Pillow's own resize, scores back at the raw size)."""
    import torch

    from sed_fast.export import core

    model = _tiny_model(torch.float32)
    module = core.ExportableSED(model, return_scores=True, input_size=(131, 277), resize_included=True).eval()
    program = core.export_program(module).module()
    raw = module.sample_input((131, 277))
    assert raw.dtype == torch.uint8 and raw.shape == (131, 277, 3)
    model.preprocess = "official"
    with torch.no_grad():
        labels, scores = program(raw)
        expected = model(raw.permute(2, 0, 1)[None])[0]
    assert scores.shape == expected.shape == (EIGHT_CLASSES, 131, 277)
    assert (scores - expected).abs().max() <= 1e-5
    assert _labels_agree(labels, scores, expected)


def test_a_fixed_size_export_accepts_that_size_only():
    import torch

    from sed_fast.export import core

    model = _tiny_model(torch.float32)
    module = core.ExportableSED(model, return_scores=True, input_size=(96, 128)).eval()
    assert module.dynamic_shapes() is None
    program = core.export_program(module).module()
    (image,) = core.sample_images([(96, 128)])
    with torch.no_grad():
        labels, scores = program(image)
        expected = model(image)[0]
    assert (scores - expected).abs().max() <= 1e-5 and _labels_agree(labels, scores, expected)
    with pytest.raises(Exception):
        program(core.sample_images([(96, 160)])[0])
