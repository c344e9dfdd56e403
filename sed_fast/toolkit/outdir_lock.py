"""One run at a time per output folder, and a folder that can take the run's files, checked up front.

    with exclusive_output_dir(out, "eval ade150", need_bytes=state_bytes) as lock:
        ...  # write into out; a second run into out fails at once with OutputDirBusy

:func:`exclusive_output_dir` creates the folder if needed, checks that a file can be created in it
and that ``need_bytes`` (plus a small margin) are free, then takes an exclusive ``flock`` on
``<out>/.sed_fast.lock`` and writes the holder's PID, host, command and start time into it (read
by :func:`holder`). The kernel releases a ``flock`` when its process dies, however it dies, so a
lock file left by a killed run is simply taken over (``lock.previous`` says whose it was). On
file systems without ``flock`` (some NFS set-ups refuse it) the lock falls back to creating the
file exclusively: a file left by a dead process of this host is taken over; one from another host
cannot be checked and is reported, with the file to delete once that run is known to be over.

Errors are :class:`OutputDirError` (not writable, no space, not a folder) and its subclass
:class:`OutputDirBusy` (another run holds the folder; its message names the holder's PID); the
command-line tools turn both into exit code 2 before any model is built.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: only the exclusive-create fallback
    fcntl = None

__all__ = ["LOCK_NAME", "OutputDirError", "OutputDirBusy", "OutputDirLock", "exclusive_output_dir", "holder",
           "check_writable", "check_free_space", "pid_alive"]

LOCK_NAME = ".sed_fast.lock"
#: Free space asked for beyond ``need_bytes``: the small files (summaries, logs, the lock itself).
MARGIN_BYTES = 256 << 10
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}

PathLike = Union[str, os.PathLike]


class OutputDirError(Exception):
    """The output folder cannot take this run's files (created, written, enough space)."""


class OutputDirBusy(OutputDirError):
    """Another run holds the output folder; ``holder`` is what it wrote in the lock file (or None)."""

    def __init__(self, message: str, holder: Optional[dict] = None):
        super().__init__(message)
        self.holder = holder


class OutputDirLock:
    """A held lock: ``folder``, ``path`` (the lock file), ``info`` (what it says about this run),
    ``previous`` (the lock file's content when a dead run's lock was taken over, else None)."""

    def __init__(self, folder: Path, path: Path, info: dict, previous: Optional[dict], fd: Optional[int],
                 uses_flock: bool):
        self.folder, self.path, self.info, self.previous = folder, path, info, previous
        self._fd, self.uses_flock = fd, uses_flock
        self.released = False

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order: a run that locks the file in
        between finds it removed and starts over on a new one, see :func:`_take_flock`)."""
        if self.released:
            return
        self.released = True
        try:
            mine = _same_file(self.path, self._fd) if self._fd is not None else _holder_is_me(self.path)
            if mine:
                os.unlink(self.path)
        except OSError:
            pass
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _describe(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def pid_alive(pid) -> Optional[bool]:
    """Whether process ``pid`` exists on this host (None: cannot tell)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return None
    return True


def check_writable(folder: PathLike) -> None:
    """Raise :class:`OutputDirError` unless a file can be created (and removed) in ``folder``
    (a read-only file system, missing permission; the probe also works as root, unlike ``os.access``)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sed_fast_probe_", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as error:
        raise OutputDirError(f"cannot write in the output folder {folder} ({_describe(error)}): make it writable "
                             "or choose another output folder") from error


def check_free_space(folder: PathLike, need_bytes: int) -> None:
    """Raise :class:`OutputDirError` unless ``need_bytes`` plus :data:`MARGIN_BYTES` are free in ``folder``."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # cannot tell: the writes themselves will say
        return
    need = int(need_bytes) + MARGIN_BYTES
    if free < need:
        raise OutputDirError(f"the output folder {folder} has {_size(free)} free, this run needs about "
                             f"{_size(need)}: free some space or choose another output folder")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _read_info(path: Path) -> Optional[dict]:
    try:
        text = path.read_text(encoding="utf-8")
        info = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _same_file(path: Path, fd: int) -> bool:
    try:
        here, there = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder_is_me(path: Path) -> bool:
    info = _read_info(path)
    return bool(info) and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()


def holder(folder: PathLike) -> Optional[dict]:
    """Who holds ``folder``'s lock: the lock file's ``pid``, ``host``, ``command``, ``started_at``
    and ``held`` (True: the lock is held now; False: the file is left by a run that is over, or
    is being written; None: cannot tell, e.g. another host's run without ``flock``). None when
    there is no lock file. (The test takes a shared lock for an instant; a run starting then
    retries for a moment before it calls the folder busy.)"""
    path = Path(folder) / LOCK_NAME
    if not path.exists():
        return None
    info = _read_info(path) or {}
    held = None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                held = False
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError as error:
                held = True if error.errno in _BUSY else None
            finally:
                os.close(fd)
    if info.get("lock") == "exclusive-create" or held is None:  # no flock to test: the PID, on this host
        held = pid_alive(info.get("pid")) if info.get("host") == socket.gethostname() else None
    return dict(info, held=held)


