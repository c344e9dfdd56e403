"""``sed-fast export --vocab-input`` at tiny settings (64 px encoder input, random weights): one pt2
and one ONNX export per module, made with a relative ``--out`` from the test's folder; then, in a
new process that never imports sed_fast (torch alone / ONNX Runtime alone, through the loader the
export writes beside the model), the same file segments one image with two vocabularies of
different sizes and gives the API's labels; and it refuses a wrong shape or dtype with a clear
error, while a non-contiguous or channels-last input gives the contiguous input's labels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sed_fast import cli
from sed_fast.export import core
from sed_fast.export.model import build_model

RESOLUTION = 64
VOCAB_A = ["cat", "dog", "grass"]
VOCAB_B = ["sky", "tree", "water", "mountain", "road", "person", "car", "building, edifice"]
SIZE = (96, 128)


def _absent(name):
    import importlib.util
    return importlib.util.find_spec(name) is None


def _export(folder: Path, fmt: str) -> dict:
    """Export with a relative --out from ``folder`` (the command's working directory)."""
    kept = os.getcwd()
    (folder / "models").mkdir(parents=True)
    os.chdir(folder)
    try:
        code = cli.main(["export", "--vocab", ",".join(VOCAB_A), "--random-weights", "--resolution",
                         str(RESOLUTION), "--scores", "--json", "--vocab-input", "--format", fmt,
                         "--out", f"models/sed.{fmt}"])
    finally:
        os.chdir(kept)
    assert code == 0
    return folder / "models" / f"sed.{fmt}"


@pytest.fixture(scope="module")
def api():
    """The package's model (the API's forward, the export's settings) and the two vocabularies'
    text embeddings as set_vocabulary makes them."""
    model = build_model("b", VOCAB_A, None, RESOLUTION, torch.float32)
    texts = {}
    for names in (VOCAB_A, VOCAB_B):
        model.set_vocabulary(names, progress=False)
        texts[len(names)] = model.text_embeddings.float().clone()
    return model, texts


@pytest.fixture(scope="module")
def pt2_export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("pt2"), "pt2")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _absent(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e \".[export]\")")
    return _export(tmp_path_factory.mktemp("onnx"), "onnx")


# Runs in a new Python without sed_fast on its path: the loader beside the model, the inputs saved
# by the test; prints one JSON line of results.
_FRESH = r'''
import json, sys
import numpy, torch
sys.path.insert(0, sys.argv[1])
import sed_exported
model = sed_exported.load(sys.argv[2])
inputs = torch.load(sys.argv[3])
image = inputs["image"]
as_input = (lambda t: t) if sys.argv[2].endswith(".pt2") else (lambda t: t.numpy())
out = {"sed_fast_imported": False, "labels": {}, "scores": {}, "errors": {}}
for key, text in inputs["texts"].items():
    labels, scores = model(as_input(image), as_input(text))
    out["labels"][key] = torch.as_tensor(labels).tolist()
    out["scores"][key] = torch.as_tensor(scores).tolist()
text = inputs["texts"][min(inputs["texts"])]
reference = torch.as_tensor(model(as_input(image), as_input(text))[0])
wide = torch.zeros(1, 3, image.shape[2], image.shape[3] * 2)
wide[..., ::2] = image  # a view every other column: not contiguous
strided = wide[..., ::2]
assert not strided.is_contiguous()
channels_last = image.contiguous(memory_format=torch.channels_last)
out["strided_equal"] = bool(torch.equal(torch.as_tensor(model(as_input(strided), as_input(text))[0]), reference))
out["channels_last_equal"] = bool(torch.equal(torch.as_tensor(model(as_input(channels_last), as_input(text))[0]),
                                              reference))
bad = {"image_4_channels": (torch.zeros(1, 4, 96, 128), text), "image_3_dims": (image[0], text),
       "image_float64": (image.double(), text), "image_above_255": (image + 300, text),
       "text_wrong_width": (image, text[..., :-1]), "text_float64": (image, text.double()),
       "text_too_many": (image, text[:1].expand(1001, *text.shape[1:])), "text_2_dims": (image, text[:, 0]),
       "one_input": (image,)}
for name, args in bad.items():
    try:
        model(*[as_input(a) for a in args])
        out["errors"][name] = None
    except ValueError as error:
        out["errors"][name] = str(error)
out["sed_fast_imported"] = any(m.split(".")[0] == "sed_fast" for m in sys.modules)
print(json.dumps(out))
'''


