"""The caches sed_fast keeps, found by the names their writers give their files.

Each cache is a folder and the files in it that its writer can be shown to have written:

* ``text``: the text-embedding entries of :mod:`sed_fast.data.text` (``<sha256>.pt`` in torch's file
  format, under ``<cache root>/text``) and the temporary files of interrupted writes;
* ``autotune``: the backend choices of :mod:`sed_fast.kernels.autotune`
  (``backend_choices-<versions>.json`` under ``<cache root>/autotune``) and their temporary files;
* ``extension``: the just-in-time CUDA builds of :mod:`sed_fast.kernels.cuda_extension`, one folder per
  torch / CUDA / architecture tag under ``<cache root>/cuda_ext`` (or ``SED_FAST_CUDA_BUILD_DIR``),
  of which only the files torch's ninja build writes there (``build.ninja``, ``.ninja_log``,
  ``.ninja_deps``, ``lock``, the objects of the extension's sources, ``sed_fast_C.so``) are counted.

Other files under the cache root (a user's own, or another tool's) are never listed nor deleted.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat as stat_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..base.envvars import cache_root, env_value
from ..data import text
from ..kernels import autotune, cuda_extension

KINDS = ("text", "autotune", "extension")


@dataclass
class Entry:
    """One file of a cache: its path, size in bytes, modification time and what it is."""
    path: Path
    size: int
    mtime: float
    what: str = ""
    removable: bool = True  # False: possibly in use (a fresh temporary file, a held build lock)
    why_kept: str = ""


@dataclass
class Cache:
    """A cache kind, its folder and its recognised entries."""
    kind: str
    folder: Path
    entries: List[Entry] = field(default_factory=list)
    note: str = ""  # e.g. "folder set by SED_FAST_CUDA_BUILD_DIR"

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.entries)


@dataclass
class Removal:
    """What :func:`clear` did: files removed with their bytes, files kept (with why), errors."""
    removed: List[Entry] = field(default_factory=list)
    kept: List[Entry] = field(default_factory=list)
    failed: List[Tuple[Entry, str]] = field(default_factory=list)

    @property
    def removed_bytes(self) -> int:
        return sum(entry.size for entry in self.removed)


def _regular_file(path: Path) -> Optional[os.stat_result]:
    """The file's status when it is a regular file (not a link, folder, FIFO ...), else None."""
    try:
        status = path.lstat()
    except OSError:
        return None
    return status if stat_module.S_ISREG(status.st_mode) else None


def _entry(path: Path, what: str = "") -> Optional[Entry]:
    status = _regular_file(path)
    return None if status is None else Entry(path, status.st_size, status.st_mtime, what)


# -- text embeddings ----------------------------------------------------------------------------
def text_cache(describe: bool = False) -> Cache:
    """The text-embedding cache; with ``describe``, each entry says which class name it holds
    (reads every entry)."""
    folder = text.default_cache_dir()
    cache = Cache("text", folder)
    entries, temporaries = text.cache_files(folder)
    for path in entries:
        entry = _entry(path, text.describe_cache_file(path) if describe else "text embeddings")
        if entry is not None:
            cache.entries.append(entry)
    for path in temporaries:
        entry = _entry(path, "temporary file of an interrupted write")
        if entry is not None:
            if not text.stale_temporary(path):
                entry.removable, entry.why_kept = False, "less than an hour old: a writer may still be writing it"
            cache.entries.append(entry)
    return cache


# -- autotune choices ---------------------------------------------------------------------------
def autotune_cache() -> Cache:
    folder = cache_root() / autotune.DISK_CACHE_FOLDER
    cache = Cache("autotune", folder)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return cache
    prefix = autotune.DISK_CACHE_PREFIX
    for name in names:
        if not name.startswith(prefix):
            continue
        stem, _, suffix = name[len(prefix):].rpartition(".")
        if suffix == "json" and stem:
            entry = _entry(folder / name, "backend choices of " + stem)
        elif suffix.startswith("tmp") and suffix[3:].isdigit() and stem:  # written then renamed by one process
            entry = _entry(folder / name, "temporary file of an interrupted write")
        else:
            continue
        if entry is not None:
            cache.entries.append(entry)
    return cache


