"""The fault suite across tools: ``train``, ``eval``, ``segment`` (a folder of images) and ``segment``
on a video, each with stand-in models (milliseconds a step), faulted at exact points
(tests/fault_driver.py): SIGINT, SIGTERM and SIGKILL at a model call and at an output write, a full
disk (ENOSPC) at an output write, a read-only ``--out``, a signal at the last output, and a second
run on the same ``--out``. After each: the user's files in ``--out`` are byte-identical; every
file that looks complete is (it parses), and no temporary file is left but a killed process's
(pid in the name), which the next run removes; the exit code is 128 + n for a signal, 0 when the
run finished; ``--resume`` (train, eval, segment) or a second run (video) gives the uninterrupted
run's outputs. SIGINT and SIGTERM runs are in-process (the command's own handlers), SIGKILL runs a
subprocess. About a minute on two cores."""
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fault_driver
from fault_driver import BUILDS, install, use_stand_ins
from sed_fast import cli
from sed_fast.base.files import is_temporary_name
from sed_fast.toolkit.outputs import CLAIM_NAME

pytestmark = [pytest.mark.filterwarnings("ignore::sed_fast.RandomWeightsWarning"),
              pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--random-weights", "--resolution", "64", "--device", "cpu", "--impl", "reference", "--quiet"]
USER_FILES = {"model_final.pth": b"the user's official weights", "notes.txt": b"mine"}


# -- the tools -----------------------------------------------------------------------------------------
def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
            folder / f"img{i:03d}.png")
    return folder


def _digests(folder: Path, pattern: str) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern)) if p.is_file()}


class Tool:
    """One command's case: its data (``setup(root)``), its command line into ``out``, what is
    compared with the uninterrupted run (``result(out)``), the number of model calls and output
    writes of a run, and whether it resumes (else a second run redoes it)."""

    name = ""
    resumes = True
    mid_run_write = 5  # an output write after the first saved progress (a state, an image's files)
    user_checkpoint = "model_final.pth"

    def setup(self, root: Path) -> None:
        raise NotImplementedError

    def argv(self, out: Path):
        raise NotImplementedError

    def result(self, out: Path) -> dict:
        raise NotImplementedError


class Segment(Tool):
    name = "segment"
    model_calls = 5

    def setup(self, root):
        self.folder = _images(root / "images", self.model_calls)

    def argv(self, out):
        return ["segment", self.folder, "--vocab", "cat,dog", *MODEL, "--save-scores", "--out", out]

    def result(self, out):
        return _digests(out, "img*_*")


class Video(Tool):
    name = "video"
    resumes = False
    model_calls = 7

    clip = None

    def setup(self, root):
        pytest.importorskip("av")
        sys.path.insert(0, str(ROOT / "tests" / "video"))
        from video_clips import write_clip

        if self.clip is None:  # one clip for the module: the same input bytes for every run
            self.clip = write_clip(root / "shapes.mp4", frames=self.model_calls)

    def argv(self, out):
        return ["segment", self.clip, "--vocab", "cat,dog", *MODEL, "--save-labels", "png", "--out", out]

    def result(self, out):
        from video_clips import decode

        return {"frames": len(decode(out / "shapes_overlay.mp4")[0]), **_digests(out, "shapes_labels/*.png")}


class Eval(Tool):
    name = "eval"
    model_calls = 4

    def setup(self, root):
        sys.path.insert(0, str(ROOT / "tests" / "evaluation"))
        from eval_synthetic import write_label

        self.images, self.labels = _images(root / "images", self.model_calls), root / "labels"
        self.labels.mkdir()
        for i in range(self.model_calls):
            write_label(self.labels / f"img{i:03d}.png", np.random.default_rng(i).integers(0, 2, (32, 40)), ".png")

    def argv(self, out):
        return ["eval", "--images", self.images, "--labels", self.labels, "--vocab", "cat,dog", "--ignore", "255",
                *MODEL, "--workers", "0", "--no-plot", "--save-every", "1", "--save-predictions",
                "--progress-every", "0", "--out", out]

    def result(self, out):
        return {"confusion": np.load(out / "confusion.npy").tolist(), **_digests(out, "predictions/*.png")}


