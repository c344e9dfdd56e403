"""Loading official SED checkpoints (detectron2 ``model_final.pth`` files or bare state dicts).

Loading is strict: a file whose keys or shapes differ from the model's is refused with an error
that lists the first few missing, unexpected and mis-shaped keys, names the variant the file looks
like and says which ``--variant`` to use. A checkpoint that was asked for is never replaced by random
weights. What is checked when loading:

* the file is read with ``torch.load(weights_only=True)``; a well-formed file that needs arbitrary
  unpickling (classes other than tensors) is refused unless ``SED_FAST_TRUST_CHECKPOINTS`` is on
  (``1/true/yes/on``; ``0/false/no/off`` or unset is off, anything else is an error). A truncated or
  corrupt file is reported as such (trusting it would not help);
* every tensor must be floating point (int, bool and complex tensors are refused, not cast) and
  finite (NaN/inf are refused, naming the first keys and their counts);
* a checkpoint whose float dtype differs from the model's is loaded (converted to the model's dtype)
  with a :class:`CheckpointDtypeWarning`;
* after loading into a model that has a vocabulary, its text embeddings are recomputed with the new
  text-tower weights;
* keys saved from a ``DataParallel`` / ``DistributedDataParallel`` wrapper (``module.`` prefix) are
  refused with the hint to strip the prefix.

A checkpoint is identified by its content: :func:`checkpoint_sha256` (the sha256 of the file,
computed when the file is read and cached in ``<cache root>/checkpoint_sha256.json`` by path,
size, modification and change time, inode and device, so an unchanged file is not read twice;
files up to :data:`REHASH_BYTES` are hashed again every time, that being cheap).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickletools
import warnings
import zipfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch

from ..base.envvars import cache_root, env_value
from ..base.files import atomic_write_text

_SHAPES_FILE = Path(__file__).parent / "official_state_dict_shapes.json"
_SHOW = 5  # how many keys of each kind an error message lists
_HASH_CACHE = "checkpoint_sha256.json"
_HASH_CACHE_ENTRIES = 256
#: Files up to this size are hashed on every use; larger ones use the cache while their identity holds.
REHASH_BYTES = 64 << 20


class CheckpointError(ValueError):
    """The file is not a usable SED checkpoint for this model."""


class CheckpointDtypeWarning(UserWarning):
    """The checkpoint's floating-point dtype differs from the model's: values are converted."""


@lru_cache(maxsize=1)
def official_shapes() -> Dict[str, Dict[str, list]]:
    """{"sed-b": {key: shape}, "sed-l": {...}}: the released checkpoints' keys and shapes."""
    with open(_SHAPES_FILE) as f:
        return json.load(f)


def trust_checkpoints() -> bool:
    """Whether ``SED_FAST_TRUST_CHECKPOINTS`` allows full unpickling (default off; a value that is
    not a boolean word raises ``ValueError``)."""
    return env_value("SED_FAST_TRUST_CHECKPOINTS")


def file_identity(path: Union[str, os.PathLike]) -> dict:
    """What identifies a file without reading it: resolved path, size, modification and change time
    (ns), inode and device. Copying other content over the file changes its change time even when
    the size and modification time are made equal."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "device": stat.st_dev}


def _hash_cache_path() -> Path:
    return cache_root() / _HASH_CACHE


def _read_hash_cache() -> dict:
    try:
        with open(_hash_cache_path(), encoding="utf-8") as handle:
            cache = json.load(handle)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_hash_cache(key: str, entry: dict) -> None:
    cache = _read_hash_cache()
    cache.pop(key, None)
    cache[key] = entry  # last: the newest entries are kept
    while len(cache) > _HASH_CACHE_ENTRIES:
        cache.pop(next(iter(cache)))
    try:
        _hash_cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_hash_cache_path(), json.dumps(cache, indent=1) + "\n")
    except OSError:  # a read-only cache only costs speed
        pass


def _stream_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: Union[str, os.PathLike], use_cache: bool = True) -> str:
    """The sha256 (hex) of the file at ``path``. Cached by :func:`file_identity` for files larger
    than :data:`REHASH_BYTES` (smaller ones are hashed every time); reading the file here also
    brings it into the page cache for the ``torch.load`` that follows."""
    path = Path(path).expanduser()
    identity = file_identity(path)
    key = identity["path"]
    cacheable = use_cache and identity["size"] > REHASH_BYTES
    if cacheable:
        entry = _read_hash_cache().get(key)
        if isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    digest = _stream_sha256(path)
    if cacheable and file_identity(path) == identity:  # not changed while it was read
        _write_hash_cache(key, {"identity": identity, "sha256": digest})
    return digest


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file: ``{"model": state_dict, ...}`` (detectron2) or a bare state dict.

    Files are read with ``torch.load(weights_only=True)``; a well-formed file that needs arbitrary
    unpickling is refused unless ``SED_FAST_TRUST_CHECKPOINTS=1`` (only for files you trust). A
    truncated or corrupt file is refused with a message that says so.
    """
    path = Path(path)
    trusted = trust_checkpoints()  # a malformed value is an error even when it would not be needed
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    with open(path, "rb") as handle:  # permission denied and the like surface here as OSError, as such
        handle.read(1)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - any failure (an OSError too: torch raises EINVAL
        # for some truncated archives) is classified by looking at the file itself
        needed = _classes_needed(path)
        if needed is None:  # not a well-formed checkpoint: trusting it would not help
            raise CheckpointError(
                f"could not read checkpoint {path}: the file is truncated or corrupt "
                f"({_cause(safe_error)}). Download or copy it again "
                f"(compare its size and checksum with the original).") from safe_error
        if not trusted:
            listed = ", ".join(needed[:_SHOW]) + (f" ... and {len(needed) - _SHOW} more" if len(needed) > _SHOW else "")
            raise CheckpointError(
                f"could not read checkpoint {path} as a plain tensor file: it is a valid pickle that needs "
                f"classes other than tensors ({listed or 'objects the safe loader refuses'}). If it is a "
                f"checkpoint you trust, set SED_FAST_TRUST_CHECKPOINTS=1 to unpickle it fully (this runs "
                f"code from the file).") from safe_error
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"could not read checkpoint {path}: {_cause(error)}") from error
    return extract_state_dict(obj, source=str(path))


