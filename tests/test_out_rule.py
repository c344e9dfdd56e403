"""The ``--out`` rule of ``segment`` (images) and ``export``: a command deletes or overwrites only
files it wrote. A user's ``model_final.pth`` and ``notes.txt`` in ``--out`` stay byte-identical; an
output name that is a user's file stops the command (exit 2, the file named) before the model is
built, the file untouched; a second run may rewrite the first one's outputs. (train:
tests/training/test_train_out_rule.py; eval: tests/evaluation/test_eval_out_rule.py; video:
tests/video/test_video_out_rule.py.)"""
import contextlib
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from sed_fast import cli
from sed_fast.toolkit.outputs import CLAIM_NAME, OutputClaim

FAKE_ARGS = ["--vocab", "cat,dog", "--random-weights", "--resolution", "64", "--impl", "reference",
             "--device", "cpu", "--quiet"]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def user_files(out):
    """A user's checkpoint and notes in ``out``; returns their digests."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_final.pth").write_bytes(b"the user's official weights")
    (out / "notes.txt").write_text("mine")
    return {name: digest for name, digest in _digests(out).items() if name in ("model_final.pth", "notes.txt")}


def run_main(argv):
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _images(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"img{i:03d}.png")
    return folder


# -- the claim ---------------------------------------------------------------------------------------
def test_claims_of_several_commands_live_side_by_side(tmp_path):
    (tmp_path / "log.txt").write_text("the user's")
    first = OutputClaim(tmp_path, "segment")
    first.refuse_collisions("--out x", ["summary.json"])
    first.claim(["summary.json"])
    second = OutputClaim(tmp_path, "eval")
    with pytest.raises(Exception, match="log.txt"):
        second.refuse_collisions("--out x", ["results.json", "log.txt"])
    second.claim(["results.json"])
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "results.json").write_text("{}")
    assert OutputClaim(tmp_path, "segment").owns("summary.json")
    assert not OutputClaim(tmp_path, "segment").owns("results.json")
    assert OutputClaim(tmp_path, "eval").owns("results.json")
    assert not OutputClaim(tmp_path, "eval").owns("log.txt")
    assert OutputClaim(tmp_path, "eval").collisions(["summary.json"]) == ["summary.json"]


def test_a_claim_file_of_one_command_still_reads(tmp_path):
    (tmp_path / CLAIM_NAME).write_text(json.dumps({"command": "train", "patterns": ["model_*.pth"],
                                                   "preexisting": ["model_user.pth"]}))
    (tmp_path / "model_0000001.pth").write_bytes(b"")
    (tmp_path / "model_user.pth").write_bytes(b"")
    claim = OutputClaim(tmp_path, "train", ["model_*.pth"])
    assert claim.owns("model_0000001.pth") and not claim.owns("model_user.pth")
    assert claim.collisions() == ["model_user.pth"]


def test_the_checkpoint_is_never_the_commands_to_write_over(tmp_path):
    claim = OutputClaim(tmp_path, "segment")
    claim.claim(["summary.json"])
    (tmp_path / "summary.json").write_text("{}")
    assert claim.collisions(["summary.json"]) == []
    assert claim.collisions(["summary.json"], keep=[tmp_path / "summary.json"]) == ["summary.json"]


# -- segment ------------------------------------------------------------------------------------------
def test_segment_leaves_the_users_files_alone(tmp_path, fake_build):
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    users = user_files(out)
    for _ in range(2):  # the second run rewrites the first one's outputs
        code, err = run_main(["segment", images, *FAKE_ARGS, "--out", out])
        assert code == 0, err
        assert {name: _digests(out)[name] for name in users} == users
    assert (out / "img001_overlay.png").is_file()


@pytest.mark.parametrize("name", ["summary.json", "img001_labels.png", "img000_scores.npy"])
def test_segment_refuses_to_write_over_a_users_file(tmp_path, fake_build, name):
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    user_files(out)
    (out / name).write_bytes(b"the user's")
    before = _digests(out)
    code, err = run_main(["segment", images, *FAKE_ARGS, "--save-scores", "--out", out])
    assert code == 2 and name in err and "did not write" in err and "move them" in err, err
    assert fake_build == []  # before the model
    assert _digests(out) == before and not (out / CLAIM_NAME).exists()


def test_segment_refuses_when_the_checkpoint_is_an_output_name(tmp_path, fake_build):
    images = _images(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert run_main(["segment", images, *FAKE_ARGS, "--out", out])[0] == 0
    args = [a for a in FAKE_ARGS if a != "--random-weights"]
    code, err = run_main(["segment", images, *args, "--checkpoint", out / "img000_labels.png", "--out", out])
    assert code == 2 and "img000_labels.png" in err, err


def test_segment_owns_a_folder_an_older_run_wrote(tmp_path, fake_build):
    """Without a claim file (a sed-fast before claims), the outputs a summary.json lists are the run's."""
    images = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    assert run_main(["segment", images, *FAKE_ARGS, "--out", out])[0] == 0
    (out / CLAIM_NAME).unlink()
    (out / "img000_scores.npy").write_bytes(b"the user's")  # not in the older run's summary
    code, err = run_main(["segment", images, *FAKE_ARGS, "--save-scores", "--out", out])
    assert code == 2 and "img000_scores.npy" in err and "img000_labels.png" not in err, err
    assert run_main(["segment", images, *FAKE_ARGS, "--out", out])[0] == 0


