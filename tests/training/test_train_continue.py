"""Checkpoints as a user expects (``--keep-last``, one resumable state, nothing else deleted),
continuing a finished run (``--init-from``), and stale temporary files of a killed run."""
import json
import os
import signal
import subprocess
import sys

import torch

from train_synthetic import CLASSES, tiny_build, write_dataset  # noqa: F401 - CLASSES for the args
from sed_fast.training import cli as train_cli

import pytest


# The --out ownership claim and the run record, written by every run (sed_fast.toolkit).
KIT_FILES = (".sed_fast_outputs.json", "run.json")


def _args(images, labels, out, *extra):
    return ["--images", str(images), "--labels", str(labels), "--vocab", ",".join(CLASSES), "--ignore", "255",
            "--random-weights", "--resolution", "64", "--crop-size", "32", "--min-size-train", "40",
            "--size-divisibility", "32", "--impl", "reference", "--device", "cpu", "--workers", "0",
            "--progress-every", "0", "--no-plot", "--quiet", "--base-lr", "1e-2", "--clip-multiplier", "1",
            "--ims-per-batch", "1", "--out", str(out), *extra]


def _without_random(args):
    return [a for a in args if a != "--random-weights"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("continue_data"), count=2)


@pytest.fixture
def tiny(monkeypatch):
    tiny_build(monkeypatch)


def test_keep_last_deletes_only_the_runs_own_checkpoints(tmp_path, data, tiny):
    out = tmp_path / "out"
    out.mkdir()
    user = {"sed_b_official.pth": b"the user's checkpoint", "notes.txt": b"the user's notes",
            "model_0000002.pth.bak": b"a look-alike"}
    for name, content in user.items():
        (out / name).write_bytes(content)
    assert train_cli.main(_args(*data, out, "--max-iter", "6", "--save-every", "1", "--keep-last", "3")) == 0
    names = sorted(p.name for p in out.iterdir() if p.name not in KIT_FILES)
    assert [n for n in names if n not in user] == ["last_checkpoint", "log.txt", "metrics.jsonl", "model_0000003.pth",
                                                   "model_0000004.pth", "model_final.pth", "model_final.pth.state.pt"]
    assert all((out / n).read_bytes() == c for n, c in user.items())
    # Starting over removes what the earlier run recorded as its own, and only that.
    assert train_cli.main(_args(*data, out, "--max-iter", "2", "--save-every", "0", "--overwrite")) == 0
    assert sorted(p.name for p in out.glob("model_*.pth*")) == ["model_0000002.pth.bak",
                                                                "model_final.pth", "model_final.pth.state.pt"]
    assert all((out / n).read_bytes() == c for n, c in user.items())


def test_keep_last_must_keep_one(tmp_path, data, tiny, capsys):
    assert train_cli.main(_args(*data, tmp_path / "out", "--max-iter", "2", "--keep-last", "0")) == 2
    assert "--keep-last must be >= 1" in capsys.readouterr().err


def _stop_after(monkeypatch, iterations):
    """SIGINT to this process during iteration ``iterations`` (from 1): the run saves and stops after it."""
    from sed_fast.training import loop

    calls = []
    real = loop._compute_losses

    def counting(model, images, labels, ignore_value):
        calls.append(1)
        if len(calls) == iterations:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, images, labels, ignore_value)

    monkeypatch.setattr(loop, "_compute_losses", counting)


