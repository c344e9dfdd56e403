"""Text embeddings: trimmed context == encode_text, official per-class loop, templates, on-disk cache."""
import os
import re
import time
import warnings

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from sed_fast.data import text as text_mod  # noqa: E402
from sed_fast.data.text import PROMPT_TEMPLATES, encode_tokens, encode_vocabulary, text_cache_key  # noqa: E402

NAMES = ["cat", "person, individual, someone", "bed ", "traffic light", "a rather long class name with words"]


def _tiny_clip(seed: int = 0) -> CLIP:
    """A small open_clip CLIP (text width 64, 2 layers, real 77-token context and BPE vocabulary)."""
    torch.manual_seed(seed)
    model = CLIP(embed_dim=32,
                 vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("convnext_base_w_320")


@pytest.fixture(scope="module")
def clip_model():
    return _tiny_clip(0)


def _official_class_embeddings(clip_model, tokenizer, names, templates):
    """The official SEDPredictor.class_embeddings loop, restated: one full-context forward per class."""
    out = []
    with torch.no_grad():
        for name in names:
            if ", " in name:
                texts = [t.format(s) for t in templates for s in name.split(", ")]
            else:
                texts = [t.format(name) for t in templates]
            emb = clip_model.encode_text(tokenizer(texts))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            if len(templates) != emb.shape[0]:
                emb = emb.reshape(len(templates), -1, emb.shape[-1]).mean(dim=1)
                emb = emb / emb.norm(dim=-1, keepdim=True)
            out.append(emb)
    return torch.stack(out, dim=1).permute(1, 0, 2).float()  # (T, P, D)


def test_prompt_templates_match_openai_list():
    assert len(PROMPT_TEMPLATES) == 80
    assert PROMPT_TEMPLATES[0] == "a bad photo of a {}."
    assert PROMPT_TEMPLATES[1] == "a photo of many {}."
    assert PROMPT_TEMPLATES[-1] == "a tattoo of the {}."
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    assert OPENAI_IMAGENET_TEMPLATES[0]("dog") == "a bad photo of a dog."
    assert OPENAI_IMAGENET_TEMPLATES[10]("dog") == "the embroidered dog."
    assert [t.format("x y") for t in PROMPT_TEMPLATES] == [t("x y") for t in OPENAI_IMAGENET_TEMPLATES]


def test_class_prompts_order():
    prompts, synonyms = text_mod.class_prompts("a, b", ["1 {}", "2 {}", "3 {}"])
    assert synonyms == 2
    assert prompts == ["1 a", "1 b", "2 a", "2 b", "3 a", "3 b"]  # template-major, as the official code
    assert text_mod.class_prompts("bed ", ["{}."]) == (["bed ."], 1)  # names are not stripped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trimmed_context_equals_encode_text(tokenizer, seed):
    model = _tiny_clip(seed)
    prompts = ["x", "a photo of a cat.", "a bad photo of a traffic light.",
               "a photo of the hard to see " + "very " * 12 + "long thing.", "a, b"]
    tokens = tokenizer(prompts)
    lengths = tokens.argmax(-1) + 1
    assert len(set(lengths.tolist())) == len(prompts) and lengths.max() < 40  # mixed lengths, really trimmed
    with torch.no_grad():
        ref = model.encode_text(tokens)
        got = encode_tokens(model, tokens)
        full = encode_tokens(model, tokens, trim_context=False)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(full, ref)
    # The trimmed softmax sums fewer (all zero) terms: float32 rounding only. Raw features reach |3| here:
    # bound the error relative to their scale; the normalised features (what SED uses) to 1e-6 absolute.
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= 1e-6 * scale
    ref_n, got_n = ref / ref.norm(dim=-1, keepdim=True), got / got.norm(dim=-1, keepdim=True)
    assert (got_n - ref_n).abs().max().item() <= 1e-6


@pytest.mark.parametrize("variant", ["custom_text", "last_pool", "bidirectional_eos"])
def test_other_text_towers(tokenizer, variant):
    """CustomTextCLIP (tower in model.text) is trimmed; towers where trimming is not exact fall back."""
    from open_clip.model import CustomTextCLIP

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    if variant == "custom_text":
        model = CustomTextCLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIPTextCfg(**text))
    elif variant == "last_pool":
        model = CLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIPTextCfg(**text, pool_type="last"))
    else:
        model = CLIP(embed_dim=32, vision_cfg=vision,
                     text_cfg=CLIPTextCfg(**text, no_causal_mask=True, pool_type="eos", eos_id=49407))
    model.eval()
    assert text_mod._TextTower(model).trimmable == (variant == "custom_text")
    tokens = tokenizer(["a cat", "a photo of a rather long thing.", "x"])
    with torch.no_grad():
        ref = model.encode_text(tokens)
        got = encode_tokens(model, tokens)
    assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())
    assert len(text_cache_key(model, tokenizer, ["cat"], PROMPT_TEMPLATES[:2])) == 64


