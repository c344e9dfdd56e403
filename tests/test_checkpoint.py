"""State-dict layout, checkpoint loading and its errors."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import sed_fast
from sed_fast.data.checkpoint import (CheckpointError, check_state_dict, load_checkpoint, read_state_dict,
                                      save_checkpoint)

# The released checkpoints' keys and shapes: the package's copy (the checkpoint code reads it to name
# variants), pinned to the official fixture's sha256 so that a change to it fails here.
SHAPES_FILE = Path(sed_fast.__file__).parent / "data" / "official_state_dict_shapes.json"
SHAPES_SHA256 = "4e1dd1afdeace0b40473d0d16398e2ec98b978806072762d803373c35543bd01"
OFFICIAL_SHAPES = json.loads(SHAPES_FILE.read_text())

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


def test_the_shapes_file_is_the_official_fixture():
    assert hashlib.sha256(SHAPES_FILE.read_bytes()).hexdigest() == SHAPES_SHA256


@pytest.mark.parametrize("variant,official", [("b", "sed-b"), ("l", "sed-l")])
def test_state_dict_keys_and_shapes_equal_the_official_lists(variant, official):
    model = sed_fast.build_sed(variant, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = OFFICIAL_SHAPES[official]
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert len(ours) == {"sed-b": 608, "sed-l": 658}[official]


def _meta_state(official):
    return {k: torch.empty(s, device="meta") for k, s in OFFICIAL_SHAPES[official].items()}


def test_wrong_variant_is_named_in_the_error():
    model = sed_fast.build_sed("b", device="meta")
    with pytest.raises(CheckpointError, match=r"looks most like sed-l \(658 of 658"):
        check_state_dict(model, _meta_state("sed-l"))


def test_error_lists_missing_unexpected_and_misshaped_keys():
    model = sed_fast.build_sed("b", device="meta")
    state = _meta_state("sed-b")
    del state["sem_seg_head.predictor.transformer.head.bias"]
    state["sem_seg_head.predictor.transformer.extra.weight"] = torch.empty(3, device="meta")
    state["sem_seg_head.predictor.transformer.conv1.bias"] = torch.empty(7, device="meta")
    with pytest.raises(CheckpointError) as info:
        check_state_dict(model, state, "my.pth")
    message = str(info.value)
    assert "my.pth does not fit" in message
    assert "1 missing key(s): sem_seg_head.predictor.transformer.head.bias" in message
    assert "1 unexpected key(s): sem_seg_head.predictor.transformer.extra.weight" in message
    assert "conv1.bias: checkpoint (7,) vs model (128,)" in message
    assert "looks most like sed-b" in message


def test_not_a_sed_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    model = sed_fast.build_sed("b", device="meta")
    with pytest.raises(CheckpointError, match="does not look like a SED checkpoint"):
        load_checkpoint(model, path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        sed_fast.build_sed("b", device="meta", checkpoint=tmp_path / "nope.pth")


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        read_state_dict(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save({"model": {"a": torch.randn(1000)}}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        read_state_dict(tmp_path / "cut.pth")


class _NotATensor:
    pass


def test_untrusted_pickle_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "extra": _NotATensor()}, path)
    monkeypatch.delenv("SED_FAST_TRUST_CHECKPOINTS", raising=False)
    with pytest.raises(CheckpointError, match="SED_FAST_TRUST_CHECKPOINTS=1"):
        read_state_dict(path)
    monkeypatch.setenv("SED_FAST_TRUST_CHECKPOINTS", "1")
    assert set(read_state_dict(path)) == {"a"}


def test_non_tensor_entries_are_refused():
    model = sed_fast.build_sed("b", device="meta")
    with pytest.raises(CheckpointError, match="is a str, not a tensor"):
        load_checkpoint(model, {"model": {"x": "hello"}})


def test_detectron2_round_trip_gives_the_same_model(tmp_path):
    torch.manual_seed(0)
    source = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)
    path = tmp_path / "model_final.pth"
    save_checkpoint(source, path, extra={"iteration": 123})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "iteration"}
    torch.manual_seed(1)
    loaded = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64, checkpoint=path)
    assert loaded.random_weights is False and source.random_weights is True
    for (k1, v1), (k2, v2) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    # a bare state dict (no "model" wrapper) loads too, and gives the same outputs
    bare = tmp_path / "bare.pth"
    torch.save(raw["model"], bare)
    del raw
    loaded_bare = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64, checkpoint=bare)
    torch.manual_seed(2)
    dense = torch.randn(1, 640, 2, 2)
    stages = [torch.randn(1, c, s, s) for c, s in ((1024, 2), (512, 4), (256, 8), (128, 16))]
    text = torch.randn(3, 80, 640)
    with torch.no_grad():
        expected, _ = source.decoder(dense, text, stages)
        assert torch.equal(loaded.decoder(dense, text, stages)[0], expected)
        assert torch.equal(loaded_bare.decoder(dense, text, stages)[0], expected)


# -- fault handling ----------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["no", "false", "off", "False", "0", ""])
def test_trust_off_words_keep_the_safe_loader(tmp_path, monkeypatch, raw):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "extra": _NotATensor()}, path)
    monkeypatch.setenv("SED_FAST_TRUST_CHECKPOINTS", raw)
    with pytest.raises(CheckpointError, match="SED_FAST_TRUST_CHECKPOINTS"):
        read_state_dict(path)


def test_trust_typo_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "plain.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, path)
    monkeypatch.setenv("SED_FAST_TRUST_CHECKPOINTS", "maybe")
    with pytest.raises(ValueError, match="SED_FAST_TRUST_CHECKPOINTS"):
        read_state_dict(path)


def test_untrusted_pickle_error_names_the_classes(tmp_path, monkeypatch):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "extra": _NotATensor()}, path)
    monkeypatch.delenv("SED_FAST_TRUST_CHECKPOINTS", raising=False)
    with pytest.raises(CheckpointError, match="_NotATensor"):
        read_state_dict(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped"])
def test_damaged_file_does_not_suggest_trusting_it(tmp_path, monkeypatch, damage):
    monkeypatch.delenv("SED_FAST_TRUST_CHECKPOINTS", raising=False)
    path = tmp_path / "whole.pth"
    torch.save({"model": {"a": torch.randn(1000)}}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x80\x04not a checkpoint at all" * 10)
    else:  # bytes inside the pickle changed: the zip CRC no longer matches
        start = data.find(b"data.pkl") + 60
        data[start:start + 8] = b"\xff" * 8
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(bad)
    message = str(info.value)
    assert "could not read checkpoint" in message and "truncated or corrupt" in message
    assert "SED_FAST_TRUST_CHECKPOINTS" not in message and "weights_only" not in message


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)


def _copy_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_non_finite_tensors_are_refused(small_model):
    state = _copy_state(small_model)
    keys = list(state)
    state[keys[3]].view(-1)[:2] = float("nan")
    state[keys[10]].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(small_model, state)
    message = str(info.value)
    assert "non-finite" in message and "2 tensor(s)" in message
    assert f"{keys[3]} (2 of" in message and "2 NaN" in message and keys[10] in message and "1 inf" in message


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_tensors_are_refused(small_model, dtype):
    state = _copy_state(small_model)
    key = list(state)[5]
    state[key] = torch.zeros(state[key].shape, dtype=dtype)
    with pytest.raises(CheckpointError, match="not floating point") as info:
        load_checkpoint(small_model, state)
    assert key in str(info.value) and str(dtype).replace("torch.", "") in str(info.value)


def test_other_float_dtype_is_loaded_with_a_warning(small_model):
    from sed_fast.data.checkpoint import CheckpointDtypeWarning

    original = _copy_state(small_model)
    state = {k: v.to(torch.bfloat16) for k, v in original.items()}
    try:
        with pytest.warns(CheckpointDtypeWarning, match="608 tensor.s. bfloat16 in the file vs float32 in the model"):
            load_checkpoint(small_model, state)
        key = "sem_seg_head.predictor.transformer.head.weight"
        assert small_model.state_dict()[key].dtype == torch.float32
        assert torch.equal(small_model.state_dict()[key], state[key].float())
    finally:
        small_model.load_state_dict(original)


def test_variant_mismatch_says_which_variant_to_use():
    model = sed_fast.build_sed("b", device="meta")
    with pytest.raises(CheckpointError) as info:
        check_state_dict(model, _meta_state("sed-l"))
    assert str(info.value).rstrip().endswith("use --variant l (build_sed('l', ...)).")
    model_l = sed_fast.build_sed("l", device="meta")
    with pytest.raises(CheckpointError) as info:
        check_state_dict(model_l, _meta_state("sed-b"))
    assert "use --variant b (build_sed('b', ...))" in str(info.value)


def test_loading_recomputes_the_text_embeddings(small_model):
    from sed_fast.models.encoder import create_tokenizer
    from sed_fast.data.text import encode_vocabulary

    original = _copy_state(small_model)
    try:
        small_model.set_vocabulary(["cat", "dog"], progress=False)
        before = small_model.text_embeddings.clone()
        state = _copy_state(small_model)
        key = "sem_seg_head.predictor.clip_model.token_embedding.weight"
        torch.manual_seed(3)
        state[key] = state[key] + 0.5 * torch.randn_like(state[key])
        load_checkpoint(small_model, state)
        assert small_model.class_names == ["cat", "dog"]
        assert not torch.allclose(small_model.text_embeddings, before)
        expected = encode_vocabulary(small_model.clip_model, create_tokenizer(small_model.spec), ["cat", "dog"],
                                     cache=False, progress=False)
        assert torch.equal(small_model.text_embeddings, expected)
    finally:
        small_model.load_state_dict(original)
        small_model.class_names, small_model.text_embeddings = [], None
