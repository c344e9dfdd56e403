"""The text side as its own export (random weights, a few names, on CPU): the exported program fed
the token ids of ``tokens_for`` / the standalone loader's ``text_tokens`` gives the package's text
embeddings to float32 rounding (<= 1e-5 relative, per vector), synonyms averaged as the official
code does; ``sed-fast embed-vocab`` writes exactly those embeddings, (T, P, C) float32 .npy.
ade150 in full is left to ``sed-fast export --part text --vocab ade150`` (its own check), too slow
for a unit test on 2 shared cores; the AOTInductor / ONNX compile of the same program is run by
the command (checked by hand at 1.3e-6 relative for ONNX)."""
import numpy
import pytest
import torch

from sed_fast import cli
from sed_fast.export import runtime
from sed_fast.export.text import TEXT_TOLERANCE, build_text_module, tokens_for

NAMES = ["cat", "building, edifice", "grass"]


@pytest.fixture(scope="module")
def text_module():
    return build_text_module("b", None)


def _relative(out, expected):
    return float(((out - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


def test_the_exported_text_program_gives_the_packages_embeddings(text_module):
    module, model = text_module
    model.set_vocabulary(NAMES, progress=False)
    expected = model.text_embeddings.float()
    tokens, synonyms = tokens_for(NAMES, module.tokenizer(), module.templates)
    assert tokens.shape[:3] == (3, 2, 80) and synonyms.tolist() == [1, 2, 1]
    program = torch.export.export(module, module.example_inputs(), dynamic_shapes=module.dynamic_shapes())
    with torch.no_grad():
        out = program.module()(tokens, synonyms)
    assert out.shape == expected.shape and _relative(out, expected) <= TEXT_TOLERANCE


def test_the_loaders_tokens_are_the_packages(text_module):
    """sed_exported.text_tokens (open_clip and numpy only) makes the same inputs as tokens_for."""
    module, _ = text_module

    class Contract:
        contract = module.contract()

    tokens, synonyms = runtime.text_tokens(NAMES, Contract)
    expected_tokens, expected_synonyms = tokens_for(NAMES, module.tokenizer(), module.templates)
    assert tokens.dtype == numpy.int64 and numpy.array_equal(tokens, expected_tokens.numpy())
    assert numpy.array_equal(synonyms, expected_synonyms.numpy())


def test_embed_vocab_writes_the_image_models_layout(tmp_path, capsys, text_module):
    _, model = text_module
    out = tmp_path / "vocab.npy"
    assert cli.main(["embed-vocab", "--vocab", ",".join(NAMES[:1] + NAMES[2:]), "--random-weights",
                     "--out", str(out)]) == 0
    written = numpy.load(out)
    model.set_vocabulary(["cat", "grass"], progress=False)
    assert written.dtype == numpy.float32 and written.flags["C_CONTIGUOUS"]
    assert numpy.array_equal(written, model.text_embeddings.float().numpy())
    assert (tmp_path / "vocab.npy.txt").read_text() == "cat\ngrass\n"
    before = out.read_bytes()
    assert cli.main(["embed-vocab", "--vocab", "cat", "--random-weights", "--out", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err and out.read_bytes() == before
