"""Checkpoints and resumable states of a training run.

After k iterations (detectron2's ``iteration`` = k - 1, the index of the last one done) rank 0
writes, each file atomically (temporary file, then ``os.replace``):

1. ``model_{k-1:07d}.pth`` (``model_final.pth`` at the end): ``{"model": <official key names>,
   "iteration": k - 1}``, loadable strictly by the official code, ``build_sed(checkpoint=...)`` and
   ``sed-fast eval``;
2. ``<checkpoint>.state.pt`` beside it: what the weights alone do not hold (optimizer, grad scaler,
   every process's RNG states, the settings, the time spent), naming its checkpoint;
3. ``last_checkpoint`` (as detectron2's): the checkpoint's file name, written last, so that it
   always names a complete checkpoint with its complete state.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..evaluation.state import settings_differences
from ..base.files import atomic_write_bytes, atomic_write_text

__all__ = ["StateError", "checkpoint_name", "save_training", "load_training", "rng_state", "set_rng_state",
           "LAST_CHECKPOINT", "check_settings"]

LAST_CHECKPOINT = "last_checkpoint"
STATE_SUFFIX = ".state.pt"
_FORMAT = "sed_fast.training.state"
_VERSION = 1


class StateError(Exception):
    """A resumable state that cannot be used: missing, corrupt, other settings."""


def checkpoint_name(done: int, max_iter: int) -> str:
    return "model_final.pth" if done >= max_iter else f"model_{done - 1:07d}.pth"


def rng_state(device: torch.device) -> dict:
    """Every generator a training process draws from (plain types and tensors, so that the state
    file loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _serialise(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_training(out_dir: Path, model_state: Dict[str, torch.Tensor], done: int, max_iter: int, state: dict) -> Path:
    """Write the checkpoint, its state and ``last_checkpoint``; return the checkpoint's path."""
    name = checkpoint_name(done, max_iter)
    path = Path(out_dir) / name
    atomic_write_bytes(path, _serialise({"model": model_state, "iteration": done - 1}), fsync=True)
    payload = {"format": _FORMAT, "version": _VERSION, "checkpoint": name, "iteration": done - 1, **state}
    atomic_write_bytes(Path(str(path) + STATE_SUFFIX), _serialise(payload), fsync=True)
    atomic_write_text(Path(out_dir) / LAST_CHECKPOINT, name + "\n", fsync=True)
    return path


def last_checkpoint(out_dir: Path) -> Optional[Path]:
    marker = Path(out_dir) / LAST_CHECKPOINT
    if not marker.exists():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    return Path(out_dir) / name if name else None


def load_training(out_dir: Path):
    """(checkpoint path, its state dict, the resumable state) of the last checkpoint in ``out_dir``;
    None when there is none. Unusable files raise :class:`StateError`."""
    path = last_checkpoint(out_dir)
    if path is None:
        return None
    hint = f"start over with --overwrite (or another --out), or fix {out_dir}"
    state_path = Path(str(path) + STATE_SUFFIX)
    for needed in (path, state_path):
        if not needed.is_file():
            raise StateError(f"{out_dir / LAST_CHECKPOINT} names {path.name} but {needed} is missing; {hint}")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, garbage, not a torch file
        raise StateError(f"the resumable state {state_path} is corrupt ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); {hint}") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise StateError(f"{state_path} is not a sed-fast training state; {hint}")
    if state.get("version") != _VERSION:
        raise StateError(f"{state_path} has format version {state.get('version')!r}, this sed-fast reads "
                         f"version {_VERSION}; {hint}")
    from ..data.checkpoint import CheckpointError, read_state_dict
    try:
        weights = read_state_dict(path)
        iteration = torch.load(path, map_location="cpu", weights_only=True).get("iteration")
    except (CheckpointError, OSError, AttributeError) as error:
        raise StateError(f"cannot read the checkpoint {path}: {error}; {hint}") from None
    if iteration != state.get("iteration"):
        raise StateError(f"{path} is at iteration {iteration} but its state {state_path.name} at "
                         f"{state.get('iteration')}; {hint}")
    return path, weights, state


def check_settings(saved: dict, current: dict, path) -> None:
    differences = settings_differences(saved, current)
    if differences:
        raise StateError(f"cannot resume {path}: it was trained with other settings: " + "; ".join(differences)
                         + ". Rerun with the same settings, or pass --overwrite (or another --out) to start over")