def test_float16_tower_computes_in_float32(tokenizer):
    model = _tiny_clip(3)
    tokens = tokenizer(["a photo of a cat.", "x"])
    with torch.no_grad():
        ref = model.encode_text(tokens)
        half = _tiny_clip(3).half()
        got = encode_tokens(half, tokens)
    assert got.dtype == torch.float32
    assert next(half.parameters()).dtype == torch.float16  # the model itself is untouched
    assert (got - ref).abs().max().item() < 5e-2  # only the fp16 rounding of the weights


@pytest.mark.parametrize("batch_size", [7, 512])
def test_encode_vocabulary_matches_official_loop(clip_model, tokenizer, batch_size):
    templates = PROMPT_TEMPLATES[:12]
    ref = _official_class_embeddings(clip_model, tokenizer, NAMES, templates)
    got = encode_vocabulary(clip_model, tokenizer, NAMES, templates=templates, batch_size=batch_size,
                            cache=False, progress=False)
    assert got.shape == (len(NAMES), 12, 32) and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-6
    assert torch.allclose(got.norm(dim=-1), torch.ones(()), atol=1e-5)


def test_encode_vocabulary_all_80_templates(clip_model, tokenizer):
    names = ["cat", "person, individual, someone"]
    ref = _official_class_embeddings(clip_model, tokenizer, names, PROMPT_TEMPLATES)
    got = encode_vocabulary(clip_model, tokenizer, names, cache=False, progress=False)
    assert got.shape == (2, 80, 32)
    assert (got - ref).abs().max().item() <= 1e-6


class _Counter:
    """Wraps _TextTower.encode and encode_with_prefixes and counts their calls and the prompts
    (token rows) they encode."""

    def __init__(self, monkeypatch):
        self.calls = self.prompts = 0
        original = text_mod._TextTower.encode
        with_prefixes = text_mod._TextTower.encode_with_prefixes

        def counting(tower, tokens, trim_context=True):
            self.calls += 1
            self.prompts += tokens.shape[0]
            return original(tower, tokens, trim_context=trim_context)

        def counting_prefixed(tower, tokens, *args):
            self.calls += 1
            self.prompts += tokens.shape[0]
            return with_prefixes(tower, tokens, *args)

        monkeypatch.setattr(text_mod._TextTower, "encode", counting)
        monkeypatch.setattr(text_mod._TextTower, "encode_with_prefixes", counting_prefixed)


