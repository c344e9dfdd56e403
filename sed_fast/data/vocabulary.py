"""Class vocabularies: the built-in evaluation sets, user lists and files, and their validation.

A vocabulary is a list of class names; output channel ``t`` of the model is ``names[t]``. A name
that contains ``", "`` is a list of synonyms (``"person, individual, someone"``): its text
embedding averages the synonyms (see :mod:`sed_fast.data.text`); :func:`display_name` gives the first.

Names are used exactly as given (no stripping, no case change) because the text embedding is
computed from the exact string: the official ``ade150`` list, for instance, holds ``"bed "`` with a
trailing space, and the official model embeds it that way. Only text files (one name per line)
have their lines stripped.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

__all__ = ["BUILTIN_VOCABULARIES", "load_vocabulary", "validate_names", "display_name", "parse_vocabulary_arg",
           "builtin_vocabulary_path"]

_VOCAB_DIR = Path(__file__).resolve().parent / "vocabularies"

#: The built-in vocabularies (the class lists of the official evaluation sets).
BUILTIN_VOCABULARIES = ("ade150", "ade847", "pc59", "pc459", "voc20", "voc20b", "coco")

VocabularySpec = Union[str, os.PathLike, Sequence[str]]

_KNOWN = ", ".join(BUILTIN_VOCABULARIES)


def builtin_vocabulary_path(name: str) -> Path:
    """The JSON file of the built-in vocabulary ``name`` (case-insensitive, surrounding spaces ignored)."""
    key = _builtin_key(name) if isinstance(name, str) else None
    if key is None:
        raise ValueError(f"unknown built-in vocabulary {name!r}; known: {_KNOWN}")
    return _VOCAB_DIR / f"{key}.json"


def _builtin_key(spec: str):
    key = spec.strip().lower()
    return key if key in BUILTIN_VOCABULARIES else None


def _suggest(spec: str, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(spec.strip().lower(), BUILTIN_VOCABULARIES, n=1, cutoff=cutoff)
    return close[0] if close else ""


def _looks_like_path(spec: str) -> bool:
    return ("/" in spec or os.sep in spec or (os.altsep is not None and os.altsep in spec)
            or spec.startswith("~") or Path(spec).suffix.lower() in (".json", ".txt", ".csv", ".names"))


def validate_names(names, source: str = "vocabulary") -> List[str]:
    """Check a list of class names; returns a new list. Errors start with ``"<source>: "``.

    ``TypeError``: ``names`` is not a list/tuple, or a name is not a string. ``ValueError``: no
    names, an empty or whitespace-only name, a name that is not encodable as UTF-8 (a lone surrogate
    such as ``"\\ud800"``, e.g. from a mis-decoded file name), a synonym list with an empty synonym
    (``"dog, "``), duplicate names (all listed with their indices). Names that differ only in what
    the tokenizer normalises away (``"cat"`` / ``"Cat"``) are caught when the text embeddings are
    computed (:func:`sed_fast.data.text.check_tokenized_duplicates`).
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise TypeError(f"{source}: expected a list of class names, got {type(names).__name__}")
    if len(names) == 0:
        raise ValueError(f"{source}: the vocabulary is empty; give at least one class name")
    positions: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{source}: class name at index {i} is not a string: {name!r} ({type(name).__name__})")
        if not name.strip():
            raise ValueError(f"{source}: class name at index {i} is empty or whitespace-only: {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{source}: class name at index {i} is not valid Unicode text: {name!r} has "
                             f"{error.reason} at character {error.start} (a lone surrogate, e.g. from a "
                             "mis-decoded file): fix the name") from None
        if ", " in name and any(not s.strip() for s in name.split(", ")):
            raise ValueError(f"{source}: class name at index {i} is a synonym list with an empty synonym: {name!r} "
                             "(synonyms are separated by ', ')")
        positions.setdefault(name, []).append(i)
    duplicates = {n: idx for n, idx in positions.items() if len(idx) > 1}
    if duplicates:
        detail = "; ".join(f"{n!r} at indices {', '.join(map(str, idx))}" for n, idx in duplicates.items())
        raise ValueError(f"{source}: duplicate class names: {detail}. Each output channel maps to exactly one "
                         "given name, so duplicates are an error (not silently removed): remove them")
    return list(names)


def _read_file(path: Path) -> List[str]:
    where = str(path)
    if not path.exists():
        raise FileNotFoundError(f"vocabulary file not found: {where!r}")
    if not path.is_file():
        raise ValueError(f"vocabulary path is not a file: {where!r}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: vocabulary file is not UTF-8 text ({e})") from e
    except OSError as e:
        raise ValueError(f"{where}: cannot read vocabulary file ({e})") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from e
        if not isinstance(data, list):
            raise ValueError(f"{where}: a JSON vocabulary must be a list of class names, but the file holds a "
                             f"{type(data).__name__}")
        try:
            return validate_names(data, source=where)
        except TypeError as e:  # a non-string inside a file is a bad file, not a bad call
            raise ValueError(str(e)) from e
    lines = [line.strip() for line in text.splitlines()]
    return validate_names([line for line in lines if line], source=where)


