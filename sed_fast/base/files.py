"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A reader sees the complete new file or the previous one, never a half-written file; a symbolic
link at the target is replaced itself, not written through; a failed or interrupted write (an
exception, or a signal whose handler raises, as SIGINT's KeyboardInterrupt) leaves no temporary file.
:func:`atomic_write_set` does the same for a group of files that belong together.

Temporary files are named ``.<target name>.<pid>.<random>.tmp``: the owner's process id in the name
lets :func:`remove_stale_temporaries` delete those of a process that no longer runs (killed with
SIGKILL, or a power cut), which nothing else would ever remove.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Union

PathLike = Union[str, os.PathLike]

#: ``.<name>.<pid>.<random>.tmp``: what :func:`_temporary_path` names.
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp$")
_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # what open() would give: mkstemp makes files 0600


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back (they are delivered when the block ends) while a temporary
    file is created or removed, so that a handler that raises cannot leave one without a name to
    remove it by. Where the platform cannot block signals this does nothing."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _temporary_path(folder: Path, target_name: str) -> Path:
    """A new temporary file name for ``target_name`` in ``folder`` (the file is not created)."""
    return Path(folder) / f".{target_name[:64]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _create_temporary(path: Path) -> int:
    """Create ``path`` (which must not exist), readable and writable by its owner only; its file descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)


def _remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: PathLike, write: Callable, binary: bool = True, fsync: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``
    (with ``fsync``, flushed to disk first). On any error, KeyboardInterrupt and SystemExit included,
    the temporary file is removed and ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    tmp = None
    try:
        # The name is known before the file exists: a signal whose handler raises at any point
        # from here on (Python runs handlers between any two steps, and another thread of the
        # process may take a signal that this one holds back) still finds the file to remove.
        tmp = _temporary_path(path.parent, path.name)
        fd = _create_temporary(tmp)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with _signals_deferred():
                _remove_quietly(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False, fsync=fsync)


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def atomic_write_set(folder: PathLike, files: Mapping[str, bytes], fsync: bool = True) -> List[Path]:
    """Write a set of files into ``folder`` all or nothing: every file goes to a temporary file
    first (flushed to disk with ``fsync``); only when all of them are written are they renamed into
    place, in the order given. A failure while writing (a full disk) removes the temporary files
    and leaves every previous file as it was. Renames need no space, so once they start the set
    completes; put the file that describes the others (a manifest with their checksums) last, so
    that a crash between two renames leaves a set whose manifest does not match, which a reader
    can detect. Returns the final paths."""
    folder = Path(folder)
    staged = []  # (temporary, final)
    try:
        for name, data in files.items():
            final = folder / name
            tmp = _temporary_path(folder, final.name)
            staged.append((tmp, final))  # before the file exists (see atomic_write)
            fd = _create_temporary(tmp)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.chmod(tmp, _umask_mode())
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        with _signals_deferred():
            for tmp, _ in staged:
                _remove_quietly(tmp)
        raise
    if fsync:
        _fsync_folder(folder)
    return [final for _, final in staged]


def _fsync_folder(folder: Path) -> None:
    """Flush the folder's entries (the renames) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is one of this module's temporary file names."""
    return _TEMPORARY.match(name) is not None


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid this module wrote: leave the file alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep
    return True


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete the temporary files in ``folder`` (not its sub-folders) left by writers of this module
    whose process no longer runs on this host (the pid in the name is not alive); the temporaries
    of live processes, this one included, and every other file are left alone. Returns what was
    deleted. Meant for a folder that one command owns while it runs (a training run's ``--out``,
    held under its lock): a pid is only meaningful on the host that wrote it."""
    removed: List[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or int(match.group("pid")) == os.getpid():
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or _process_alive(int(match.group("pid"))):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed
