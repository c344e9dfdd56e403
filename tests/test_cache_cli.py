"""`sed-fast cache list|size|clear` on a temporary SED_FAST_CACHE_DIR: every cache kind is found,
sized and cleared, and nothing the caches did not write is touched."""
import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import torch

from sed_fast import cli
from sed_fast.cache import cli as cache_cli
from sed_fast.cache import inventory

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16,
                                                        image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)).eval()
    return model, open_clip.get_tokenizer("convnext_base_w_320")


def _write(path: Path, data: bytes = b"x" * 100, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


@pytest.fixture
def root(tmp_path, monkeypatch, tiny_clip):
    """A cache root with entries of each cache and, beside them, files no cache wrote."""
    from sed_fast.data.text import PROMPT_TEMPLATES, encode_vocabulary

    root = tmp_path / "cache"
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(root))
    for name in ("SED_FAST_TEXT_CACHE", "SED_FAST_TEXT_CACHE_MB", "SED_FAST_CUDA_BUILD_DIR"):
        monkeypatch.delenv(name, raising=False)
    model, tokenizer = tiny_clip
    encode_vocabulary(model, tokenizer, ["cat", "dog"], templates=PROMPT_TEMPLATES[:2], progress=False)
    text = root / "text"
    _write(text / f".{'a' * 64}.k3_x9.tmp", age=7200)  # left by a killed writer: removable
    _write(text / f".{'b' * 64}.p2_q8.tmp")  # fresh: a writer may be at work, kept
    autotune = root / "autotune"
    _write(autotune / "backend_choices-torch2.5-cudaNone-tritonnone.json", b"{}")
    _write(autotune / "backend_choices-torch2.5-cudaNone-tritonnone.tmp4242", b"{")
    build = root / "cuda_ext" / "torch2.5-cu12.4-sm9.0_PTX"
    for name in ("build.ninja", ".ninja_log", ".ninja_deps", "ops.o", "topk_union_reject.cuda.o", "sed_fast_C.so"):
        _write(build / name)
    user = [
        _write(root / "notes.txt"),                      # beside the caches
        _write(text / "my_embeddings.pt"),               # not a cache name
        _write(text / f"{'c' * 64}.pt", b"not torch"),   # a cache name, not torch's format
        _write(autotune / "mine.json"),
        _write(root / "cuda_ext" / "elsewhere" / "sed_fast_C.so"),  # no build.ninja: not a build folder
        _write(build / "README"),                        # in a build folder, not a build file
    ]
    outside = _write(tmp_path / "precious.pt", b"PK\x03\x04 the user's own")
    (text / f"{'d' * 64}.pt").symlink_to(outside)  # a link named like an entry: neither it nor its target
    return root, user + [outside, text / f"{'d' * 64}.pt"]


