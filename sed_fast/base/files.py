"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A reader sees the complete new file or the previous one, never a half-written file; a symbolic
link at the target is replaced itself, not written through; a failed write leaves no temporary file.
:func:`atomic_write_set` does the same for a group of files that belong together.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, List, Mapping, Union

PathLike = Union[str, os.PathLike]


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask  # what open() would give: mkstemp makes files 0600


def atomic_write(path: PathLike, write: Callable, binary: bool = True, fsync: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``
    (with ``fsync``, flushed to disk first). On any error the temporary file is removed and
    ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
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
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{final.name[:64]}.", suffix=".tmp")
            staged.append((tmp, final))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.chmod(tmp, _umask_mode())
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
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
