"""``sed-fast eval`` under contention and faults: two evaluations into one --out (real processes),
a read-only and a full file system (a real tmpfs where the machine allows it), result sets written
all or nothing, resumes refused for other weights (by content) or another vocabulary (by name)."""
import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sed_fast.api as api
from eval_synthetic import TINY, write_label
from fake_model import FakeModel
from sed_fast import cli as top_cli
from sed_fast.evaluation import cli as eval_cli, report, state as state_mod
from sed_fast.evaluation.report import ResultSetError, read_results
from sed_fast.toolkit.outdir_lock import LOCK_NAME
from tmpfs_mount import fill, remount, tmpfs

pytestmark = pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning")

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--random-weights", "--resolution", "64", "--device", "cpu", "--workers", "0", "--impl", "reference",
          "--no-plot"]


def run_eval(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = top_cli.main(["eval", *[str(a) for a in argv]])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def custom(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        label = rng.integers(0, 3, (32, 40))
        label[:2] = 255
        write_label(labels / f"img{i}.png", label, ".png")
    return ["--images", images, "--labels", labels, "--vocab", ",".join(TINY), "--ignore", "255"]


@pytest.fixture
def builds(monkeypatch):
    """The models built: the stand-in model (only the command's control flow is under test here)."""
    calls = []

    def build(*args, **kwargs):
        calls.append(args)
        return FakeModel()

    monkeypatch.setattr(api, "build_sed", build)
    return calls


# Evaluates in a separate process (with the stand-in model: no weights to build) and stops before
# its first image until its stdin gets a line.
_BLOCKED_EVAL = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv.pop(1))
    import sed_fast.api
    from fake_model import FakeModel
    from sed_fast import cli
    from sed_fast.evaluation import runner

    sed_fast.api.build_sed = lambda variant, **kwargs: FakeModel()

    real, waited = runner.predict, []

    def predict(model, images):
        if not waited:
            waited.append(True)
            print("predicting", flush=True)
            sys.stdin.readline()
        return real(model, images)

    runner.predict = predict
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_second_eval_into_the_same_out_exits_2_naming_the_first(tmp_path, custom, builds):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", _BLOCKED_EVAL, str(ROOT / "tests"), "eval", *map(str, custom),
                              *COMMON, "--out", str(out)], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = first.stdout.readline()  # it holds --out, and has built its model
        assert line.strip() == "predicting", first.communicate()[1]
        code, _, err = run_eval([*custom, *COMMON, "--out", out])
        assert code == 2 and f"PID {first.pid}" in err and "in use" in err and "Traceback" not in err, err
        assert builds == []  # refused before any model was built
        code, _, err = run_eval([*custom, *COMMON, "--out", out, "--overwrite"])  # not even with --overwrite
        assert code == 2 and f"PID {first.pid}" in err
        _, first_err = first.communicate(input="\n", timeout=300)  # let it go on
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, first_err
    results = read_results(out)  # one run's complete set
    assert results["images"]["evaluated"] == 3 and not (out / LOCK_NAME).exists()


def test_a_read_only_out_exits_2_before_the_model_is_built(tmp_path, custom, builds):
    with tmpfs(tmp_path / "ro", 512) as out:
        remount(out, readonly=True)
        code, _, err = run_eval([*custom, *COMMON, "--out", out])
        assert code == 2 and "cannot write" in err and "Read-only file system" in err and "--out" in err, err
        assert builds == []


def test_too_little_space_for_the_state_exits_2_before_the_model_is_built(tmp_path, custom, builds):
    with tmpfs(tmp_path / "small", 512) as out:
        code, _, err = run_eval([*custom, *COMMON, "--out", out])
        assert code == 2 and "free" in err and "needs about" in err, err
        assert builds == [] and list(out.iterdir()) == []


