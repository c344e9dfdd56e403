"""The ``--out`` rule of ``sed-fast eval``: a user's ``model_final.pth`` and ``notes.txt`` stay
byte-identical; a result name that is a user's file stops the run (exit 2, named) before the model
is built, untouched; ``--resume`` with nothing to resume is a usage error that writes nothing; a
second run (``--overwrite``) replaces only the first one's files."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from eval_synthetic import TINY, write_label
from test_eval_cli import COMMON, run_eval

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")


@pytest.fixture
def dataset(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        write_label(labels / f"img{i}.png", rng.integers(0, 3, (32, 40)), ".png")
    return ["--images", images, "--labels", labels, "--vocab", ",".join(TINY), "--ignore", "255", "--no-plot"]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _user_files(out):
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"the user's official weights")
    (out / "notes.txt").write_text("mine")
    return _digests(out)


def test_eval_leaves_the_users_files_alone(tmp_path, shared_build, dataset):
    out = tmp_path / "out"
    users = _user_files(out)
    code, _, err = run_eval([*dataset, *COMMON, "--out", out])
    assert code == 0, err
    code, _, err = run_eval([*dataset, *COMMON, "--out", out, "--overwrite", "--save-predictions"])
    assert code == 0, err
    after = _digests(out)
    assert {name: after[name] for name in users} == users
    assert (out / "results.json").is_file() and list((out / "predictions").glob("*.png"))


@pytest.mark.parametrize("name", ["results.json", "log.txt", "eval_state.pt"])
def test_eval_refuses_to_write_over_a_users_file(tmp_path, shared_build, dataset, name):
    out = tmp_path / "out"
    _user_files(out)
    (out / name).write_bytes(b"the user's")
    before = _digests(out)
    for extra in ([], ["--overwrite"]):
        shared_build.clear()
        code, _, err = run_eval([*dataset, *COMMON, "--out", out, *extra])
        assert code == 2 and name in err and "did not write" in err, err
        assert not shared_build  # no model was built
        assert _digests(out) == before


def test_eval_refuses_a_users_predictions_folder(tmp_path, shared_build, dataset):
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "img0.png").write_bytes(b"the user's")
    code, _, err = run_eval([*dataset, *COMMON, "--out", out, "--save-predictions"])
    assert code == 2 and "predictions" in err, err
    assert (out / "predictions" / "img0.png").read_bytes() == b"the user's"


def test_resume_with_nothing_to_resume_is_a_usage_error(tmp_path, shared_build, dataset):
    out = tmp_path / "out"
    before = _user_files(out)
    code, _, err = run_eval([*dataset, *COMMON, "--out", out, "--resume"])
    assert code == 2 and "--resume" in err and "nothing was changed" in err, err
    assert _digests(out) == before
