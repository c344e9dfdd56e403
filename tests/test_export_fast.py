"""``sed-fast export --impl fast`` at tiny settings (64 px encoder input, 3 classes, random weights,
CPU): the fast decoder's plain-PyTorch formulation (``sed_fast.export.fast``) equals the reference
decoder to float32 rounding and traces into a graph without any ``sed_fast::`` op; exported as a pt2
package and as an ONNX model, with the vocabulary baked in and as an input, each passes the export's
own check against the eager fast model (labels equal except on ties, scores within 1e-5) and says
which formulation each piece ran. Two AOTInductor compiles and two ONNX exports."""
import json

import pytest
import torch

from sed_fast import cli
from sed_fast.export import core, fast
from sed_fast.export.model import build_model
from sed_fast.models.encoder import preprocess_images

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

TINY = ["--vocab", "cat,dog,grass", "--random-weights", "--resolution", "64", "--scores", "--json", "--impl", "fast"]


def _absent(name):
    import importlib.util
    return importlib.util.find_spec(name) is None


@pytest.fixture(scope="module")
def reference():
    return build_model("b", ["cat", "dog", "grass", "sky"], None, 64, torch.float32)


def test_the_fast_formulation_equals_the_reference_decoder(reference):
    image = core.sample_images([(96, 128)])[0]
    with torch.no_grad():
        dense, features = reference.encode_image(preprocess_images(image, 64))
        text = reference.text_embeddings
        expected = reference.decode(dense, text, features)
        res2, res3, res4, res5 = features
        got = fast.ExportableFastDecoder(reference.decoder)(dense, text, (res5, res4, res3, res2))
    assert got.shape == expected.shape == (1, 4, 16, 16)
    assert float((got - expected).abs().max()) <= 1e-5


def test_the_fast_export_traces_without_sed_fast_ops(reference):
    module = core.ExportableSED(reference, return_scores=True, vocab_input=True, impl="fast").eval()
    program = core.export_program(module)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets and not [target for target in targets if "sed_fast" in target]
    assert set(module.formulations) >= {"cost_map", "dwconv_layernorm", "class_attention", "double_conv"}
    assert module.formulations["dwconv_layernorm"].startswith("reference")
    assert module.formulations["class_attention"].startswith("fast")


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("vocab_input", [False, True], ids=["baked", "vocab-input"])
def test_export_fast_checked(fmt, vocab_input, tmp_path, capsys):
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _absent(name)]
        if missing:
            pytest.skip(f"{', '.join(missing)} not installed (pip install -e \".[export]\")")
    out = tmp_path / f"sed_fast.{fmt}"
    options = ["--format", fmt, "--out", str(out)] + (["--vocab-input"] if vocab_input else [])
    code = cli.main(["export", *TINY, *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["ok"] and out.is_file() and result["impl"] == "fast"
    assert result["formulations"] == fast.FORMULATIONS
    assert len(result["checks"]) == (3 if vocab_input else 2)  # with the vocabulary an input: also one class
    for row in result["checks"]:
        assert row["labels_differ_not_ties"] == 0 and row["max_score_diff"] <= 1e-5, row
    if fmt == "pt2":
        assert result["fresh_process_labels_equal"] is True
    contract = (torch._inductor.aoti_load_package(str(out)).get_metadata() if fmt == "pt2" else None)
    if contract is not None:
        assert json.loads(contract[core.CONTRACT_KEY])["impl"] == "fast"


def test_the_fast_export_decodes_exactly(capsys, tmp_path):
    code = cli.main(["export", *TINY, "--cer-topk", "1", "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert code == 2 and "--impl fast exports the fast decoder's exact decoding" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()
