"""Temporary files of atomic writes: named after their owner, removed on every exit path that runs
Python code (errors, signals whose handler raises), and removable by the next run when the owner
was killed outright."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sed_fast.base.files import (atomic_write, atomic_write_set, is_temporary_name,
                                 remove_stale_temporaries)

ROOT = Path(__file__).resolve().parents[2]


def test_temporary_name_carries_the_pid(tmp_path):
    seen = []

    def write(handle):
        seen.extend(p.name for p in tmp_path.iterdir())
        handle.write(b"new")

    atomic_write(tmp_path / "model_final.pth", write)
    assert len(seen) == 1 and is_temporary_name(seen[0])
    assert seen[0].startswith(f".model_final.pth.{os.getpid()}.") and seen[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["model_final.pth"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_write_removes_the_temporary(tmp_path, signum):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")

    class Stop(Exception):
        pass

    def raising(*_):
        raise Stop

    previous = signal.signal(signum, raising)
    try:
        def write(handle):
            handle.write(b"partial" * 1000)
            os.kill(os.getpid(), signum)  # the handler raises here, in the middle of the write
            time.sleep(1)
            handle.write(b"never")

        with pytest.raises(Stop):
            atomic_write(target, write)
        with pytest.raises(Stop):
            atomic_write(tmp_path / "new.pth", write)  # a new target: nothing at all is left
    finally:
        signal.signal(signum, previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
    assert target.read_bytes() == b"old"


def test_a_failed_set_leaves_no_temporary(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_set(tmp_path, {"a.bin": b"a", "b.bin": "not bytes"}, fsync=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_stale_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    # A writer killed outright (SIGKILL: no Python code runs) leaves its temporary behind.
    script = ("import sys, time\n"
              "from sed_fast.base.files import atomic_write\n"
              "def write(f):\n"
              "    f.write(b'x' * 4096); f.flush(); print('writing', flush=True); time.sleep(60)\n"
              "atomic_write(sys.argv[1], write)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "model_0000009.pth")], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait(timeout=30)
    left = [p for p in tmp_path.iterdir() if is_temporary_name(p.name)]
    assert len(left) == 1 and f".{child.pid}." in left[0].name

    # A live owner's temporary (this process's, and the parent's), user files and look-alikes stay.
    mine = tmp_path / f".model_final.pth.{os.getpid()}.abcd1234.tmp"
    parent = tmp_path / f".log.txt.{os.getppid()}.abcd1234.tmp"
    user = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "model_final.pth"]
    for path in [mine, parent, *user]:
        path.write_bytes(b"keep")
    sub = tmp_path / "sub"
    sub.mkdir()
    nested = sub / left[0].name
    nested.write_bytes(b"keep")  # only the folder given, not its sub-folders

    assert remove_stale_temporaries(tmp_path) == [left[0]]
    assert not left[0].exists()
    assert all(p.read_bytes() == b"keep" for p in [mine, parent, nested, *user])
    assert remove_stale_temporaries(tmp_path) == []
    assert remove_stale_temporaries(tmp_path / "missing") == []
