"""The ``--out`` rule: a command deletes or overwrites only files it can prove it wrote.

Proof is a claim the command writes into the folder (``.sed_fast_outputs.json``) before its first
output: per command, the names of the files it is about to write (checked first not to be anyone
else's), or, where the names are not known in advance, the name patterns of its outputs and the
files already in the folder at the first claim. Anything else in ``--out`` is the user's (or another
command's): it is left alone, and where the command would write over it, the command refuses before
it builds a model or writes anything, and names the file
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

from ..base.files import atomic_write, remove_stale_temporaries
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
    """What ``command`` owns in ``folder``, by the claim file (:data:`CLAIM_NAME`), which holds one
    entry per command that wrote into the folder:

    - ``files``: the names the command declared before writing them (:meth:`claim`), each checked
      then not to be a file of someone else's (:meth:`refuse_collisions`);
    - ``patterns`` and ``preexisting``: for outputs whose names are not known in advance (a training
      run's checkpoints), the name patterns and the files already in the folder at the first claim:
      a matching file that was not there then is the command's.

    ``legacy_owned(name)`` says which files a run of an older sed-fast (one without a claim file)
    provably wrote; ``confirm(name)``, when given, must also hold for a file to be the command's (a
    checkpoint has its training state beside it), so that a user's file put into the folder later
    under an output's name is not taken for one."""

    def __init__(self, folder: Path, command: str, patterns: Sequence[str] = (),
                 legacy_owned: Optional[Callable[[str], bool]] = None, confirm: Optional[Callable[[str], bool]] = None):
        self.folder = Path(folder)
        self.command = command
        self.patterns = tuple(patterns)
        self.legacy_owned = legacy_owned
        self.confirm = confirm
        self._claim = self._read_claims().get(command)

    def _read_claims(self) -> dict:
        """Every command's entry of the claim file ({} when there is none or it cannot be read)."""
        try:
            data = json.loads((self.folder / CLAIM_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        if isinstance(data.get("command"), str):  # one command's claim, as the first claim files held it
            data = {"claims": {data["command"]: data}}
        claims = data.get("claims")
        if not isinstance(claims, dict):
            return {}
        return {command: entry for command, entry in claims.items() if isinstance(entry, dict)}

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    def owns(self, name: str) -> bool:
        """Whether ``name`` in the folder is provably this command's output."""
        if self.confirm is not None and not self.confirm(name):
            return False
        if self._claim is not None:
            if name in set(self._claim.get("files", ())):
                return True
            return self.matches(name) and name not in set(self._claim.get("preexisting", ()))
        return bool(self.legacy_owned and self.legacy_owned(name))

    def existing(self) -> List[str]:
        """The names of the files in the folder that match the patterns (sorted)."""
        try:
            names = [entry.name for entry in os.scandir(self.folder)
                     if entry.is_file(follow_symlinks=False) or entry.is_symlink()]
        except OSError:
            return []
        return sorted(name for name in names if self.matches(name))

    def collisions(self, names: Optional[Iterable[str]] = None, keep: Iterable[Path] = ()) -> List[str]:
        """Of the files the command could write over (``names`` it will write, or by default the
        folder's files that match its patterns), those that are not its own (the user's), and the
        files in ``keep`` (a ``--checkpoint`` inside ``--out``) whatever their owner."""
        kept = {os.path.normcase(os.path.abspath(path)) for path in keep}
        if names is None:
            present = self.existing()
        else:
            present = sorted({name for name in names if os.path.lexists(self.folder / name)})
        return [name for name in present
                if not self.owns(name) or os.path.normcase(os.path.abspath(self.folder / name)) in kept]

    def refuse_collisions(self, option: str, names: Optional[Iterable[str]] = None, keep: Iterable[Path] = ()) -> None:
        """Raise :class:`UsageError` naming the files the command would write over but does not own
        (see :meth:`collisions`)."""
        theirs = self.collisions(names, keep)
        if theirs:
            shown = ", ".join(theirs[:5]) + (f" (and {len(theirs) - 5} more)" if len(theirs) > 5 else "")
            raise UsageError(f"{option} holds file(s) this command would write over but did not write: {shown}. "
                             "They are left alone: move them, or choose another output folder")

    def claim(self, names: Iterable[str] = ()) -> None:
        """Write this command's entry, adding ``names`` (files it is about to write; call
        :meth:`refuse_collisions` with them first) to its files. The first claim also records the
        folder's files at that moment (those of the patterns' names that are not this command's);
        the other commands' entries are kept."""
        if self._claim is None:
            preexisting = []
            if self.patterns:
                try:
                    present = sorted(entry.name for entry in os.scandir(self.folder) if entry.name != CLAIM_NAME)
                except OSError:
                    present = []
                # the user's files that match the patterns are not ours; files an older run provably
                # wrote stay ours
                preexisting = [name for name in present if not (self.legacy_owned and self.matches(name)
                                                                and self.legacy_owned(name))]
            self._claim = {"patterns": list(self.patterns), "preexisting": preexisting, "files": []}
        self._claim["files"] = sorted(set(self._claim.get("files", ())) | set(names))
        claims = self._read_claims()
        claims[self.command] = self._claim
        OutputFolder(self.folder).write_json(CLAIM_NAME, {"claims": claims})

    def remove_owned(self, keep: Iterable[Path] = (), names: Iterable[str] = ()) -> List[str]:
        """Delete the command's own files among those matching its patterns and ``names`` (never
        those in ``keep``); return their names."""
        kept = {os.path.normcase(os.path.abspath(path)) for path in keep}
        removed = []
        for name in sorted(set(self.existing()) | set(names)):
            path = self.folder / name
            if not (path.is_file() or path.is_symlink()):
                continue
            if self.owns(name) and os.path.normcase(os.path.abspath(path)) not in kept:
                os.unlink(path)
                removed.append(name)
        return removed


def claim_outputs(out: str, out_dir: Path, command: str, names: Iterable[str], checkpoint: Optional[str] = None,
                  legacy_owned: Optional[Callable[[str], bool]] = None) -> OutputClaim:
    """The ``--out`` rule for a command whose output ``names`` are known before it starts (``out``:
    the option's text, for messages): refuse, before anything is written, when one of them is a file
    in ``out_dir`` that the command did not write, or the ``checkpoint``; else claim them, so that
    this run and the command's later runs may rewrite them. Then remove the temporary files a killed
    run left (the caller holds the folder: no other run writes there). Returns the claim."""
    names = list(names)
    claim = OutputClaim(out_dir, command, legacy_owned=legacy_owned)
    keep = [Path(os.path.expanduser(checkpoint))] if checkpoint else []
    claim.refuse_collisions(f"--out {out}", names, keep=keep)
    claim.claim(names)
    remove_stale_temporaries(out_dir)
    return claim


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
