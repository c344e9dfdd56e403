"""Loading official SED checkpoints (detectron2 ``model_final.pth`` files or bare state dicts).

Loading is strict: a file whose keys or shapes differ from the model's is refused with an error
that lists the first few missing, unexpected and mis-shaped keys and names the variant the file
looks like. A checkpoint that was asked for is never replaced by random weights.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

_SHAPES_FILE = Path(__file__).parent / "data" / "official_state_dict_shapes.json"
_SHOW = 5  # how many keys of each kind an error message lists


class CheckpointError(ValueError):
    """The file is not a usable SED checkpoint for this model."""


@lru_cache(maxsize=1)
def official_shapes() -> Dict[str, Dict[str, list]]:
    """{"sed-b": {key: shape}, "sed-l": {...}}: the released checkpoints' keys and shapes."""
    with open(_SHAPES_FILE) as f:
        return json.load(f)


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file: ``{"model": state_dict, ...}`` (detectron2) or a bare state dict.

    Files are read with ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling
    is refused unless ``SED_FAST_TRUST_CHECKPOINTS=1`` (only for files you trust).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - any failure is reported with its cause
        if os.environ.get("SED_FAST_TRUST_CHECKPOINTS", "0") in ("", "0"):
            raise CheckpointError(
                f"could not read checkpoint {path} as a plain tensor file: {type(safe_error).__name__}: "
                f"{_first_line(safe_error)}. If the file is corrupt, download it again; if it is a trusted "
                f"checkpoint that needs full unpickling, set SED_FAST_TRUST_CHECKPOINTS=1.") from safe_error
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"could not read checkpoint {path}: {type(error).__name__}: "
                                  f"{_first_line(error)}") from error
    return extract_state_dict(obj, source=str(path))


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


def guess_variant(state: Mapping[str, torch.Tensor]) -> str:
    """A sentence naming the released variant whose keys and shapes best match ``state``."""
    best_name, best_score, best_total = None, -1, 0
    for name, shapes in official_shapes().items():
        score = sum(1 for k, s in shapes.items() if k in state and list(state[k].shape) == s)
        if score > best_score:
            best_name, best_score, best_total = name, score, len(shapes)
    if best_score <= 0:
        return "it does not look like a SED checkpoint of either released variant (no key matches)"
    return f"it looks most like {best_name} ({best_score} of {best_total} keys match in name and shape)"


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's keys and shapes."""
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
            more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
            lines.append(f"  {len(keys)} {label} key(s): " + "; ".join(keys[:_SHOW]) + more)
    lines.append(f"  {guess_variant(state)}.")
    raise CheckpointError("\n".join(lines))


def load_checkpoint(model: torch.nn.Module, checkpoint: Union[str, os.PathLike, Mapping]) -> None:
    """Load ``checkpoint`` (a path, a loaded detectron2 dict or a bare state dict) into ``model``,
    strictly, in place, keeping the model's device and dtype."""
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        state = read_state_dict(checkpoint)
    elif isinstance(checkpoint, Mapping):
        source = "checkpoint"
        state = extract_state_dict(checkpoint)
    else:
        raise TypeError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


def save_checkpoint(model: torch.nn.Module, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> None:
    """Save ``model``'s weights as a detectron2-style checkpoint ``{"model": state_dict}``."""
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    payload.update(extra or {})
    torch.save(payload, path)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""
