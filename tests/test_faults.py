"""Fault injection: damaged cache and checkpoint files, signals during `sed-fast segment`, output
folders that cannot be written or hold symbolic links, writes that fail halfway.

CPU only and small: a tiny CLIP for the text cache, nn.Linear for checkpoints, 40x40 images and 2
classes for the one real subprocess run; the other CLI runs use a stand-in model.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sed_fast import cli
from sed_fast.toolkit import outputs as outputs_mod
from sed_fast.data.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAKE_ARGS = ["--vocab", "cat,dog", "--random-weights", "--resolution", "64", "--impl", "reference",
             "--device", "cpu", "--quiet"]


def _rgb(seed, h=40, w=40):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(_rgb(i)).save(folder / f"img{i:03d}.png")
    return folder


def _assert_folder_is_whole(out: Path) -> dict:
    """Every file in ``out`` is complete: no temporary files, PNGs and .npy files load, summary.json
    parses and lists only files that exist. Returns the summary."""
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names
    for path in out.iterdir():
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".npy":
            np.load(path)
    summary = json.loads((out / "summary.json").read_text())
    for record in summary["images"]:
        for name in record.get("outputs", {}).values():
            assert (out / name).is_file(), name
    return summary


def run_main(argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


# -- text-embedding cache ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16,
                                                        image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)).eval()
    return model, open_clip.get_tokenizer("convnext_base_w_320")


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif how == "payload":  # finite floats overwritten: the file still parses
        stored = torch.load(path, weights_only=True)["embeddings"]
        start = data.find(stored.reshape(-1)[:4].numpy().tobytes())
        assert start > 0
        data[start:start + 16] = torch.full((4,), 0.25).numpy().tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "payload"])
def test_damaged_cache_entry_is_recomputed_and_replaced(tiny_clip, tmp_path, monkeypatch, how):
    from sed_fast.data.text import PROMPT_TEMPLATES, encode_vocabulary

    monkeypatch.delenv("SED_FAST_TEXT_CACHE", raising=False)
    model, tokenizer = tiny_clip

    def encode():
        return encode_vocabulary(model, tokenizer, ["cat"], templates=PROMPT_TEMPLATES[:3],  # one entry per name
                                 cache_dir=tmp_path, progress=False)

    good = encode()
    (path,) = tmp_path.glob("*.pt")
    _damage(path, how)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        again = encode()
    assert torch.equal(again, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # replaced by a good entry
        assert torch.equal(encode(), good)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# -- checkpoints -------------------------------------------------------------------------------
@pytest.fixture
def linear_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    path = tmp_path / "model_final.pth"
    save_checkpoint(model, path)
    return model, path


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.9, -1])
def test_truncated_checkpoint_is_reported_as_damaged(linear_checkpoint, tmp_path, monkeypatch, keep):
    monkeypatch.delenv("SED_FAST_TRUST_CHECKPOINTS", raising=False)
    _, path = linear_checkpoint
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) - 1] if keep == -1 else data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        read_state_dict(cut)
    assert "truncated or corrupt" in str(info.value) and "SED_FAST_TRUST" not in str(info.value)


def test_checkpoint_with_nan_bytes_is_refused(linear_checkpoint, tmp_path):
    model, path = linear_checkpoint
    data = bytearray(path.read_bytes())
    start = data.find(model.weight.detach().reshape(-1)[:4].numpy().tobytes())
    assert start > 0
    data[start:start + 12] = b"\xff" * 12  # three NaNs in the stored weight
    bad = tmp_path / "nan.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weight \(3 of 2048 values: 3 NaN, 0 inf\)"):
        load_checkpoint(torch.nn.Linear(64, 32), bad)


# -- sed-fast segment: signals -----------------------------------------------------------------
def test_sigint_mid_run_leaves_only_complete_files(tmp_path):
    """A real `sed-fast segment` subprocess, interrupted once its first outputs exist."""
    folder = _images(tmp_path / "in", 150)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", "sed_fast", "segment", str(folder), *FAKE_ARGS,
                                "--save-scores", "--out", str(out)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*_overlay.png")) if out.is_dir() else True:
            assert process.poll() is None, f"exited early ({process.returncode}): {process.communicate()[1]}"
            assert time.monotonic() < deadline, "no output file after 300 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    summary = _assert_folder_is_whole(out)
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130 and summary["signal"] == "SIGINT"
    assert 1 <= summary["num_images"] < 150 and summary["num_ok"] == summary["num_images"]
    assert summary["num_not_processed"] == 150 - summary["num_images"]


_SIGNAL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import sed_fast.api
    from sed_fast import cli
    from sed_fast.toolkit.outputs import OutputFolder

    mode, at = sys.argv[1], int(sys.argv[2])
    calls = {"model": 0, "write": 0}

    class Fake:
        device = torch.device("cpu")
        random_weights = True
        def set_vocabulary(self, names, progress=None):
            self.class_names = list(names)
            return self.class_names
        def __call__(self, images):
            calls["model"] += 1
            if mode == "model" and calls["model"] == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return [torch.rand(len(self.class_names), *image.shape[-2:]) for image in images]

    sed_fast.api.build_sed = lambda variant, **kwargs: Fake()
    if mode == "write":  # the signal arrives while an image's first file is being written
        original = OutputFolder.write
        def write(self, name, save):
            if name.endswith("_labels.png"):
                calls["write"] += 1
                if calls["write"] == at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return original(self, name, save)
        OutputFolder.write = write
    sys.exit(cli.main(sys.argv[3:]))
""")