class Train(Tool):
    name = "train"
    model_calls = 4  # iterations
    mid_run_write = 8  # the second checkpoint's
    user_checkpoint = "model_user.pth"  # a user's model_final.pth is refused by the --out rule

    def setup(self, root):
        sys.path.insert(0, str(ROOT / "tests" / "training"))
        from train_synthetic import CLASSES, write_dataset

        self.classes = CLASSES
        self.images, self.labels = write_dataset(root / "data", count=2)

    def argv(self, out):
        return ["train", "--images", self.images, "--labels", self.labels, "--vocab", ",".join(self.classes),
                "--ignore", "255", "--random-weights", "--resolution", "64", "--crop-size", "32",
                "--min-size-train", "40", "--size-divisibility", "32", "--impl", "reference", "--device", "cpu",
                "--workers", "0", "--progress-every", "0", "--no-plot", "--quiet", "--max-iter",
                str(self.model_calls), "--save-every", "1", "--ims-per-batch", "1", "--out", out]

    def result(self, out):
        weights = torch.load(out / "model_final.pth", weights_only=True)["model"]
        return {name: hashlib.sha256(tensor.numpy().tobytes()).hexdigest() for name, tensor in weights.items()}


TOOLS = {tool.name: tool for tool in (Segment(), Video(), Eval(), Train())}


# -- running and checking ------------------------------------------------------------------------------
def run(argv, quiet_output=True):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


def run_killed(tool: Tool, fault: str, point: str, n: int, out: Path):
    """The command in a subprocess that sends itself ``fault`` at the ``n``-th ``point``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")  # as in this process (one_thread): the same float sums
    done = subprocess.run([sys.executable, fault_driver.__file__, fault, point, str(n), str(out),
                           *[str(a) for a in tool.argv(out)]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    return done.returncode, done.stderr


def with_user_files(out: Path, tool: Tool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in USER_FILES.items():
        (out / (tool.user_checkpoint if name == "model_final.pth" else name)).write_bytes(data)
    return {(tool.user_checkpoint if name == "model_final.pth" else name): data for name, data in USER_FILES.items()}


def check_folder(out: Path, users: dict, killed: bool = False) -> None:
    """The user's files are as they were; each file parses; temporaries only of a killed process."""
    for name, data in users.items():
        assert (out / name).read_bytes() == data, name
    for path in out.rglob("*"):
        if not path.is_file() or path.name in (".sed_fast.lock", CLAIM_NAME) or path.name in users:
            continue
        if is_temporary_name(path.name) or path.name.endswith((".partial.mp4", ".partial")):
            assert killed, f"a temporary file is left: {path}"
            continue
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        elif path.suffix in (".npy", ".npz"):
            np.load(path, allow_pickle=False)
        elif path.suffix in (".json",):
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix in (".pth", ".pt"):
            torch.load(path, weights_only=True)
        elif path.suffix == ".mp4":
            from video_clips import decode

            decode(path)
    if (out / CLAIM_NAME).exists():
        json.loads((out / CLAIM_NAME).read_text())