def _busy_message(folder: Path, info: Optional[dict], hint: str = "") -> str:
    if info and info.get("pid") is not None:
        who = f"PID {info['pid']} on {info.get('host', '?')}"
        what = f" ({info['command']}, since {info.get('started_at', '?')})" if info.get("command") else ""
    else:
        who, what = "another process", " (it has not written its PID yet)"
    return (f"the output folder {folder} is in use by another sed-fast run: {who}{what}. Wait for it to "
            f"finish, stop it, or choose another output folder{hint}")


def _wait_for_info(path: Path, attempts: int = 20) -> Optional[dict]:
    """The holder's info; a run that has just taken the lock writes it a moment later."""
    for _ in range(attempts):
        info = _read_info(path)
        if info and info.get("pid") is not None:
            return info
        time.sleep(0.025)
    return _read_info(path)


def _flock_briefly(fd: int, attempts: int = 5) -> None:
    """``flock(LOCK_EX)`` without waiting on a real holder: a few quick retries ride out a
    :func:`holder` check's instant shared lock."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in _BUSY or attempt == attempts - 1:
                raise
            time.sleep(0.02)


def _take_flock(folder: Path, path: Path) -> Optional[tuple]:
    """(fd, previous info) with the flock held on the file now at ``path``; None if flock is not
    supported here. Raises :class:`OutputDirBusy` when another process holds it."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputDirError(f"cannot create the lock file {path} ({_describe(error)}): make the output "
                                 "folder writable or choose another") from error
        try:
            _flock_briefly(fd)
        except OSError as error:
            os.close(fd)
            if error.errno in _NO_FLOCK:
                return None
            if error.errno in _BUSY:
                info = _wait_for_info(path)
                raise OutputDirBusy(_busy_message(folder, info), info) from None
            raise OutputDirError(f"cannot lock {path} ({_describe(error)})") from error
        if _same_file(path, fd):  # not a file its previous holder removed meanwhile
            previous = _read_info(path)
            return fd, previous
        os.close(fd)
    raise OutputDirError(f"cannot lock {path}: the lock file keeps being replaced")


def _take_exclusive_create(folder: Path, path: Path, info: dict) -> Optional[dict]:
    """The lock without flock: create the file exclusively; a dead local holder's file is taken
    over. Returns the previous holder's info (taken over) or None."""
    previous = None
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            found = _wait_for_info(path, attempts=4) or {}
            local = found.get("host") == socket.gethostname()
            if local and found.get("pid") is not None and pid_alive(found["pid"]) is False:
                previous = found
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its process is gone
                continue
            hint = "" if local else (f" (its host cannot be checked from here: if that run is over, delete "
                                     f"{path})")
            raise OutputDirBusy(_busy_message(folder, found or None, hint), found or None) from None
        except OSError as error:
            raise OutputDirError(f"cannot create the lock file {path} ({_describe(error)}): make the output "
                                 "folder writable or choose another") from error
        try:
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        finally:
            os.close(fd)
        return previous
    raise OutputDirError(f"cannot lock {path}: the lock file keeps being replaced")


def _write_info(fd: int, info: dict) -> None:
    data = (json.dumps(info) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


@contextlib.contextmanager
def exclusive_output_dir(path: PathLike, command: str, need_bytes: int = 0) -> Iterator[OutputDirLock]:
    """Hold ``path`` (created if needed) for this run: checks it can be written and has
    ``need_bytes`` (+ a margin) free, takes the lock, yields an :class:`OutputDirLock`, and
    releases it (removing the lock file) when the block ends. Raises :class:`OutputDirError` /
    :class:`OutputDirBusy` before the block runs."""
    folder = Path(os.path.expanduser(str(path)))
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"the output path {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"cannot create the output folder {folder} ({_describe(error)})") from error
    if not folder.is_dir():
        raise OutputDirError(f"the output path {folder} is not a folder")
    check_writable(folder)
    lock_path = folder / LOCK_NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": str(command), "started_at": _now(),
            "argv": list(sys.argv)}
    taken = _take_flock(folder, lock_path) if fcntl is not None else None
    if taken is not None:
        fd, previous = taken
        try:
            _write_info(fd, dict(info, lock="flock"))
        except OSError as error:
            os.close(fd)
            raise OutputDirError(f"cannot write the lock file {lock_path} ({_describe(error)}): the output "
                                 "folder is full or not writable") from error
        lock = OutputDirLock(folder, lock_path, dict(info, lock="flock"), previous, fd, True)
    else:
        info["lock"] = "exclusive-create"
        previous = _take_exclusive_create(folder, lock_path, info)
        lock = OutputDirLock(folder, lock_path, info, previous, None, False)
    try:
        check_free_space(folder, need_bytes)  # after the lock: a busy folder says so first
        yield lock
    finally:
        lock.release()