def test_a_finished_run_continues_with_init_from(tmp_path, data, tiny, monkeypatch, capsys):
    first = tmp_path / "first"
    assert train_cli.main(_args(*data, first, "--max-iter", "4", "--save-every", "0")) == 0
    final = _weights(first / "model_final.pth")
    assert set(final) == {"model", "iteration"}  # weights only: loads wherever a checkpoint does
    capsys.readouterr()

    # --resume with a longer schedule is refused, naming the way to go on.
    assert train_cli.main(_args(*data, first, "--max-iter", "8", "--save-every", "0", "--resume")) == 2
    message = capsys.readouterr().err
    assert "finished after 4 iterations" in message and f"--init-from {first / 'model_final.pth'}" in message
    assert sorted(p.name for p in first.glob("model_*")) == ["model_final.pth", "model_final.pth.state.pt"]

    # The documented way: a new run from its weights, with a new schedule, saying so in its log and state.
    more = tmp_path / "more"
    args = _without_random(_args(*data, more, "--max-iter", "3", "--save-every", "0", "--init-from", str(first)))
    assert train_cli.main(args) == 0
    log = (more / "log.txt").read_text()
    assert f"a new run continuing from {(first / 'model_final.pth').resolve()}, after 4 iterations" in log
    assert "cosine schedule from --base-lr 0.01 over 3 iterations" in log
    state = _weights(more / "model_final.pth.state.pt")
    assert state["settings"]["init_from"].startswith(str((first / "model_final.pth").resolve()))
    records = [json.loads(x) for x in (more / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2] and records[0]["lr"] == pytest.approx(1e-2)
    # It starts from the finished run's weights: the same steps as --checkpoint on that file.
    same = tmp_path / "same"
    assert train_cli.main(_without_random(_args(*data, same, "--max-iter", "3", "--save-every", "0", "--checkpoint",
                                                str(first / "model_final.pth")))) == 0
    a, b = _weights(more / "model_final.pth")["model"], _weights(same / "model_final.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], final["model"][k]) for k in a)  # and it trained
    assert _weights(first / "model_final.pth")["iteration"] == 3  # the finished run is untouched

    # An interrupted continuation resumes with the same command plus --resume, bit for bit.
    stopped = tmp_path / "stopped"
    args = _without_random(_args(*data, stopped, "--max-iter", "3", "--save-every", "0", "--init-from", str(first)))
    _stop_after(monkeypatch, 2)
    assert train_cli.main(args) == 128 + signal.SIGINT
    assert "--resume to run iteration 3 (1 left)" in capsys.readouterr().err
    monkeypatch.undo()
    tiny_build(monkeypatch)
    assert train_cli.main(args + ["--resume"]) == 0
    c = _weights(stopped / "model_final.pth")["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_init_from_refuses_what_would_overwrite_or_mix(tmp_path, data, tiny, capsys):
    first = tmp_path / "first"
    assert train_cli.main(_args(*data, first, "--max-iter", "1", "--save-every", "0")) == 0
    capsys.readouterr()
    base = _without_random(_args(*data, first, "--max-iter", "2", "--init-from", str(first)))
    assert train_cli.main(base) == 2
    assert "another --out" in capsys.readouterr().err
    assert train_cli.main(_args(*data, tmp_path / "x", "--max-iter", "2", "--init-from", str(first))) == 2
    assert "--init-from and --random-weights exclude each other" in capsys.readouterr().err
    assert train_cli.main(_without_random(_args(*data, tmp_path / "y", "--max-iter", "2",
                                                "--init-from", str(tmp_path / "missing")))) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_run_removes_temporaries_a_killed_run_left(tmp_path, data, tiny):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".model_0000009.pth.{dead.pid}.k2j4h5g6.tmp"
    alive = out / f".model_0000009.pth.{os.getppid()}.k2j4h5g6.tmp"
    stale.write_bytes(b"half a checkpoint")
    alive.write_bytes(b"someone else's write in progress")
    assert train_cli.main(_args(*data, out, "--max-iter", "1", "--save-every", "0")) == 0
    assert not stale.exists() and alive.exists()
    assert f"removed 1 temporary file(s) left by an interrupted earlier run: {stale.name}" in \
        (out / "log.txt").read_text()


def test_a_second_signal_during_a_checkpoint_write_leaves_no_temporary(tmp_path, data, tiny, monkeypatch, capsys):
    """The first SIGINT asks for a stop, the second raises in the middle of writing a checkpoint:
    the half-written temporary is removed, the previous checkpoint stands and the message says what
    --resume will run."""
    from sed_fast.base import files
    from sed_fast.training import state

    def interrupted(path, data, fsync=False):
        def write(handle):
            handle.write(data[: len(data) // 2])
            if path.name == "model_0000001.pth":
                os.kill(os.getpid(), signal.SIGINT)  # stop after this iteration
                os.kill(os.getpid(), signal.SIGINT)  # stop now
            handle.write(data[len(data) // 2:])
        return files.atomic_write(path, write, fsync=fsync)

    monkeypatch.setattr(state, "atomic_write_bytes", interrupted)
    out = tmp_path / "out"
    assert train_cli.main(_args(*data, out, "--max-iter", "3", "--save-every", "1")) == 130
    message = capsys.readouterr().err
    assert "model_0000000.pth, after 1 of 3 iterations" in message and "--resume to run iterations 2-3" in message
    names = sorted(p.name for p in out.iterdir() if p.name not in KIT_FILES)
    assert names == ["last_checkpoint", "log.txt", "metrics.jsonl", "model_0000000.pth", "model_0000000.pth.state.pt"]
    assert (out / "last_checkpoint").read_text().strip() == "model_0000000.pth"
