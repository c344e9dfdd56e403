"""The resumable state of an evaluation: the running confusion matrices and the finished images.

Saved atomically (temporary file + ``os.replace``) as ``<out>/eval_state.pt`` every
``--save-every`` images and at the end; ``--resume`` loads it, checks that it was made with the same
settings (every setting that changes a figure: dataset, images, vocabulary, model, precision...,
the weights by the sha256 of the checkpoint's content; not the batch size, workers or number of
processes: a batch can sum a convolution in another float order, which flips only argmax near-ties),
and evaluates only the images not finished. A refusal names each difference: both weight hashes,
and for the vocabulary the names removed, added or reordered.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..base.files import atomic_write_bytes

__all__ = ["EvalState", "StateError", "STATE_FILE", "load_state", "save_state", "settings_differences",
           "names_change", "check_resumable", "is_state_file", "read_payload"]

STATE_FILE = "eval_state.pt"
_FORMAT = "sed_fast.evaluation.state"
_VERSION = 1


class StateError(Exception):
    """A resume file that cannot be used: corrupt, from another tool or version, other settings."""


@dataclass
class EvalState:
    settings: dict
    confusion: Dict[str, torch.Tensor]  # model name ("model", or "fast"/"reference") -> (N+1, N+1) int64
    finished: List[str] = field(default_factory=list)  # stems, in the order they were merged
    counters: Dict[str, int] = field(default_factory=dict)  # invalid label pixels, label agreement
    seconds: float = 0.0  # evaluation time spent on the finished images, over all sessions
    complete: bool = False
    # "vocabulary" / "class_names" -> the names (the settings hold their hashes): a refused resume
    # says which names changed
    names: Dict[str, List[str]] = field(default_factory=dict)
    skipped: List[List[str]] = field(default_factory=list)  # [stem, error] left out by --skip-unreadable


def save_state(path: Path, state: EvalState) -> None:
    payload = {"format": _FORMAT, "version": _VERSION, "settings": state.settings,
               "confusion": {k: v.detach().to("cpu", torch.int64) for k, v in state.confusion.items()},
               "finished": list(state.finished), "counters": dict(state.counters), "seconds": float(state.seconds),
               "complete": bool(state.complete), "names": {k: list(v) for k, v in state.names.items()},
               "skipped": [list(entry) for entry in state.skipped]}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue(), fsync=True)


def is_state_file(path: Path) -> bool:
    """Whether ``path`` is a file an evaluation saved its state in (of any version)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated, garbage: not one
        return False
    return isinstance(payload, dict) and payload.get("format") == _FORMAT


def read_payload(path: Path, fmt: str, version: int, what: str, hint: str) -> dict:
    """The dict a sed-fast ``what`` (a tool's saved state) of format ``fmt`` and ``version`` holds in
    ``path`` (read weights only); :class:`StateError` naming the problem, then ``hint``, when it is
    corrupt, another file or another version. A missing file raises FileNotFoundError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated, garbage, or not a torch file
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise StateError(f"the resume file {path} is corrupt or not a {what} "
                         f"({type(error).__name__}: {first_line}); {hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise StateError(f"{path} is not a sed-fast {what}; {hint}")
    if payload.get("version") != version:
        raise StateError(f"{path} has state format version {payload.get('version')!r}, this sed-fast reads "
                         f"version {version}; {hint}")
    return payload


def load_state(path: Path) -> EvalState:
    """The state in ``path``; :class:`StateError` with the reason if it is unusable."""
    hint = f"delete {path} (or pass --overwrite) to start the evaluation over"
    payload = read_payload(path, _FORMAT, _VERSION, "evaluation state", hint)
    try:
        state = EvalState(settings=dict(payload["settings"]), confusion=dict(payload["confusion"]),
                          finished=[str(s) for s in payload["finished"]], counters=dict(payload["counters"]),
                          seconds=float(payload["seconds"]), complete=bool(payload["complete"]),
                          names={str(k): [str(n) for n in v] for k, v in dict(payload.get("names") or {}).items()},
                          skipped=[[str(part) for part in entry] for entry in payload.get("skipped", [])])
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"the resume file {path} is incomplete ({type(error).__name__}: {error}); {hint}") from None
    size = int(state.settings.get("num_classes", -1)) + 1
    for name, matrix in state.confusion.items():
        if not isinstance(matrix, torch.Tensor) or matrix.dtype != torch.int64 or tuple(matrix.shape) != (size, size):
            raise StateError(f"the resume file {path} holds a malformed confusion matrix {name!r}; {hint}")
        if bool((matrix < 0).any()):
            raise StateError(f"the resume file {path} holds negative counts in {name!r}; {hint}")
    if len(set(state.finished)) != len(state.finished):
        raise StateError(f"the resume file {path} lists an image twice; {hint}")
    return state


def settings_differences(saved: dict, current: dict) -> List[str]:
    """Human-readable differences, one per setting: ``"impl: 'fast' in the resume file, 'reference' now"``."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {_short(saved.get(key, '(not set)'))} in the resume file, "
                       f"{_short(current.get(key, '(not set)'))} now")
    return out


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def state_path(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_FILE


def exists(out_dir: Path) -> bool:
    return os.path.exists(state_path(out_dir))


def names_change(saved: List[str], current: List[str], limit: int = 5) -> str:
    """What changed from ``saved`` to ``current`` names, by name: removed, added, or the same names
    in another order."""
    def listing(items):
        shown = ", ".join(repr(n) for n in items[:limit])
        return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")

    current_set, saved_set = set(current), set(saved)
    removed = [n for n in saved if n not in current_set]
    added = [n for n in current if n not in saved_set]
    parts = []
    if removed:
        parts.append(f"{len(removed)} removed ({listing(removed)})")
    if added:
        parts.append(f"{len(added)} added ({listing(added)})")
    if not parts:
        if len(saved) != len(current):
            parts.append(f"{len(saved)} names in the resume file, {len(current)} now (repeated names)")
        else:
            i = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b), None)
            if i is not None:
                parts.append(f"the same {len(current)} names in another order (index {i}: {saved[i]!r} in the "
                             f"resume file, {current[i]!r} now)")
    return "; ".join(parts)


def check_resumable(state: EvalState, settings: dict, stems: List[str], path: Optional[Path] = None,
                    names: Optional[Dict[str, List[str]]] = None) -> None:
    """Raise :class:`StateError` unless ``state`` can be continued with ``settings`` and the images
    ``stems``; ``names``: the current vocabulary and class names, to say which names changed."""
    differences = []
    for line in settings_differences(state.settings, settings):
        key = line.split(":", 1)[0]
        if key in (names or {}) and key in state.names:
            change = names_change(state.names[key], names[key])
            if change:
                line = f"{key}: {change}"
        differences.append(line)
    if differences:
        raise StateError(f"cannot resume {path or 'the evaluation'}: it was made with other settings: "
                         + "; ".join(differences) + ". Rerun with the same settings, or pass --overwrite "
                         "(or another --out) to start over")
    unknown = sorted(set(state.finished) - set(stems))
    if unknown:
        raise StateError(f"cannot resume {path or 'the evaluation'}: {len(unknown)} finished image(s) are not in "
                         f"the dataset now (e.g. {unknown[0]!r})")