# -- the just-in-time CUDA build ----------------------------------------------------------------
def _build_files() -> Tuple[str, ...]:
    """The names torch's ninja build of the extension writes into its build folder."""
    objects = []
    for source in cuda_extension.sources():
        stem, suffix = os.path.splitext(os.path.basename(source))
        objects.append(f"{stem}.cuda.o" if suffix == ".cu" else f"{stem}.o")
    return ("build.ninja", ".ninja_log", ".ninja_deps", "lock", "dlink.o", f"{cuda_extension.JIT_NAME}.so", *objects)


def _lock_held(path: Path) -> bool:
    """Whether a process holds torch's build lock file (a build is running)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _build_folder_entries(folder: Path, tag: str) -> List[Entry]:
    """The build files of one build folder; none when the folder has no ``build.ninja`` (then it
    is not a build of ours)."""
    if _regular_file(folder / "build.ninja") is None:
        return []
    held = _lock_held(folder / "lock")
    entries = []
    for name in _build_files():
        entry = _entry(folder / name, f"CUDA extension build {tag}")
        if entry is not None:
            if held:
                entry.removable, entry.why_kept = False, "a build is running (its lock is held)"
            entries.append(entry)
    return entries


def extension_folders() -> Tuple[Path, List[Path], str]:
    """(the folder listed as the extension cache, its build folders, a note). With
    ``SED_FAST_CUDA_BUILD_DIR`` set, that folder is the one build folder."""
    chosen = env_value("SED_FAST_CUDA_BUILD_DIR")
    if chosen is not None:
        return Path(chosen), [Path(chosen)], "set by SED_FAST_CUDA_BUILD_DIR"
    folder = cache_root() / cuda_extension.BUILD_CACHE_FOLDER
    try:
        builds = sorted(path for path in folder.iterdir() if path.is_dir() and not path.is_symlink())
    except OSError:
        builds = []
    return folder, builds, ""


def extension_cache() -> Cache:
    folder, builds, note = extension_folders()
    cache = Cache("extension", folder, note=note)
    for build in builds:
        cache.entries.extend(_build_folder_entries(build, build.name))
    return cache


_FINDERS = {"text": text_cache, "autotune": autotune_cache, "extension": extension_cache}


def find_caches(kinds: Sequence[str] = KINDS, describe: bool = False) -> List[Cache]:
    """The caches of ``kinds`` with their entries, in the order of :data:`KINDS`."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown cache kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    return [text_cache(describe) if kind == "text" else _FINDERS[kind]() for kind in KINDS if kind in kinds]


# -- clearing -----------------------------------------------------------------------------------
def _remove_empty_folders(cache: Cache) -> None:
    """Remove the build folders, then the cache folder, that clearing left empty (never a folder
    the user named, never the cache root)."""
    if cache.kind == "extension" and not cache.note:
        folders = sorted({entry.path.parent for entry in cache.entries}) + [cache.folder]
    elif cache.kind in ("text", "autotune"):
        folders = [cache.folder]
    else:
        return
    for folder in folders:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            pass


def clear(caches: Sequence[Cache], dry_run: bool = False) -> Removal:
    """Delete the removable entries of ``caches`` (re-checked as regular files just before);
    with ``dry_run`` only say what would go."""
    result = Removal()
    for cache in caches:
        for entry in cache.entries:
            if not entry.removable:
                result.kept.append(entry)
                continue
            if _regular_file(entry.path) is None:
                continue  # gone meanwhile (another process evicted it) or replaced by something else
            if dry_run:
                result.removed.append(entry)
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as error:
                result.failed.append((entry, error.strerror or str(error)))
                continue
            result.removed.append(entry)
        if not dry_run:
            _remove_empty_folders(cache)
    return result


def totals(caches: Sequence[Cache]) -> Dict[str, int]:
    return {cache.kind: cache.size for cache in caches}