def _run_fresh(path: Path, tmp_path: Path, image, texts) -> dict:
    inputs = tmp_path / "inputs.pt"
    torch.save({"image": image, "texts": texts}, inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _FRESH, str(path.parent), str(path), str(inputs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _labels_match(labels, scores, expected):
    """At least 99.9% of pixels equal, and those that differ are ties as core.check treats them
    (the eager top two closer than twice the exported scores' max difference)."""
    differ = labels != expected.argmax(0)
    bound = float((scores - expected).abs().max())
    top2 = expected.topk(2, dim=0).values
    tie = (top2[0] - top2[1]) <= 2 * bound
    return bound <= 1e-5 and float(differ.float().mean()) <= 1e-3 and not bool((differ & ~tie).any())


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_one_export_segments_with_two_vocabularies_and_checks_its_input(fmt, api, request, tmp_path):
    path = request.getfixturevalue(f"{fmt}_export")
    assert (path.parent / core.LOADER_NAME).is_file()
    model, texts = api
    image = core.sample_images([SIZE])[0]
    result = _run_fresh(path, tmp_path, image, texts)
    assert result["sed_fast_imported"] is False
    for classes, text in texts.items():
        model.text_embeddings = text
        with torch.no_grad():
            expected = model(image)[0]
        labels = torch.tensor(result["labels"][str(classes)])
        scores = torch.tensor(result["scores"][str(classes)])
        assert scores.shape == (classes, *SIZE)
        assert _labels_match(labels, scores, expected), f"{classes} classes"
    assert result["strided_equal"] and result["channels_last_equal"]
    errors = result["errors"]
    assert all(errors.values()), errors
    assert "size 4 at dimension 1 is outside [3, 3]" in errors["image_4_channels"]
    assert "got 3 dimensions" in errors["image_3_dims"]
    assert "got float64" in errors["image_float64"] and "got float64" in errors["text_float64"]
    assert "values must lie in [0, 255]" in errors["image_above_255"]
    assert "outside [1, 1000]" in errors["text_too_many"] and "sed-fast embed-vocab" in errors["text_too_many"]
    assert "at dimension 2 is outside" in errors["text_wrong_width"]
    assert "takes 2 input(s) (image, text_embeddings), got 1" in errors["one_input"]


def test_the_loader_needs_nothing_of_sed_fast():
    source = core.loader_source()
    assert "sed_fast." not in source.replace("sed_fast_contract", "") and "from ." not in source


def test_a_foreign_loader_file_is_never_overwritten(tmp_path, capsys):
    foreign = tmp_path / core.LOADER_NAME
    foreign.write_text("my own code\n")
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", "--vocab-input", "--format", "pt2",
                     "--out", str(tmp_path / "m.pt2")])
    assert code == 2 and "was not written by sed-fast export" in capsys.readouterr().err
    assert foreign.read_text() == "my own code\n" and not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("options, message", [
    (["--max-classes", "10"], "give --vocab-input too"),
    (["--vocab-input", "--max-classes", "1"], "--max-classes must be in [2, 65536]"),
    (["--vocab-input", "--cer-topk", "2"], "cannot be combined with --vocab-input"),
])
def test_vocab_input_usage_errors(options, message, capsys, tmp_path):
    code = cli.main(["export", "--vocab", "cat,dog", "--random-weights", "--format", "pt2",
                     "--out", str(tmp_path / "m.pt2"), *options])
    assert code == 2 and message in capsys.readouterr().err
