"""``segment`` stopped by SIGTERM exits 143 leaving complete outputs only; ``--resume`` then skips
the images whose outputs are complete and gives the same files as an uninterrupted run. A user's
files in ``--out`` stay byte-identical; ``--resume`` with nothing to resume exits 2."""
import contextlib
import hashlib
import io
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from fake_model import FakeModel
from sed_fast import cli

ARGS = ["--vocab", "cat,dog", "--random-weights", "--resolution", "64", "--impl", "reference", "--device", "cpu",
        "--quiet", "--save-scores"]


class SeededFake(FakeModel):
    """Scores that depend on the image only (a resumed run gives the same as an uninterrupted one);
    ``stop_at``: the call that sends this process SIGTERM."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        out = []
        for image in images:
            generator = torch.Generator().manual_seed(int(image.float().sum().item()) % 2**31)
            out.append(torch.rand(len(self.class_names), *image.shape[-2:], generator=generator))
        return out


def _images(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return folder


def _run(monkeypatch, model, argv):
    import sed_fast.api
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: model)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _outputs(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and p.name.endswith((".png", ".npy"))}


def _user_files(out):
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"the user's weights")
    (out / "notes.txt").write_text("mine")
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("model_final.pth", "notes.txt")}


def test_sigterm_then_resume_gives_the_uninterrupted_files(tmp_path, monkeypatch):
    folder = _images(tmp_path / "in", 5)
    full, out = tmp_path / "full", tmp_path / "out"
    assert _run(monkeypatch, SeededFake(), ["segment", folder, *ARGS, "--out", full])[0] == 0
    users = _user_files(out)
    code, err = _run(monkeypatch, SeededFake(stop_at=3), ["segment", folder, *ARGS, "--out", out])
    assert code == 143 and "SIGTERM" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143 and summary["num_ok"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert sorted(p.name for p in out.glob("*_labels.png")) == ["img000_labels.png", "img001_labels.png"]
    resumed = SeededFake()
    code, err = _run(monkeypatch, resumed, ["segment", folder, *ARGS, "--out", out, "--resume"])
    assert code == 0, err
    assert resumed.calls == 3  # the two finished images were skipped
    assert _outputs(out) == _outputs(full)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["num_ok"] == 5 and len(summary["images"]) == 5
    assert {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in users} == users


@pytest.mark.parametrize("state", ["empty", "finished"])
def test_resume_with_nothing_to_resume_is_a_usage_error(tmp_path, monkeypatch, state):
    folder = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    users = _user_files(out)
    if state == "finished":
        assert _run(monkeypatch, SeededFake(), ["segment", folder, *ARGS, "--out", out])[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, err = _run(monkeypatch, SeededFake(), ["segment", folder, *ARGS, "--out", out, "--resume"])
    assert code == 2 and "--resume" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in users} == users


def test_vocab_that_looks_like_a_builtin_name_is_a_usage_error_listing_them(tmp_path, monkeypatch):
    folder = _images(tmp_path / "in", 1)
    args = [a for a in ARGS if a not in ("cat,dog",)]
    args[args.index("--vocab")] = "--vocab=ade9999"
    code, err = _run(monkeypatch, SeededFake(), ["segment", folder, *args, "--out", tmp_path / "o"])
    assert code == 2 and "ade9999" in err and "ade150" in err and "pc59" in err, err
