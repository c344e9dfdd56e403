"""The ``--out`` rule: a command deletes or overwrites only files it can prove it wrote.

Proof is a claim the command writes into the folder (``.sed_fast_outputs.json``) before its first
output: the command's name, the name patterns of its outputs, and the files that were already in
the folder at that moment. A file is the command's when its name matches one of the patterns and it
was not there when the claim was made. Anything else in ``--out`` is the user's: it is left alone,
and where the command would write over it, the command refuses and names the file
(:class:`~sed_fast.toolkit.errors.UsageError`, exit code 2).
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

from ..base.files import atomic_write
from .errors import UsageError

CLAIM_NAME = ".sed_fast_outputs.json"


class OutputFolder:
    """Writes files into ``folder`` atomically: a temporary file in the same folder, renamed over
    the target (which replaces the target itself, also when it is a symbolic link)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def probe(self) -> None:
        """Raise OSError unless a file can be created (and removed) in the folder."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".sed_fast_probe_", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)

    def write(self, name: str, save: Callable) -> Path:
        """``save(binary_file)`` writes the content; returns the final path."""
        return atomic_write(self.folder / name, save)

    def write_json(self, name: str, data) -> Path:
        # backslashreplace: a path with undecodable bytes (surrogate escapes) becomes a \udcXX escape
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        return self.write(name, lambda handle: handle.write(text.encode("utf-8", "backslashreplace")))


class OutputClaim:
    """What ``command`` owns in ``folder``: the files matching ``patterns`` that were not in the
    folder when the command first claimed it. ``legacy_owned(name)`` says which files a run of an
    older sed-fast (one without a claim file) provably wrote; ``confirm(name)``, when given, must
    also hold for a file to be the command's (a checkpoint has its training state beside it), so
    that a user's file put into the folder later under an output's name is not taken for one."""

    def __init__(self, folder: Path, command: str, patterns: Sequence[str],
                 legacy_owned: Optional[Callable[[str], bool]] = None, confirm: Optional[Callable[[str], bool]] = None):
        self.folder = Path(folder)
        self.command = command
        self.patterns = tuple(patterns)
        self.legacy_owned = legacy_owned
        self.confirm = confirm
        self._claim = self._read()

    def _read(self) -> Optional[dict]:
        try:
            claim = json.loads((self.folder / CLAIM_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(claim, dict) or claim.get("command") != self.command:
            return None
        return claim

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    def owns(self, name: str) -> bool:
        """Whether ``name`` in the folder is provably this command's output."""
        if not self.matches(name) or (self.confirm is not None and not self.confirm(name)):
            return False
        if self._claim is not None:
            return name not in set(self._claim.get("preexisting", ()))
        return bool(self.legacy_owned and self.legacy_owned(name))

    def existing(self) -> List[str]:
        """The names of the files in the folder that match the patterns (sorted)."""
        try:
            names = [entry.name for entry in os.scandir(self.folder)
                     if entry.is_file(follow_symlinks=False) or entry.is_symlink()]
        except OSError:
            return []
        return sorted(name for name in names if self.matches(name))

    def collisions(self, keep: Iterable[Path] = ()) -> List[str]:
        """The files the command could write over that are not its own (the user's), and the
        files in ``keep`` (a ``--checkpoint`` inside ``--out``) whatever their owner."""
        kept = {os.path.normcase(os.path.abspath(path)) for path in keep}
        return [name for name in self.existing()
                if not self.owns(name) or os.path.normcase(os.path.abspath(self.folder / name)) in kept]

    def refuse_collisions(self, option: str, keep: Iterable[Path] = ()) -> None:
        """Raise :class:`UsageError` naming the files the command would write over but does not own."""
        theirs = self.collisions(keep)
        if theirs:
            shown = ", ".join(theirs[:5]) + (f" (and {len(theirs) - 5} more)" if len(theirs) > 5 else "")
            raise UsageError(f"{option} holds file(s) this command would write over but did not write: {shown}. "
                             "They are left alone: move them, or choose another output folder")

    def claim(self) -> None:
        """Write the claim (once: a later claim of the same command keeps the first one's list)."""
        if self._claim is None:
            try:
                names = sorted(entry.name for entry in os.scandir(self.folder) if entry.name != CLAIM_NAME)
            except OSError:
                names = []
            # the user's files that match the patterns are not ours; files an older run provably
            # wrote stay ours
            preexisting = [name for name in names if not (self.legacy_owned and self.matches(name)
                                                          and self.legacy_owned(name))]
            self._claim = {"command": self.command, "patterns": list(self.patterns), "preexisting": preexisting}
        OutputFolder(self.folder).write_json(CLAIM_NAME, self._claim)

    def remove_owned(self, keep: Iterable[Path] = ()) -> List[str]:
        """Delete the command's own files (never those in ``keep``); return their names."""
        kept = {os.path.normcase(os.path.abspath(path)) for path in keep}
        removed = []
        for name in self.existing():
            path = self.folder / name
            if self.owns(name) and os.path.normcase(os.path.abspath(path)) not in kept:
                os.unlink(path)
                removed.append(name)
        return removed


@contextlib.contextmanager
def hold_output(out: str, command: str, need_bytes: int = 0):
    """Hold the folder ``--out`` names for this run (:func:`~sed_fast.toolkit.outdir_lock.exclusive_output_dir`:
    created if needed, writable, ``need_bytes`` free, no other run in it); yields its
    :class:`~sed_fast.toolkit.outdir_lock.OutputDirLock`. Its problems are usage errors naming ``--out``."""
    from .outdir_lock import OutputDirError, exclusive_output_dir

    out_dir = Path(os.path.expanduser(out))
    with contextlib.ExitStack() as held:
        try:
            lock = held.enter_context(exclusive_output_dir(out_dir, f"sed-fast {command} --out {out}",
                                                           need_bytes=need_bytes))
        except OutputDirError as problem:
            raise UsageError(str(problem).replace(f"output folder {out_dir}", f"--out {out}", 1)) from problem
        yield lock


#: Output names keep at most this many bytes of the input's stem (then a hash).
STEM_BYTES = 100


def safe_stem(text: str) -> str:
    """``text`` as an output-name stem: runs of other characters than letters, digits, ``.``, ``-``
    and ``_`` become ``_``; at most :data:`STEM_BYTES` bytes (:func:`shorten`)."""
    text = re.sub(r"[^\w.\-]+", "_", text).strip("._")
    return shorten(text or "image")


def shorten(text: str, limit: int = STEM_BYTES) -> str:
    """``text`` if its UTF-8 form fits in ``limit`` bytes, else its first characters that fit and
    ``-`` + 8 hex digits of its hash (file systems refuse names over 255 bytes)."""
    encoded = text.encode("utf-8", "surrogateescape")
    if len(encoded) <= limit:
        return text
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    head = encoded[:limit - 9].decode("utf-8", "ignore")
    return f"{head}-{digest}"