def load_vocabulary(spec: VocabularySpec) -> List[str]:
    """The class names of ``spec``, validated.

    ``spec`` is one of:

    * a list/tuple of class names (used exactly as given; a new list is returned);
    * a built-in vocabulary name, one of :data:`BUILTIN_VOCABULARIES` (case-insensitive; a
      built-in name wins over a file of the same name in the working directory);
    * a path (``str`` or :class:`os.PathLike`) to a ``.json`` file holding a JSON list of names, or
      to a text file (any other suffix) with one name per line (surrounding whitespace stripped,
      blank lines ignored).

    A name containing ``", "`` is a synonym list (one class). Errors name the offending item and
    its index: ``TypeError`` for a spec or list name of the wrong type, ``FileNotFoundError`` for a
    missing file, ``ValueError`` for an empty vocabulary, an empty/whitespace-only name, duplicate
    names, an unknown built-in name, an unreadable, non-UTF-8 or invalid file.

    Duplicates are an error rather than silently removed: output channel ``t`` must correspond to
    ``names[t]`` of what the caller gave, and de-duplicating would shift the channels.
    """
    if isinstance(spec, os.PathLike):
        return _read_file(Path(spec).expanduser())
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("vocabulary is an empty string; give a built-in name "
                             f"({_KNOWN}), a file path or a list of class names")
        key = _builtin_key(spec)
        if key is not None:
            with open(_VOCAB_DIR / f"{key}.json", encoding="utf-8") as f:
                return validate_names(json.load(f), source=f"built-in vocabulary {key!r}")
        path = Path(spec).expanduser()
        if _exists(path):
            return _read_file(path)
        if _looks_like_path(spec):
            raise FileNotFoundError(f"vocabulary file not found: {spec!r} (built-in vocabularies: {_KNOWN})")
        close = _suggest(spec)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ValueError(f"{spec!r} is neither a known built-in vocabulary ({_KNOWN}) nor an existing file{hint}; "
                         f"to give class names directly pass a list, e.g. [{spec!r}]")
    if isinstance(spec, (list, tuple)):
        return validate_names(spec, source="vocabulary list")
    raise TypeError("vocabulary must be a list of class names, a built-in vocabulary name or a path; got "
                    f"{type(spec).__name__}")


def _exists(path: Path) -> bool:
    """``path.exists()``, false for strings no file system accepts as a path (a long class list
    raises "File name too long" otherwise)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def display_name(name: str) -> str:
    """A short name for display: the first synonym of a synonym list (``"person, individual"`` ->
    ``"person"``). Only ``", "`` separates synonyms."""
    if not isinstance(name, str):
        raise TypeError(f"display_name expects a string, got {type(name).__name__}")
    return name.split(", ")[0]


def parse_vocabulary_arg(text: str) -> List[str]:
    """The vocabulary of a command-line argument.

    ``text`` is a built-in vocabulary name, a path to an existing vocabulary file, or a
    comma-separated list of class names (``"cat,dog,grass"``: split on ``","``, each name
    stripped; one trailing comma is allowed, so ``"cat,"`` is a one-class list, as is ``"cat"``
    unless it looks like a misspelt built-in name). Because the comma separates classes here,
    synonym lists (names containing ``", "``) cannot be given this way: put them in a file.
    """
    if not isinstance(text, str):
        raise TypeError(f"vocabulary argument must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"vocabulary argument is empty: give a built-in name ({_KNOWN}), a file, or a "
                         "comma-separated list of classes")
    if _builtin_key(text) is not None or _exists(Path(text.strip()).expanduser()):
        return load_vocabulary(text.strip() if _builtin_key(text) is None else text)
    if "," not in text:
        if _looks_like_path(text):
            raise FileNotFoundError(f"vocabulary file not found: {text!r}")
        close = _suggest(text, cutoff=0.8)
        if close:
            raise ValueError(f"{text!r} is not a built-in vocabulary (did you mean {close!r}?) nor an existing "
                             f"file; for a single class of that name add a trailing comma: {text.strip() + ','!r}")
    items = [item.strip() for item in text.split(",")]
    if len(items) > 1 and items[-1] == "" and any(items[:-1]):
        items = items[:-1]  # one trailing comma: "cat," is a one-class list
    for i, item in enumerate(items):
        if not item:
            raise ValueError(f"vocabulary argument {text!r}: class name at index {i} is empty "
                             "(two commas in a row, or a leading comma?)")
    return validate_names(items, source=f"vocabulary argument {text!r}")