@pytest.mark.parametrize("batch_size", [5, 512])
def test_shared_prefixes_run_once_and_give_the_per_prompt_embeddings(clip_model, tokenizer, monkeypatch, batch_size):
    """Each template's shared first tokens run once; the embeddings equal running every prompt whole."""
    names = ["cat", "traffic light", "person, individual, someone", "a photo of a dog", "x"]
    templates = ("{}", "a photo of a {}.", "a bad photo of the {}.", "itap of a {}.", "{} in a photo.")
    tower = text_mod._TextTower(clip_model)
    assert tower.prefix_shareable()
    run = []
    original = text_mod._TextTower.encode_with_prefixes

    def recording(self, tokens, length, states, group):
        run.append((tokens.shape[0], int(self.pool_index(tokens).max()) + 1 - length))
        return original(self, tokens, length, states, group)

    monkeypatch.setattr(text_mod._TextTower, "encode_with_prefixes", recording)
    got = encode_vocabulary(clip_model, tokenizer, names, templates=templates, batch_size=batch_size, cache=False,
                            progress=False)
    assert run and all(rows <= batch_size for rows, _ in run)
    monkeypatch.setattr(text_mod._TextTower, "prefix_shareable", lambda self: False)
    whole = encode_vocabulary(clip_model, tokenizer, names, templates=templates, batch_size=batch_size, cache=False,
                              progress=False)
    assert (got - whole).abs().max().item() <= 1e-6
    ref = _official_class_embeddings(clip_model, tokenizer, names, templates)
    assert (got - ref).abs().max().item() <= 1e-6