# -- export -------------------------------------------------------------------------------------------
EXPORT_ARGS = ["--vocab", "cat,dog,grass", "--random-weights", "--resolution", "64", "--format", "pt2",
               "--no-fresh-process-check"]


@pytest.fixture
def stand_in_export(monkeypatch):
    """The export's file written by a stand-in (the rule is the command's, not the exporter's); the
    model build counted."""
    from sed_fast.export import cli as export_cli, model as export_model

    builds = []

    def build_model(*args, **kwargs):
        builds.append(args)
        raise RuntimeError("the stand-in builds no model")

    def export_one(args, core_mod, model, module, path):
        path.write_bytes(b"an exported package")
        return {"path": str(path), "checks": [], "ok": True, "export_seconds": 0.0, "input": "image"}

    monkeypatch.setattr(export_model, "build_model", build_model)
    monkeypatch.setattr(export_cli, "_export_one", export_one)
    return builds


def test_export_leaves_the_users_files_alone_and_refuses_their_package_name(tmp_path, stand_in_export, monkeypatch):
    from sed_fast.export import core, model as export_model

    out = tmp_path / "out"
    users = user_files(out)
    (out / "sed.pt2").write_bytes(b"the user's package")
    before = _digests(out)
    code, err = run_main(["export", *EXPORT_ARGS, "--out", out / "sed.pt2"])
    assert code == 2 and "sed.pt2" in err and "did not write" in err, err
    assert stand_in_export == [] and _digests(out) == before

    class Model:
        class_names = ["cat", "dog", "grass"]
        cer_topk = None

    monkeypatch.setattr(export_model, "build_model", lambda *args, **kwargs: Model())
    monkeypatch.setattr(core, "ExportableSED", lambda model, **kwargs: _Module())
    for _ in range(2):  # the second export rewrites the first one's file
        code, err = run_main(["export", *EXPORT_ARGS, "--out", out / "mine.pt2"])
        assert code == 0, err
        assert {name: _digests(out)[name] for name in users} == users
        assert (out / "sed.pt2").read_bytes() == b"the user's package"
    assert (out / "mine.pt2").read_bytes() == b"an exported package"


class _Module:
    input_size = None
    input_names, output_names = ["image"], ["labels"]
    formulations = None

    def eval(self):
        return self


# -- report -------------------------------------------------------------------------------------------
def test_report_refuses_a_users_file_and_rewrites_its_own(tmp_path):
    from sed_fast.bench import report

    results = tmp_path / "results"
    results.mkdir()
    (results / "e2e.jsonl").write_text(json.dumps({"kind": "e2e", "variant": "b", "impl": "fast", "batch": 1,
                                                   "classes": 3, "median_ms": 1.0}) + "\n")
    out = tmp_path / "out"
    users = user_files(out)
    (out / "stages.png").write_bytes(b"the user's picture")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()) as err:
        assert report.main(["--results-dir", str(results), "--out", str(out)]) == 2
    assert "stages.png" in err.getvalue() and (out / "stages.png").read_bytes() == b"the user's picture"
    assert not (out / "report.md").exists()
    (out / "stages.png").unlink()
    for _ in range(2):
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()) as err:
            assert report.main(["--results-dir", str(results), "--out", str(out), "--no-plots"]) == 0, err.getvalue()
        assert {name: _digests(out)[name] for name in users} == users
    assert (out / "report.md").read_text().startswith("# SED benchmark report")
