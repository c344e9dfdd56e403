"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

A reader sees the complete new file or the previous one, never a half-written file; a symbolic
link at the target is replaced itself, not written through; a failed write leaves no temporary file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

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
