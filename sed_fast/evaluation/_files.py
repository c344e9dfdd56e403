"""Atomic file writes: a temporary file in the same folder, then ``os.replace`` (never a half file)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable, binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, flush it to disk, then rename it
    over ``path``. On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))