def _run(capsys, *argv):
    code = cli.main(["cache", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_cache_and_its_entries(root, capsys):
    cache_root, user_files = root
    code, out, _ = _run(capsys, "list")
    assert code == 0
    assert "'cat' (2x32: templates x width)" in out and "'dog' (2x32: templates x width)" in out
    assert "backend_choices-torch2.5-cudaNone-tritonnone.json" in out and "sed_fast_C.so" in out
    assert "kept by clear: less than an hour old" in out
    for path in user_files:
        assert path.name == "sed_fast_C.so" or path.name not in out  # (that name is listed for the real build)
    code, out, _ = _run(capsys, "list", "--json")
    listing = json.loads(out)["caches"]
    assert code == 0 and listing["text"]["entries"] == 4 and listing["autotune"]["entries"] == 2
    assert listing["extension"]["entries"] == 6
    assert {Path(f["path"]).parent.name for f in listing["extension"]["files"]} == {"torch2.5-cu12.4-sm9.0_PTX"}
    listed = {f["path"] for cache in listing.values() for f in cache["files"]}
    assert not listed & {str(path) for path in user_files}


def test_size_adds_up_the_files(root, capsys):
    cache_root, _ = root
    code, out, _ = _run(capsys, "size", "--json")
    sizes = json.loads(out)
    text_bytes = sum(p.stat().st_size for p in (cache_root / "text").glob("[0-9a-f]*.pt") if not p.is_symlink()
                     and p.read_bytes()[:4] == b"PK\x03\x04") + 200
    assert code == 0 and sizes["caches"]["text"]["bytes"] == text_bytes
    assert sizes["caches"]["autotune"]["bytes"] == 3 and sizes["caches"]["extension"]["bytes"] == 600
    assert sizes["bytes"] == text_bytes + 603
    code, out, _ = _run(capsys, "size")
    assert code == 0 and f"({text_bytes + 603} bytes)" in out


def test_clear_each_kind_removes_only_its_entries(root, capsys):
    cache_root, user_files = root
    before = inventory.find_caches()
    text_bytes = before[0].size - 100  # the fresh temporary file stays
    code, out, _ = _run(capsys, "clear", "--text", "--dry-run")
    assert code == 0 and "would remove 3 file(s)" in out and len(list((cache_root / "text").glob("*"))) > 3
    code, out, _ = _run(capsys, "clear", "--text")
    assert code == 0 and "text: removed 3 file(s)" in out and f"({text_bytes} bytes)" in out
    assert "kept " in out and "less than an hour old" in out
    assert inventory.autotune_cache().entries and inventory.extension_cache().entries  # untouched
    assert [entry.path.name for entry in inventory.text_cache().entries] == [f".{'b' * 64}.p2_q8.tmp"]
    code, out, _ = _run(capsys, "clear", "--autotune")
    assert code == 0 and "autotune: removed 2 file(s), 3 B (3 bytes)" in out
    code, out, _ = _run(capsys, "clear", "--extension")
    assert code == 0 and "extension: removed 6 file(s)" in out and "(600 bytes)" in out
    for path in user_files:
        assert path.exists() or path.is_symlink(), path
    assert (cache_root / "cuda_ext" / "torch2.5-cu12.4-sm9.0_PTX" / "README").exists()  # its folder stays
    code, out, _ = _run(capsys, "size", "--json")
    assert json.loads(out)["bytes"] == 100  # the fresh temporary file


def test_clear_without_a_kind_clears_all_and_removes_emptied_folders(tmp_path, monkeypatch, capsys, tiny_clip):
    from sed_fast.data.text import PROMPT_TEMPLATES, encode_vocabulary

    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SED_FAST_CUDA_BUILD_DIR", raising=False)
    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    model, tokenizer = tiny_clip
    first = encode_vocabulary(model, tokenizer, ["sky"], templates=PROMPT_TEMPLATES[:2], progress=False)
    _write(tmp_path / "cuda_ext" / "tag" / "build.ninja")
    code, out, _ = _run(capsys, "clear")
    assert code == 0 and "in all: removed 2 file(s)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # text/, cuda_ext/tag, cuda_ext emptied and gone
    again = encode_vocabulary(model, tokenizer, ["sky"], templates=PROMPT_TEMPLATES[:2], progress=False)
    assert torch.equal(again, first) and len(list((tmp_path / "text").glob("*.pt"))) == 1  # rebuilt


def test_a_running_build_and_a_chosen_build_folder(tmp_path, monkeypatch, capsys):
    build = tmp_path / "my_build"
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SED_FAST_CUDA_BUILD_DIR", str(build))
    for name in ("build.ninja", "lock", "sed_fast_C.so", "notes.md"):
        _write(build / name)
    (cache,) = inventory.find_caches(["extension"])
    assert cache.folder == build and "SED_FAST_CUDA_BUILD_DIR" in cache.note and len(cache.entries) == 3
    with open(build / "lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as torch holds it while building
        code, out, _ = _run(capsys, "clear", "--extension")
        assert code == 0 and "removed 0 file(s)" in out and "a build is running" in out
    code, out, _ = _run(capsys, "clear", "--extension")
    assert code == 0 and "removed 3 file(s)" in out
    assert sorted(p.name for p in build.iterdir()) == ["notes.md"]  # the user's folder and file stay


def test_a_file_that_cannot_be_removed_exits_1(root, capsys, monkeypatch):
    real_unlink = os.unlink

    def refusing(path, *args, **kwargs):
        if str(path).endswith(".json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(inventory.os, "unlink", refusing)
    code, out, err = _run(capsys, "clear", "--autotune")
    assert code == 1 and "could not remove" in err and "Permission denied" in err and "removed 1 file(s)" in out


@pytest.mark.parametrize("argv", [[], ["clear", "--everything"], ["shrink"], ["list", "extra"]])
def test_usage_errors_exit_2(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SED_FAST_CACHE_DIR", str(tmp_path))
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "error" in err
    assert cache_cli.main(["--help"]) == 0


def test_the_readme_block_runs_verbatim(root, capsys):
    """Each line of the README's `sed-fast cache` block, as written, exits 0."""
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Caches: `sed-fast cache`", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.startswith("sed-fast cache")]
    assert len(lines) == 4
    for line in lines:
        argv = shlex.split(line, comments=True)
        assert argv[:2] == ["sed-fast", "cache"]
        code, out, _ = _run(capsys, *argv[2:])
        assert code == 0, line
    assert "text: removed 3 file(s)" in out
