"""Output folders under contention and faults: the folder lock (real concurrent and killed
processes), a read-only and a full file system (a real tmpfs where the machine allows it), the
all-or-nothing file set, `segment`'s summary after a kill or a full disk, checkpoint identity by
content, the `module.` prefix hint."""
import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sed_fast.data.checkpoint as checkpoint_mod
import sed_fast.toolkit.outdir_lock as lock_mod
from sed_fast import cli
from sed_fast.segment import cli as segment_cli
from sed_fast.data.checkpoint import CheckpointError, check_state_dict, checkpoint_sha256, file_identity
from sed_fast.base.files import atomic_write_set
from sed_fast.toolkit.outdir_lock import LOCK_NAME, OutputDirBusy, OutputDirError, exclusive_output_dir, holder
from tmpfs_mount import fill, remount, tmpfs

ROOT = Path(__file__).resolve().parents[1]
FAKE_ARGS = ["--vocab", "cat,dog", "--random-weights", "--resolution", "64", "--impl", "reference",
             "--device", "cpu", "--quiet"]

# Holds a folder's lock in a separate process until its stdin closes; loads the lock module by its
# file alone (no torch import: starts in a fraction of a second).
_HOLDER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("outdir_lock", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with module.exclusive_output_dir(sys.argv[2], "the test's holder") as lock:
        print("locked", flush=True)
        sys.stdin.readline()
""")


@contextlib.contextmanager
def holding(folder: Path):
    """A real other process holding ``folder``; yields its Popen."""
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, lock_mod.__file__, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "locked", child.stderr.read()
        yield child
    finally:
        if child.poll() is None:
            child.stdin.close()
            child.wait(timeout=60)


def _images(folder: Path, count: int, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"img{i:03d}.png")
    return folder


def run_main(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


# -- the lock --------------------------------------------------------------------------------------
def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with holding(out) as child:
        with pytest.raises(OutputDirBusy, match=rf"PID {child.pid} ") as refused:
            with exclusive_output_dir(out, "second"):
                pass
        assert refused.value.holder["pid"] == child.pid and "the test's holder" in str(refused.value)
        assert holder(out)["held"] is True and holder(out)["pid"] == child.pid
    assert child.returncode == 0 and holder(out) is None  # released: the lock file is gone
    with exclusive_output_dir(out, "third") as lock:  # free again
        assert lock.previous is None and holder(out)["pid"] == os.getpid()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    with holding(out) as child:
        child.kill()  # SIGKILL: no clean-up; the kernel drops its flock
        child.wait(timeout=60)
    left = holder(out)
    assert left["pid"] == child.pid and left["held"] is False
    with exclusive_output_dir(out, "after the kill") as lock:
        assert lock.previous["pid"] == child.pid
        assert holder(out)["pid"] == os.getpid() and holder(out)["held"] is True
    assert not (out / LOCK_NAME).exists()


def test_without_flock_the_lock_falls_back_to_exclusive_creation(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = lock_mod.socket.gethostname()
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": host, "command": "gone"}))
    with exclusive_output_dir(out, "fallback") as lock:  # a dead process of this host: taken over
        assert lock.previous["pid"] == int(dead.stdout) and not lock.uses_flock
        with pytest.raises(OutputDirBusy, match=rf"PID {os.getpid()} "):
            with exclusive_output_dir(out, "second"):
                pass
        assert holder(out)["held"] is True
    assert not (out / LOCK_NAME).exists()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host", "command": "elsewhere"}))
    with pytest.raises(OutputDirBusy, match="another-host") as refused:
        with exclusive_output_dir(out, "third"):
            pass
    assert f"delete {out / LOCK_NAME}" in str(refused.value)


def test_segment_into_a_held_folder_exits_2_naming_the_pid(tmp_path, fake_build):
    out = tmp_path / "out"
    with holding(out) as child:
        code, err = run_main(["segment", _images(tmp_path / "in", 1), *FAKE_ARGS, "--out", out])
    assert code == 2 and f"PID {child.pid}" in err and "--out" in err and "Traceback" not in err
    assert fake_build == []  # refused before the model is built
    assert not (out / "summary.json").exists()


def test_segment_of_a_video_into_a_held_folder_exits_2_naming_the_pid(tmp_path, fake_build):
    out = tmp_path / "out"
    with holding(out) as child:  # refused before the video is even opened
        code, err = run_main(["segment", tmp_path / "clip.mp4", *FAKE_ARGS, "--out", out])
    assert code == 2 and f"PID {child.pid}" in err and "--out" in err and "Traceback" not in err, err
    assert fake_build == []


# -- a read-only and a full file system -------------------------------------------------------------
def test_segment_on_a_read_only_file_system_exits_2_before_the_model(tmp_path, fake_build):
    with tmpfs(tmp_path / "ro", 256) as out:
        (out / "old.txt").write_text("kept")
        remount(out, readonly=True)
        code, err = run_main(["segment", _images(tmp_path / "in", 1), *FAKE_ARGS, "--out", out])
        assert code == 2 and "cannot write" in err and "Read-only file system" in err, err
        assert fake_build == [] and sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_segment_with_too_little_space_exits_2_before_the_model(tmp_path, fake_build):
    with tmpfs(tmp_path / "small", 128) as out:  # under the margin kept for the small files
        code, err = run_main(["segment", _images(tmp_path / "in", 1), *FAKE_ARGS, "--out", out])
        assert code == 2 and "free" in err and "needs about" in err, err
        assert fake_build == [] and list(out.iterdir()) == []


def test_segment_on_a_disk_that_fills_leaves_a_final_summary(tmp_path, fake_build, monkeypatch):
    """The disk fills completely after the first image: the second image fails, so does the summary's
    rewrite after it, and the run stops; summary.json says so, overwritten in place (there is no
    room for a new file), never "running"."""
    real = segment_cli._write_outputs
    calls = []

    def write_outputs(output, item, result, args, random_weights):
        calls.append(item)
        if len(calls) == 2:
            fill(output.folder)  # every block taken
        return real(output, item, result, args, random_weights)

    monkeypatch.setattr(segment_cli, "_write_outputs", write_outputs)
    with tmpfs(tmp_path / "full", 2048) as out:
        code, err = run_main(["segment", _images(tmp_path / "in", 4), *FAKE_ARGS, "--out", out])
        assert code == 1 and "No space left" in err and "Traceback" not in err, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["exit_code"] == 1, (err, summary)
        assert "No space left" in summary["error"]
        assert "No space left" in summary["summary_error"] and summary["images"] is None
        assert summary["pid"] == os.getpid() and summary["num_ok"] == 1
        assert segment_cli.read_summary(out)["status"] == summary["status"]
        names = sorted(p.name for p in out.iterdir())
        assert not [n for n in names if n.endswith(".tmp")] and LOCK_NAME not in names, names
        with Image.open(out / "img000_labels.png") as image:  # the first image's files are whole
            image.load()


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import sed_fast.api
    from sed_fast import cli

    calls = []

    class Fake:
        device = torch.device("cpu")
        random_weights = True
        def set_vocabulary(self, names, progress=None):
            self.class_names = list(names)
            return self.class_names
        def predict_labels(self, images):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return [torch.randint(0, len(self.class_names), image.shape[-2:]) for image in images]

    sed_fast.api.build_sed = lambda variant, **kwargs: Fake()
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_killed_segment_run_reads_as_interrupted_and_its_folder_is_taken_over(tmp_path, fake_build):
    folder = _images(tmp_path / "in", 4)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, "segment", str(folder), *FAKE_ARGS, "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["status"] == "running" and on_disk["num_images"] == 2  # nothing could finish it
    assert holder(out)["held"] is False and holder(out)["pid"] == on_disk["pid"]
    read = segment_cli.read_summary(out / "summary.json")
    assert read["status"] == "interrupted" and read["exit_code"] is None and str(on_disk["pid"]) in read["note"]
    code, err = run_main(["segment", folder, *FAKE_ARGS, "--out", out])  # the stale lock is no obstacle
    assert code == 0, err
    assert segment_cli.read_summary(out)["status"] == "complete" and not (out / LOCK_NAME).exists()


def test_read_summary_of_a_live_run_says_running(tmp_path):
    out = tmp_path / "out"
    with holding(out) as child:
        (out / "summary.json").write_text(json.dumps({"status": "running", "pid": child.pid,
                                                      "host": lock_mod.socket.gethostname()}))
        assert segment_cli.read_summary(out)["status"] == "running"
    assert segment_cli.read_summary(out)["status"] == "interrupted"  # it ended without finishing the summary


# -- all-or-nothing file sets --------------------------------------------------------------------
def test_a_file_set_on_a_full_disk_keeps_the_previous_set(tmp_path):
    with tmpfs(tmp_path / "fs", 256) as out:
        first = {"a.bin": b"a" * 5000, "b.bin": b"b" * 5000, "manifest.json": b"{}"}
        atomic_write_set(out, first)
        filler = fill(out, leave_bytes=8192)  # room for one new file of the set, not for all
        with pytest.raises(OSError) as error:
            atomic_write_set(out, {"a.bin": b"A" * 6000, "b.bin": b"B" * 6000, "manifest.json": b"{1}"})
        assert error.value.errno == errno.ENOSPC
        assert {p.name: p.read_bytes() for p in out.iterdir() if p != filler} == first  # no .tmp either
        filler.unlink()
        atomic_write_set(out, {"a.bin": b"A", "manifest.json": b"{2}"})
        assert (out / "a.bin").read_bytes() == b"A" and (out / "b.bin").read_bytes() == b"b" * 5000


# -- checkpoints by content ------------------------------------------------------------------------
def test_checkpoint_sha256_sees_content_copied_over_with_the_same_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_mod, "REHASH_BYTES", 0)  # use the cache even for this small file
    streamed = []
    real = checkpoint_mod._stream_sha256
    monkeypatch.setattr(checkpoint_mod, "_stream_sha256", lambda path: streamed.append(path) or real(path))
    path = tmp_path / "model.pth"
    path.write_bytes(b"first model " * 100)
    digest = checkpoint_sha256(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and len(streamed) == 1
    assert checkpoint_sha256(path) == digest and len(streamed) == 1  # cached: not read again
    cache = json.loads((checkpoint_mod.cache_root() / "checkpoint_sha256.json").read_text())
    assert cache[str(path.resolve())]["sha256"] == digest
    before = path.stat()
    time.sleep(0.01)  # a change time the file system can tell apart
    path.write_bytes(b"other model " * 100)  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same modification time
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert file_identity(path)["ctime_ns"] != before.st_ctime_ns
    assert checkpoint_sha256(path) == hashlib.sha256(b"other model " * 100).hexdigest() and len(streamed) == 2


def test_small_checkpoints_are_hashed_every_time(tmp_path, monkeypatch):
    streamed = []
    real = checkpoint_mod._stream_sha256
    monkeypatch.setattr(checkpoint_mod, "_stream_sha256", lambda path: streamed.append(path) or real(path))
    path = tmp_path / "small.pth"
    path.write_bytes(b"x" * 100)
    checkpoint_sha256(path)
    checkpoint_sha256(path)
    assert len(streamed) == 2


def test_module_prefixed_keys_get_the_hint_to_strip_it():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"every key starts with 'module\.'.*removeprefix"):
        check_state_dict(model, state)
    other = {f"module.x{k}": v for k, v in model.state_dict().items()}  # not the model's keys under it
    with pytest.raises(CheckpointError) as error:
        check_state_dict(model, other)
    assert "removeprefix" not in str(error.value)


def test_output_dir_errors_are_one_class(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="not a folder"):
        with exclusive_output_dir(blocker, "x"):
            pass