def temporaries(out: Path):
    return [p for p in out.rglob("*") if is_temporary_name(p.name) or p.name.endswith((".partial.mp4", ".partial"))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the killed subprocesses: a resumed training run then adds
    its floats in the same order as the uninterrupted one (and the tiny models run faster so)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(one_thread, tmp_path_factory):
    """Each tool's uninterrupted run: its data and its result."""
    results = {}
    root = tmp_path_factory.mktemp("faults")
    with pytest.MonkeyPatch.context() as patch:
        use_stand_ins(patch.setattr)
        for tool in TOOLS.values():
            (root / tool.name).mkdir()
            try:
                tool.setup(root / tool.name)
            except pytest.skip.Exception:
                continue
            code, err = run(tool.argv(root / tool.name / "out"))
            assert code == 0, err
            results[tool.name] = tool.result(root / tool.name / "out")
    return results


@pytest.fixture
def stand_ins(monkeypatch):
    BUILDS.clear()
    use_stand_ins(monkeypatch.setattr)
    return monkeypatch


def finish(tool: Tool, out: Path, users: dict, reference: dict, killed: bool = False) -> None:
    """``--resume`` (or a second run) completes to the uninterrupted result, leaving no temporary."""
    code, err = run(tool.argv(out) + (["--resume"] if tool.resumes else []))
    assert code == 0, err
    check_folder(out, users)
    assert not temporaries(out)
    assert tool.result(out) == reference[tool.name]


def _tool(name: str, reference: dict) -> Tool:
    if name not in reference:
        pytest.skip(f"{name}: its inputs cannot be made here (PyAV missing)")
    return TOOLS[name]


# -- signals -------------------------------------------------------------------------------------------
#: (fault, point, n): a model call early in the run and an output write in its middle.
SIGNALS = [("SIGINT", "model", 2), ("SIGTERM", "write", 4), ("SIGHUP", "model", 3)]


@pytest.mark.parametrize("name", list(TOOLS))
@pytest.mark.parametrize("fault,point,n", SIGNALS, ids=[f"{f}-{p}{n}" for f, p, n in SIGNALS])
def test_a_signal_stops_the_run_and_resume_completes_it(tmp_path, stand_ins, reference, name, fault, point, n):
    tool = _tool(name, reference)
    tool.setup(tmp_path)
    out = tmp_path / "out"
    users = with_user_files(out, tool)
    install(fault, point, n, out, stand_ins.setattr)
    code, err = run(tool.argv(out))
    assert code == 128 + getattr(__import__("signal"), fault), err
    assert "Traceback" not in err
    check_folder(out, users)
    stand_ins.undo()
    use_stand_ins(stand_ins.setattr)
    finish(tool, out, users, reference)


@pytest.mark.parametrize("name", list(TOOLS))
@pytest.mark.parametrize("point", ["model", "write"])
def test_sigkill_leaves_no_complete_looking_partial_file_and_resume_completes(tmp_path, reference, stand_ins, name,
                                                                               point):
    tool = _tool(name, reference)
    n = 2 if point == "model" else tool.mid_run_write
    tool.setup(tmp_path)
    out = tmp_path / "out"
    users = with_user_files(out, tool)
    code, err = run_killed(tool, "SIGKILL", point, n, out)
    assert code == -9, err
    check_folder(out, users, killed=True)
    finish(tool, out, users, reference, killed=True)


# -- a full disk, a read-only --out ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TOOLS))
def test_a_full_disk_at_a_write_loses_nothing_and_a_second_run_completes(tmp_path, stand_ins, reference, name):
    tool = _tool(name, reference)
    tool.setup(tmp_path)
    out = tmp_path / "out"
    users = with_user_files(out, tool)
    install("ENOSPC", "write", 4, out, stand_ins.setattr)
    code, err = run(tool.argv(out))
    assert code == 1 and "No space left on device" in err, err  # a failure, said in one line
    assert "Traceback" not in err
    check_folder(out, users)
    stand_ins.undo()
    use_stand_ins(stand_ins.setattr)
    code, err = run(tool.argv(out) + (["--overwrite"] if name in ("train", "eval") else []))
    assert code == 0, err
    check_folder(out, users)
    assert tool.result(out) == reference[tool.name]


@pytest.mark.parametrize("name", list(TOOLS))
def test_a_read_only_out_is_a_usage_error_before_the_model_is_built(tmp_path, stand_ins, reference, name):
    tool = _tool(name, reference)
    tool.setup(tmp_path)
    out = (tmp_path / "out").resolve()
    users = with_user_files(out, tool)
    real_mkstemp = __import__("tempfile").mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # what a read-only file system answers
        if dir is not None and Path(dir).resolve() == out:
            raise OSError(30, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    stand_ins.setattr("tempfile.mkstemp", mkstemp)
    code, err = run(tool.argv(out))
    assert code == 2 and "Read-only file system" in err and "--out" in err, err
    assert BUILDS == []
    check_folder(out, users)
    assert sorted(p.name for p in out.iterdir()) == sorted(users)


# -- the last output ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TOOLS))
def test_a_signal_at_the_last_model_call_finishes_or_resumes_to_the_end(tmp_path, stand_ins, reference, name):
    """SIGTERM during the last model call: the run either finishes (exit 0, never "interrupted") or
    stops with 143 and ``--resume`` (a second run for video) completes it."""
    tool = _tool(name, reference)
    tool.setup(tmp_path)
    out = tmp_path / "out"
    users = with_user_files(out, tool)
    install("SIGTERM", "model", tool.model_calls, out, stand_ins.setattr)
    code, err = run(tool.argv(out))
    check_folder(out, users)
    if code == 0:
        assert "interrupted" not in err.lower() or "finished" in err.lower(), err
        assert tool.result(out) == reference[tool.name]
    else:
        assert code == 143, err
        stand_ins.undo()
        use_stand_ins(stand_ins.setattr)
        finish(tool, out, users, reference)


@pytest.mark.parametrize("name", list(TOOLS))
def test_a_signal_while_the_last_outputs_are_written_finishes_the_run(tmp_path, stand_ins, reference, name):
    """SIGTERM during the writes of the last image, frame, report or checkpoint: they are finished
    and the run ends as finished (exit 0, its summary complete), never "interrupted"."""
    tool = _tool(name, reference)
    tool.setup(tmp_path)
    counted = install("SIGTERM", "write", 0, tmp_path / "counted", stand_ins.setattr)
    assert run(tool.argv(tmp_path / "counted"))[0] == 0
    writes = counted["write"]
    for last in (1, 2):
        out = tmp_path / f"out{last}"
        users = with_user_files(out, tool)
        install("SIGTERM", "write", writes - last + 1, out, stand_ins.setattr)
        code, err = run(tool.argv(out))
        assert code == 0 and "finished before SIGTERM took effect" in err, err
        check_folder(out, users)
        assert tool.result(out) == reference[tool.name]
        if (out / "summary.json").exists():
            assert json.loads((out / "summary.json").read_text())["status"] == "complete"