@pytest.mark.parametrize("mode", ["model", "write"])
def test_sigterm_is_handled_like_sigint(tmp_path, mode):
    folder = _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(_SIGNAL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(script), mode, "3", "segment", str(folder), *FAKE_ARGS,
                             "--save-scores", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 143, result.stderr
    assert "SIGTERM" in result.stderr and "Traceback" not in result.stderr
    summary = _assert_folder_is_whole(out)
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143 and summary["signal"] == "SIGTERM"
    # "model": image 3 is cut short before any of its files; "write": its files are finished first
    done = 2 if mode == "model" else 3
    assert summary["num_images"] == done and summary["num_not_processed"] == 6 - done
    assert sorted(p.name for p in out.glob("*_labels.png")) == [f"img{i:03d}_labels.png" for i in range(done)]


# -- sed-fast segment: the output folder ---------------------------------------------------------
def test_read_only_out_is_a_usage_error_before_the_model_is_built(tmp_path, fake_build):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        try:
            (out / "probe").write_bytes(b"")
        except OSError:
            pass
        else:
            pytest.skip("permissions are not enforced for this user (root): chmod cannot make a folder read-only")
        code, err = run_main(["segment", _images(tmp_path / "in", 1), *FAKE_ARGS, "--out", out])
    finally:
        out.chmod(0o755)
    assert code == 2 and "cannot write" in err and "--out" in err and "Traceback" not in err
    assert fake_build == [] and list(out.iterdir()) == []


def test_unwritable_out_is_a_usage_error_before_the_model_is_built(tmp_path, fake_build, monkeypatch):
    """As the read-only case, for any user: creating files in --out fails with EACCES."""
    out = (tmp_path / "o").resolve()
    real_mkstemp = outputs_mod.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == out:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    real_open = open

    def open_(file, mode="r", *args, **kwargs):
        if "w" in mode and Path(file).resolve().parent == out:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(outputs_mod.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr("builtins.open", open_)
    code, err = run_main(["segment", _images(tmp_path / "in", 1), *FAKE_ARGS, "--out", out])
    assert code == 2 and "cannot write" in err and "Permission denied" in err
    assert fake_build == [] and list(out.iterdir()) == []


def test_symlinks_in_out_are_replaced_not_written_through(tmp_path, fake_build):
    """Links a user put under the outputs' names are theirs: refused, untouched. Where a run's own
    outputs were replaced by links, the next run replaces the links, never writing through them."""
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    names = ("img000_labels.png", "img000_overlay.png", "summary.json")
    for name in names:
        (outside / name).write_bytes(b"precious")
        (out / name).symlink_to(outside / name)
    images = _images(tmp_path / "in", 1)
    code, err = run_main(["segment", images, *FAKE_ARGS, "--out", out])
    assert code == 2 and "img000_labels.png" in err and "did not write" in err, err
    assert fake_build == []
    for name in names:
        assert (out / name).is_symlink() and (outside / name).read_bytes() == b"precious"
        (out / name).unlink()
    assert run_main(["segment", images, *FAKE_ARGS, "--out", out])[0] == 0
    for name in names:  # the run's own files, now links to files outside
        (out / name).unlink()
        (out / name).symlink_to(outside / name)
    code, err = run_main(["segment", images, *FAKE_ARGS, "--out", out])
    assert code == 0, err
    for name in names:
        assert (outside / name).read_bytes() == b"precious"
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert _assert_folder_is_whole(out)["status"] == "complete"


def test_a_write_that_fails_halfway_keeps_the_previous_file(tmp_path, fake_build, monkeypatch):
    folder = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    code, err = run_main(["segment", folder, *FAKE_ARGS, "--out", out])
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}

    real_save = Image.Image.save

    def disk_full(self, fp, format=None, **params):  # the overlays (wider than the image): half a file, ENOSPC
        if self.width > 40:
            if isinstance(fp, (str, os.PathLike)):
                fp = open(fp, "wb")
            fp.write(b"\x89PNG\r\n\x1a\n half")
            fp.flush()
            raise OSError(28, "No space left on device")
        return real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", disk_full)
    code, err = run_main(["segment", folder, *FAKE_ARGS, "--out", out])
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert code == 1 and "No space left" in err
    summary = _assert_folder_is_whole(out)
    assert summary["status"] == "complete" and summary["num_failed"] == 2
    for name in ("img000_overlay.png", "img001_overlay.png"):
        assert (out / name).read_bytes() == before[name]  # the previous run's file, whole
