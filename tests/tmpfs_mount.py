"""Real small file systems for the fault tests: a tmpfs mounted on a test's folder, when allowed.

Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped and the reason printed. Each
mount is private to its test folder and always unmounted afterwards.
"""
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _run(*argv):
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


def _skip(reason: str):
    print(f"SKIPPED: {reason}")  # shown with -s / in the captured output, as well as with -rs
    pytest.skip(reason)


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int = 1024):
    """Mount a tmpfs of ``size_kib`` KiB on ``path`` (created if needed); yields ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _skip(f"mounting a tmpfs needs root; running as uid {getattr(os, 'geteuid', lambda: '?')()}")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        _skip("no mount/umount command on this machine")
    done = _run("mount", "-t", "tmpfs", "-o", f"size={int(size_kib)}k,mode=0755", "tmpfs", str(path))
    if done.returncode != 0:
        _skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield path
    finally:
        _run("mount", "-o", "remount,rw", str(path))
        undone = _run("umount", str(path))
        if undone.returncode != 0:
            _run("umount", "-l", str(path))


def remount(path: Path, readonly: bool) -> None:
    """Make the tmpfs on ``path`` read-only (or writable again), keeping its files."""
    done = _run("mount", "-o", "remount," + ("ro" if readonly else "rw"), str(path))
    assert done.returncode == 0, done.stderr


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """Fill the file system of ``path`` with one file until about ``leave_bytes`` are free
    (0: until a write fails for lack of space). Returns the filler (delete it to free the space)."""
    filler = Path(path) / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            free = shutil.disk_usage(path).free
            if free <= leave_bytes:
                break
            try:
                if os.write(fd, b"\0" * max(1, min(1 << 16, free - leave_bytes))) == 0:
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    return filler