def test_cache_hit_and_misses(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    counter = _Counter(monkeypatch)
    model = _tiny_clip(5)
    templates = PROMPT_TEMPLATES[:4]

    def run(names=NAMES[:3], templates=templates, model=model):
        return encode_vocabulary(model, tokenizer, names, templates=templates, cache_dir=tmp_path, progress=False)

    first = run()  # 4 + 3 * 4 + 4 distinct prompts, one entry per name
    assert counter.prompts == 20 and len(list(tmp_path.glob("*.pt"))) == 3
    assert not list(tmp_path.glob("*.tmp"))
    calls = counter.calls
    second = run()
    assert counter.calls == calls and torch.equal(first, second)  # hit

    counter.prompts = 0
    changed_name = run(names=["cat", "person, individual, someone", "bed"])  # one name changed: one encoded
    assert counter.prompts == len(templates) and len(list(tmp_path.glob("*.pt"))) == 4
    assert torch.equal(changed_name[:2], first[:2])
    fresh = encode_vocabulary(model, tokenizer, ["bed"], templates=templates, cache=False, progress=False)
    assert (changed_name[2:] - fresh).abs().max().item() <= 1e-6
    calls = counter.calls
    run(templates=templates[:3])  # template list changed: every name again
    assert counter.calls > calls and len(list(tmp_path.glob("*.pt"))) == 7
    calls = counter.calls
    with torch.no_grad():
        model.transformer.resblocks[1].mlp.c_fc.weight[3, 5] += 1e-3  # one weight value changed
    changed = run()
    assert counter.calls > calls and not torch.equal(changed, first)
    calls = counter.calls
    run()
    assert counter.calls == calls
    assert len(list(tmp_path.glob("*.pt"))) == 10


def test_changing_one_of_150_names_encodes_one_name(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    monkeypatch.delenv("SED_FAST_TEXT_CACHE_MB", raising=False)
    model = _tiny_clip(7)
    templates = PROMPT_TEMPLATES[:3]
    names = [f"thing {index}" for index in range(150)]
    names[40] = "tree, shrub"  # a class with synonyms among them
    args = dict(templates=templates, cache_dir=tmp_path, progress=False)
    counter = _Counter(monkeypatch)
    first = encode_vocabulary(model, tokenizer, names, **args)
    assert counter.prompts == 151 * len(templates)
    renamed = list(names)
    renamed[77] = "a grassy field"
    counter.prompts = 0
    again = encode_vocabulary(model, tokenizer, renamed, **args)
    assert counter.prompts == len(templates)  # only the new name's prompts
    keep = [index for index in range(150) if index != 77]
    assert torch.equal(again[keep], first[keep])
    fresh = encode_vocabulary(model, tokenizer, renamed, templates=templates, cache=False, progress=False)
    assert (again - fresh).abs().max().item() <= 1e-6
    counter.prompts = 0
    reordered = encode_vocabulary(model, tokenizer, renamed[::-1], **args)  # other order: all hits
    assert counter.prompts == 0 and torch.equal(reordered, again.flip(0))


def test_cached_names_still_refuse_duplicates_and_warn(clip_model, tokenizer, tmp_path, monkeypatch):
    """"cat" and "Cat" cached by two vocabularies are still duplicates together, without encoding."""
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    args = dict(templates=PROMPT_TEMPLATES[:2], cache_dir=tmp_path, progress=False)
    encode_vocabulary(clip_model, tokenizer, ["cat"], **args)
    encode_vocabulary(clip_model, tokenizer, ["Cat"], **args)
    counter = _Counter(monkeypatch)
    with pytest.raises(ValueError, match=r"'cat' \(index 0\) = 'Cat' \(index 1\)"):
        encode_vocabulary(clip_model, tokenizer, ["cat", "Cat"], **args)
    assert counter.calls == 0


def test_cache_key_sensitivity(tokenizer):
    model = _tiny_clip(6)
    key = text_cache_key(model, tokenizer, ["cat"], PROMPT_TEMPLATES)
    assert key == text_cache_key(_tiny_clip(6), tokenizer, ["cat"], PROMPT_TEMPLATES)
    assert key != text_cache_key(model, tokenizer, ["cat "], PROMPT_TEMPLATES)
    assert key != text_cache_key(model, tokenizer, ["cat"], PROMPT_TEMPLATES[::-1])
    with torch.no_grad():
        model.positional_embedding[0, 0] += 1e-6
    assert key != text_cache_key(model, tokenizer, ["cat"], PROMPT_TEMPLATES)
    other_tokenizer = open_clip.get_tokenizer("convnext_base_w_320", context_length=64)
    assert key != text_cache_key(_tiny_clip(6), other_tokenizer, ["cat"], PROMPT_TEMPLATES)
    assert text_cache_key(_tiny_clip(6).to(torch.bfloat16), tokenizer, ["cat"], PROMPT_TEMPLATES) != key


def test_corrupt_cache_is_recomputed(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    templates = PROMPT_TEMPLATES[:3]
    first = encode_vocabulary(clip_model, tokenizer, ["cat", "dog"], templates=templates, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    path = _entry_path(tmp_path, clip_model, tokenizer, "cat", templates)
    path.write_bytes(b"not a torch file")
    counter = _Counter(monkeypatch)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = encode_vocabulary(clip_model, tokenizer, ["cat", "dog"], templates=templates, cache_dir=tmp_path)
    assert counter.prompts == len(templates)  # only the corrupt entry, in a batch of its own:
    assert torch.equal(first[1], again[1]) and (first[0] - again[0]).abs().max().item() <= 1e-6  # float32 rounding
    calls = counter.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overwritten with a good file: no warning, no recomputation
        encode_vocabulary(clip_model, tokenizer, ["cat", "dog"], templates=templates, cache_dir=tmp_path)
    assert counter.calls == calls


def test_cache_disabled_by_env_and_argument(clip_model, tokenizer, tmp_path, monkeypatch):
    counter = _Counter(monkeypatch)
    templates = PROMPT_TEMPLATES[:2]
    monkeypatch.setenv("SED_FAST_TEXT_CACHE", "0")
    encode_vocabulary(clip_model, tokenizer, ["cat"], templates=templates, cache_dir=tmp_path)
    once = counter.calls  # the text tower's calls of one encoding (one per prefix length of the templates)
    encode_vocabulary(clip_model, tokenizer, ["cat"], templates=templates, cache_dir=tmp_path)
    assert once > 0 and counter.calls == 2 * once and not list(tmp_path.iterdir())
    monkeypatch.delenv("SED_FAST_TEXT_CACHE")
    for _ in range(2):
        encode_vocabulary(clip_model, tokenizer, ["cat"], templates=templates, cache_dir=tmp_path, cache=False)
    assert counter.calls == 4 * once and not list(tmp_path.iterdir())


def test_default_cache_dir_from_env(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path))
    assert text_mod.default_cache_dir() == tmp_path / "text"
    encode_vocabulary(clip_model, tokenizer, ["cat"], templates=PROMPT_TEMPLATES[:2])
    assert len(list((tmp_path / "text").glob("*.pt"))) == 1


def test_bad_arguments(clip_model, tokenizer):
    with pytest.raises(ValueError):
        encode_vocabulary(clip_model, tokenizer, [], cache=False)
    with pytest.raises(ValueError):
        encode_vocabulary(clip_model, tokenizer, ["cat"], templates=[], cache=False)
    with pytest.raises(TypeError):
        encode_vocabulary(clip_model, tokenizer, ["cat", 3], cache=False)
    with pytest.raises(TypeError):
        encode_vocabulary(torch.nn.Linear(2, 2), tokenizer, ["cat"], cache=False)


def test_callable_templates_and_progress(clip_model, tokenizer, capsys):
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"{c}!"]
    got = encode_vocabulary(clip_model, tokenizer, ["cat", "a, b"], templates=templates, cache=False,
                            progress=True, batch_size=2)
    ref = _official_class_embeddings(clip_model, tokenizer, ["cat", "a, b"], ["a photo of a {}.", "{}!"])
    assert (got - ref).abs().max().item() <= 1e-6
    if os.environ.get("TQDM_DISABLE") is None:
        pytest.importorskip("tqdm")
        assert "prompt" in capsys.readouterr().err


# -- cache integrity, size cap, tokenizer checks, progress -------------------------------------
def _entry_path(folder, model, tokenizer, name, templates):
    (key,) = text_mod.class_cache_keys(model, tokenizer, [name], templates)
    return folder / f"{key}.pt"


def _overwrite_floats(path, value=2.0):
    """Overwrite floats inside the stored embeddings with finite values (the file still parses)."""
    data = bytearray(path.read_bytes())
    stored = torch.load(path, weights_only=True)["embeddings"]
    needle = stored.reshape(-1)[:4].numpy().tobytes()
    start = data.find(needle)
    assert start > 0
    data[start:start + 8] = torch.full((2,), value).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_corrupt_payload_is_detected_and_recomputed(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    templates = PROMPT_TEMPLATES[:3]
    first = encode_vocabulary(clip_model, tokenizer, ["cat", "dog"], templates=templates, cache_dir=tmp_path)
    path = _entry_path(tmp_path, clip_model, tokenizer, "dog", templates)
    _overwrite_floats(path)
    assert not torch.equal(torch.load(path, weights_only=True)["embeddings"], first[1])
    counter = _Counter(monkeypatch)
    with pytest.warns(RuntimeWarning, match="corrupt.*checksum"):
        again = encode_vocabulary(clip_model, tokenizer, ["cat", "dog"], templates=templates, cache_dir=tmp_path)
    assert counter.prompts == len(templates) and torch.equal(again[0], first[0])
    assert (again[1] - first[1]).abs().max().item() <= 1e-6  # recomputed alone: float32 rounding
    assert torch.equal(torch.load(path, weights_only=True)["embeddings"], again[1])  # overwritten


def test_unreadable_cache_file_is_not_called_corrupt(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    templates = PROMPT_TEMPLATES[:2]
    first = encode_vocabulary(clip_model, tokenizer, ["cat"], templates=templates, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file) == str(path) and "r" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(text_mod, "open", failing_open, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = encode_vocabulary(clip_model, tokenizer, ["cat"], templates=templates, cache_dir=tmp_path)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("unreadable" in m and "Permission denied" in m for m in messages), messages
    assert not any("corrupt" in m for m in messages), messages
    assert torch.equal(again, first)


def test_cache_writes_leave_no_temporary_files(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(text_mod.os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    encode_vocabulary(clip_model, tokenizer, ["cat"], templates=PROMPT_TEMPLATES[:2], cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    assert [str(b) for _, b in replaced] == [str(path)] and os.path.dirname(replaced[0][0]) == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_cache_size_cap_evicts_least_recently_used(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    monkeypatch.delenv("SED_FAST_TEXT_CACHE_MB", raising=False)
    templates = PROMPT_TEMPLATES[:2]

    def run(names):
        encode_vocabulary(clip_model, tokenizer, names, templates=templates, cache_dir=tmp_path, progress=False)
        return {p.name for p in tmp_path.glob("*.pt")}

    a = run(["cat"])
    b = run(["dog"]) - a
    size = max(p.stat().st_size for p in tmp_path.glob("*.pt"))
    now = time.time()
    os.utime(tmp_path / a.pop(), (now - 100, now - 100))
    os.utime(tmp_path / next(iter(b)), (now - 50, now - 50))
    (a_name,) = {p.name for p in tmp_path.glob("*.pt")} - b
    counter = _Counter(monkeypatch)
    run(["cat"])  # a hit: touches the file
    assert counter.calls == 0
    monkeypatch.setenv("SED_FAST_TEXT_CACHE_MB", str(2.5 * size / 2 ** 20))
    after = run(["grass"])
    assert a_name in after and not (b & after) and len(after) == 2  # the least recently used (dog) went
    monkeypatch.setenv("SED_FAST_TEXT_CACHE_MB", "0")
    assert len(run(["sky"])) == 1  # only the entry just written stays


def test_eviction_deletes_only_cache_entries(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    monkeypatch.setenv("SED_FAST_TEXT_CACHE_MB", "0")
    mine = [tmp_path / "notes.pt", tmp_path / f"{'c' * 64}.pt", tmp_path / ".notes.tmp"]
    for path in mine:
        path.write_bytes(b"the user's")
    os.utime(mine[2], (time.time() - 7200, time.time() - 7200))
    for name in ("cat", "dog"):
        encode_vocabulary(clip_model, tokenizer, [name], templates=PROMPT_TEMPLATES[:2], cache_dir=tmp_path)
    entries, _ = text_mod.cache_files(tmp_path)
    assert len(entries) == 1 and all(path.read_bytes() == b"the user's" for path in mine)


def test_bad_cache_cap_fails_before_encoding(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    monkeypatch.setenv("SED_FAST_TEXT_CACHE_MB", "lots")
    counter = _Counter(monkeypatch)
    with pytest.raises(ValueError, match="SED_FAST_TEXT_CACHE_MB"):
        encode_vocabulary(clip_model, tokenizer, ["cat"], templates=PROMPT_TEMPLATES[:2], cache_dir=tmp_path)
    assert counter.calls == 0


@pytest.mark.parametrize("names, same", [
    (["cat", "dog", "Cat"], (0, 2)),
    (["cat", " cat"], (0, 1)),
    (["ca\x00t", "dog", "cat"], (0, 2)),
    (["a " + "very " * 80 + "red cat", "a " + "very " * 80 + "blue cat"], (0, 1)),  # equal in 77 tokens
])
def test_names_the_tokenizer_makes_identical_are_duplicates(clip_model, tokenizer, names, same):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", text_mod.TruncatedPromptWarning)
        with pytest.raises(ValueError, match="tokenizer makes identical") as info:
            encode_vocabulary(clip_model, tokenizer, names, templates=PROMPT_TEMPLATES[:2], cache=False,
                              progress=False)
        with pytest.raises(ValueError, match="tokenizer makes identical"):
            text_mod.check_tokenized_duplicates(tokenizer, names, PROMPT_TEMPLATES[:1])
    message = str(info.value)
    first, second = same
    assert f"{names[first]!r} (index {first}) = {names[second]!r} (index {second})" in message


def test_truncated_prompts_are_reported(clip_model, tokenizer):
    long_name = "a " + "very " * 80 + "long name"
    with pytest.warns(text_mod.TruncatedPromptWarning, match=r"index 1.*Shorten"):
        encode_vocabulary(clip_model, tokenizer, ["cat", long_name], templates=PROMPT_TEMPLATES[:2], cache=False,
                          progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", text_mod.TruncatedPromptWarning)
        encode_vocabulary(clip_model, tokenizer, ["cat", "a " + "very " * 60 + "long name"],
                          templates=["{}"], cache=False, progress=False)  # 63 tokens: fits


def test_progress_lines_without_a_terminal(clip_model, tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(text_mod, "_PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(text_mod, "_progress_bar", lambda *args: None)  # as when stderr is not a terminal
    encode_vocabulary(clip_model, tokenizer, ["cat", "dog"], templates=PROMPT_TEMPLATES[:8], cache=False,
                      batch_size=4)
    err = capsys.readouterr().err
    assert "text embeddings: encoding 16 prompts of 2 classes" in err
    partial = [int(n) for n in re.findall(r"text embeddings: (\d+)/16 prompts, ", err)]
    assert partial == sorted(partial) and partial[0] < 16 and "16/16 prompts, done" in err
    encode_vocabulary(clip_model, tokenizer, ["cat", "dog"], templates=PROMPT_TEMPLATES[:8], cache=False,
                      batch_size=4, progress=False)
    assert capsys.readouterr().err == ""


def test_old_format_entries_are_replaced_silently(clip_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    templates = PROMPT_TEMPLATES[:2]
    first = encode_vocabulary(clip_model, tokenizer, ["cat"], templates=templates, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.pt")
    data = torch.load(path, weights_only=True)
    torch.save({"format": 3, "key": data["key"], "names": [data["name"]], "embeddings": data["embeddings"][None]},
               path)
    stale = tmp_path / f".{'0' * 64}.x_1y.tmp"  # left by a killed writer
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = encode_vocabulary(clip_model, tokenizer, ["cat"], templates=templates, cache_dir=tmp_path)
    assert torch.equal(again, first)
    assert torch.load(path, weights_only=True)["format"] == text_mod._FORMAT_VERSION
    assert not stale.exists()


def test_truncation_warning_is_kept_with_the_cache_entry(clip_model, tokenizer, tmp_path, monkeypatch):
    long_name = "a " + "very " * 80 + "long name"
    args = dict(templates=PROMPT_TEMPLATES[:2], cache_dir=tmp_path, progress=False)
    with pytest.warns(text_mod.TruncatedPromptWarning, match=r"index 1.*Shorten") as computed:
        first = encode_vocabulary(clip_model, tokenizer, ["cat", long_name], **args)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    monkeypatch.setattr(text_mod._TextTower, "encode", lambda *a, **k: pytest.fail("not a cache hit"))
    with pytest.warns(text_mod.TruncatedPromptWarning, match=r"index 1.*Shorten") as cached:
        again = encode_vocabulary(clip_model, tokenizer, ["cat", long_name], **args)  # a cache hit
    assert torch.equal(first, again)
    assert [str(w.message) for w in computed] == [str(w.message) for w in cached]
    with warnings.catch_warnings():
        warnings.simplefilter("error", text_mod.TruncatedPromptWarning)
        monkeypatch.undo()
        encode_vocabulary(clip_model, tokenizer, ["cat"], **args)
        monkeypatch.setattr(text_mod._TextTower, "encode", lambda *a, **k: pytest.fail("not a cache hit"))
        encode_vocabulary(clip_model, tokenizer, ["cat"], **args)  # hit: no warning either


def test_concurrent_writers_share_the_cache(clip_model, tokenizer, tmp_path, monkeypatch):
    """Writers with overlapping vocabularies at once (threads here; processes share files the same
    way): each gets its own vocabulary's embeddings, every entry left is whole, no temporary file stays."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    monkeypatch.delenv("SED_FAST_TEXT_CACHE_MB", raising=False)
    templates = PROMPT_TEMPLATES[:2]
    vocabularies = [["cat", "dog", "sky"], ["dog", "sky", "tree"], ["sky", "cat", "water"], ["tree", "cat"]] * 2
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda names: encode_vocabulary(clip_model, tokenizer, names, templates=templates,
                                                                cache_dir=tmp_path, progress=False), vocabularies))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry valid: no corrupt-entry warning
        for names, got in zip(vocabularies, results):
            fresh = encode_vocabulary(clip_model, tokenizer, names, templates=templates, cache=False, progress=False)
            assert (got - fresh).abs().max().item() <= 1e-6
            with pytest.MonkeyPatch.context() as patch:
                counter = _Counter(patch)
                encode_vocabulary(clip_model, tokenizer, names, templates=templates, cache_dir=tmp_path,
                                  progress=False)
                assert counter.calls == 0
    assert len(list(tmp_path.glob("*.pt"))) == 5 and not list(tmp_path.glob(".*"))