def test_a_full_disk_keeps_the_previous_result_set(tmp_path, custom, builds, monkeypatch):
    with tmpfs(tmp_path / "fs", 4096) as out:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
        code, _, err = run_eval([*custom, *COMMON, "--out", out])  # a killed run's lock file: taken over
        assert code == 0, err
        assert f"took over the lock of {out} left by PID {int(dead.stdout)}" in err
        before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
        assert read_results(out)["files"].keys() == {"results.md", "confusion.npy", "log.txt"}

        real = report.atomic_write_set
        fillers = []
        monkeypatch.setattr(report, "atomic_write_set", lambda folder, files: fillers.append(fill(folder))
                            or real(folder, files))
        code, _, err = run_eval([*custom, *COMMON, "--out", out, "--resume"])  # the disk fills before the reports
        assert code == 1 and "No space left" in err and "Traceback" not in err, err
        names = {p.name for p in out.iterdir()} - {"filler.bin"}
        assert not [n for n in names if n.endswith(".tmp")], names
        for name in ("results.json", "results.md", "confusion.npy", "log.txt"):
            assert (out / name).read_bytes() == before[name], name  # the previous set, whole
        read_results(out)

        monkeypatch.setattr(report, "atomic_write_set", real)
        fillers[0].unlink()
        code, _, err = run_eval([*custom, *COMMON, "--out", out, "--resume"])
        assert code == 0, err
        assert read_results(out)["images"]["evaluated"] == 3

        # A file from elsewhere in the set is refused, naming it; a missing one too.
        np.save(out / "confusion.npy", np.zeros((4, 4), dtype=np.int64))
        with pytest.raises(ResultSetError, match=r"incomplete or mixed: confusion\.npy is not the file"):
            read_results(out)
        (out / "results.md").unlink()
        with pytest.raises(ResultSetError, match=r"results\.md is missing"):
            read_results(out)


def _save_state_for(args_list, out: Path) -> None:
    """The resume file a run of ``args_list`` would have saved after no image (its settings)."""
    args = eval_cli.build_parser().parse_args([str(a) for a in args_list])
    spec, _, _ = eval_cli._check_options(args)
    dataset = eval_cli._load_dataset(args)
    settings = eval_cli._settings(args, dataset, spec, torch.device("cpu"))
    state = state_mod.EvalState(settings=settings, confusion={"reference": torch.zeros(4, 4, dtype=torch.int64)},
                                names=eval_cli._names(dataset))
    out.mkdir(parents=True, exist_ok=True)
    state_mod.save_state(out / state_mod.STATE_FILE, state)


@pytest.mark.parametrize("cached", [False, True], ids=["hashed", "cached"])
def test_resume_refuses_other_weights_copied_over_the_same_path(tmp_path, custom, builds, monkeypatch, cached):
    import sed_fast.data.checkpoint as checkpoint_mod

    if cached:  # the cache by path, size and times must not be fooled either
        monkeypatch.setattr(checkpoint_mod, "REHASH_BYTES", 0)
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"A" * 4096)
    common = [*custom, "--checkpoint", weights, *COMMON[1:], "--out", tmp_path / "out"]
    _save_state_for(common, tmp_path / "out")
    code, _, err = run_eval([*common, "--resume"])  # the same file: the resume goes on (to load it)
    assert code == 2 and "other settings" not in err and "model.pth" in err, err
    stat = weights.stat()
    weights.write_bytes(b"B" * 4096)  # another model, same size, same modification time
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, _, err = run_eval([*common, "--resume"])
    old, new = hashlib.sha256(b"A" * 4096).hexdigest(), hashlib.sha256(b"B" * 4096).hexdigest()
    assert code == 2 and "other settings" in err and f"sha256 {old}" in err and f"sha256 {new}" in err, err
    assert builds == []


def test_resume_names_the_vocabulary_changes(tmp_path, custom, builds):
    out = tmp_path / "out"
    code, _, err = run_eval([*custom, *COMMON, "--out", out, "--limit", "1"])
    assert code == 0, err
    vocab = custom.index("--vocab") + 1
    changed = list(custom)
    changed[vocab] = "cat,dog,bird"
    code, _, err = run_eval([*changed, *COMMON, "--out", out, "--limit", "1", "--resume"])
    assert code == 2 and "1 removed ('grass')" in err and "1 added ('bird')" in err, err
    changed[vocab] = "dog,cat,grass"
    code, _, err = run_eval([*changed, *COMMON, "--out", out, "--limit", "1", "--resume"])
    assert code == 2 and "the same 3 names in another order (index 0: 'cat' in the resume file, 'dog' now)" in err