def _pickle_globals(data: bytes) -> List[str]:
    """The classes and functions a pickle refers to; raises when ``data`` is not one whole pickle."""
    found, strings = [], []
    stopped = False
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings = (strings + [arg])[-2:]
        elif opcode.name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
            found.append(".".join(strings))
        elif opcode.name == "STOP":
            stopped = True
    if not stopped:
        raise ValueError("pickle has no STOP")
    return found


def _classes_needed(path: Path) -> Optional[List[str]]:
    """For a file the safe loader refused: the non-torch classes its pickle needs (possibly none),
    or None when the file is not a well-formed checkpoint (truncated zip, CRC error, broken pickle)."""
    def foreign(names):
        return sorted({n for n in names if not n.startswith("torch.") and n != "collections.OrderedDict"})

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:  # reads every member: CRC errors mean a damaged file
                    return None
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if len(pickles) != 1:
                    return None
                return foreign(_pickle_globals(archive.read(pickles[0])))
        # The legacy format: pickles (magic number, protocol, sys info, the object, storage keys), then raw bytes.
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
        names, offset = [], 0
        for _ in range(4):
            ops = list(pickletools.genops(data[offset:]))
            names += _pickle_globals(data[offset:offset + ops[-1][2] + 1])
            offset += ops[-1][2] + 1
        return foreign(names)
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - any parse failure means the file is damaged
        return None


