"""The ``--out`` rule of ``segment`` on a video: a user's ``model_final.pth`` and ``notes.txt`` stay
byte-identical; an overlay or a labels folder of the user's under an output name stops the run (exit
2, named) before the model is built, untouched; the next run rewrites its own outputs."""
import contextlib
import hashlib
import io

import pytest

import sed_fast.api
from fake_model import FakeModel
from sed_fast import cli

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")
ARGS = ["--vocab", "cat,dog,grass", "--random-weights", "--resolution", "64", "--device", "cpu", "--quiet"]


def run_main(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def builds(monkeypatch):
    calls = []
    monkeypatch.setattr(sed_fast.api, "build_sed", lambda variant, **kwargs: calls.append(variant) or FakeModel())
    return calls


def test_video_leaves_the_users_files_alone(tmp_path, clip, builds):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"the user's official weights")
    (out / "notes.txt").write_text("mine")
    users = _digests(out)
    for _ in range(2):  # the second run rewrites the first one's overlay, labels and summary
        code, err = run_main(["segment", clip, *ARGS, "--save-labels", "png", "--out", out])
        assert code == 0, err
        assert {name: _digests(out)[name] for name in users} == users
    assert (out / "shapes_overlay.mp4").is_file() and list((out / "shapes_labels").glob("frame_*.png"))
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".partial.mp4"))]


@pytest.mark.parametrize("name", ["shapes_overlay.mp4", "shapes_labels/frame_000000.png", "summary.json"])
def test_video_refuses_to_write_over_a_users_file(tmp_path, clip, builds, name):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(b"the user's")
    before = _digests(out)
    code, err = run_main(["segment", clip, *ARGS, "--save-labels", "png", "--out", out])
    assert code == 2 and name.split("/")[0] in err and "did not write" in err, err
    assert builds == [] and _digests(out) == before