def extract_state_dict(obj, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object (numpy arrays become tensors)."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state dict (expected a dict of tensors or "
                              f"{{'model': state_dict}}), got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: state dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            try:
                import numpy as np
                if isinstance(value, np.ndarray):
                    value = torch.from_numpy(value)
            except ImportError:  # pragma: no cover
                pass
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state


def _best_variant(state: Mapping[str, torch.Tensor]):
    """(name, matching keys, total keys) of the released variant closest to ``state``."""
    best_name, best_score, best_total = None, -1, 0
    for name, shapes in official_shapes().items():
        score = sum(1 for k, s in shapes.items() if k in state and list(state[k].shape) == s)
        if score > best_score:
            best_name, best_score, best_total = name, score, len(shapes)
    return best_name, best_score, best_total


def guess_variant(state: Mapping[str, torch.Tensor]) -> str:
    """A sentence naming the released variant whose keys and shapes best match ``state``."""
    best_name, best_score, best_total = _best_variant(state)
    if best_score <= 0:
        return "it does not look like a SED checkpoint of either released variant (no key matches)"
    return f"it looks most like {best_name} ({best_score} of {best_total} keys match in name and shape)"


def _fix_hint(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What to change, given the closest released variant and the model's own variant."""
    best_name, best_score, _ = _best_variant(state)
    if best_score <= 0:
        return "use an official SED checkpoint (sed-b or sed-l model_final.pth)"
    letter = best_name.split("-", 1)[-1]
    variant = getattr(model, "variant", None)
    if variant is not None and variant != letter:
        return f"use --variant {letter} (build_sed({letter!r}, ...))"
    return (f"the variant is right, so the file is damaged or from another SED version: download the "
            f"official {best_name} checkpoint again")


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's keys and shapes.

    The message lists the first missing, unexpected and mis-shaped keys, names the released variant
    the state looks like and ends with the fix (e.g. ``use --variant l (build_sed('l', ...))``).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or misshaped):
        return
    variant = getattr(model, "variant", None)
    lines = [f"{source} does not fit this SED model" + (f" (variant {variant!r})" if variant else "") + ":"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"  {len(keys)} {label} key(s): " + _listing(keys))
    prefixed = _wrapper_prefix(expected, state)
    if prefixed:
        lines.append(f"  every key starts with {prefixed!r} (saved from a DataParallel/DistributedDataParallel "
                     f"wrapper): strip the prefix, e.g. state = {{k.removeprefix({prefixed!r}): v for k, v in "
                     "state.items()}, and save the checkpoint again.")
    else:
        lines.append(f"  {guess_variant(state)}: {_fix_hint(model, state)}.")
    raise CheckpointError("\n".join(lines))


def _wrapper_prefix(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """``"module."`` when every key of ``state`` carries it and the keys without it are the model's
    (or fit it better); else ``""``."""
    prefix = "module."
    if not state or not all(k.startswith(prefix) for k in state):
        return ""
    stripped = {k[len(prefix):] for k in state}
    if stripped & set(expected) or any(k.startswith(prefix) for k in stripped):
        return prefix
    return ""


def _listing(items: List[str]) -> str:
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def check_tensors(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` for tensors that are not floating point (int, bool, complex:
    the model's weights are all real floats, and casting would hide a wrong file) or hold NaN/inf.
    Tensors on the meta device (no data) are only type-checked."""
    not_float = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source}: {len(not_float)} tensor(s) are not floating point: {_listing(not_float)}. "
                              "A SED checkpoint holds only float weights: this file is not one, or is damaged")
    bad, total = [], 0
    for key, value in state.items():
        if value.device.type == "meta" or bool(torch.isfinite(value).all()):
            continue
        count = int((~torch.isfinite(value)).sum().item())
        if count:
            nan = int(torch.isnan(value).sum().item())
            bad.append(f"{key} ({count} of {value.numel()} values: {nan} NaN, {count - nan} inf)")
            total += count
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold {total} non-finite value(s) (NaN/inf): "
                              f"{_listing(bad)}. The weights are damaged (or from a diverged training run): "
                              "use the official checkpoint")


def _warn_dtype(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    pairs = Counter((str(state[k].dtype).replace("torch.", ""), str(v.dtype).replace("torch.", ""))
                    for k, v in expected.items() if k in state and state[k].dtype != v.dtype)
    if pairs:
        detail = ", ".join(f"{n} tensor(s) {ours} in the file vs {theirs} in the model"
                           for (ours, theirs), n in pairs.most_common())
        warnings.warn(f"{source}: checkpoint dtype differs from the model's ({detail}); the values are "
                      "converted to the model's dtype", CheckpointDtypeWarning, stacklevel=3)


def load_checkpoint(model: torch.nn.Module, checkpoint: Union[str, os.PathLike, Mapping]) -> None:
    """Load ``checkpoint`` (a path, a loaded detectron2 dict or a bare state dict) into ``model``,
    strictly, in place, keeping the model's device and dtype.

    Refuses (:class:`CheckpointError`) keys or shapes that differ from the model's, non-float and
    non-finite tensors; warns (:class:`CheckpointDtypeWarning`) when the float dtype differs. If
    the model has a vocabulary, its text embeddings are recomputed from the loaded text tower.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        state = read_state_dict(checkpoint)
    elif isinstance(checkpoint, Mapping):
        source = "checkpoint"
        state = extract_state_dict(checkpoint)
    else:
        raise TypeError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    check_state_dict(model, state, source)
    check_tensors(state, source)
    _warn_dtype(model, state, source)
    model.load_state_dict(state, strict=True)
    # Embeddings computed with the previous text tower would be stale.
    if getattr(model, "class_names", None) and getattr(model, "text_embeddings", None) is not None:
        model.set_vocabulary(list(model.class_names))


def save_checkpoint(model: torch.nn.Module, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> None:
    """Save ``model``'s weights as a detectron2-style checkpoint ``{"model": state_dict}``."""
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    payload.update(extra or {})
    torch.save(payload, path)


def _cause(error: Exception) -> str:
    """``Type: first line`` of an error; for torch's weights-only refusals, the unpickler's own reason
    (its preamble recommends ``weights_only=False``, which is no fix for a damaged file)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        line = f"weights-only unpickler: {reason[0]}" if reason else ""
    else:
        line = _first_line(error)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""
