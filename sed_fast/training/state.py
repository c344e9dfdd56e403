"""Checkpoints and the resumable state of a training run.

One naming scheme (detectron2's, which the official code reads): after k iterations (detectron2's
``iteration`` = k - 1, the index of the last one done) rank 0 writes, each file atomically
(temporary file, then ``os.replace``):

1. ``model_{k-1:07d}.pth`` (``model_final.pth`` at the end): weights only, ``{"model": <official key
   names>, "iteration": k - 1}``, loadable strictly by the official code, ``build_sed(checkpoint=...)``,
   ``sed-fast segment/eval --checkpoint`` and ``sed-fast train --init-from``;
2. ``<checkpoint>.state.pt`` beside it: what ``--resume`` needs besides the weights (optimizer, grad
   scaler, every process's RNG states, the settings, the time spent) and the names of the
   checkpoints this run wrote and keeps. The state of a finished run holds no optimizer (nothing is
   left to resume): it only records that the run finished, with its settings;
3. ``last_checkpoint`` (as detectron2's): the checkpoint's file name, written last, so that it
   always names a complete checkpoint with its complete state.

Then the older files this run wrote go: every older state (one state stays, the latest) and all but
the ``keep_last`` newest checkpoints. Only names recorded in the run's own state are ever deleted,
never a file given as ``protected`` (the weights the run started from).
"""
from __future__ import annotations

import contextlib
import io
import os
import random
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..evaluation.state import StateError, read_payload, settings_differences
from ..base.files import atomic_write_bytes, atomic_write_text

__all__ = ["StateError", "checkpoint_name", "save_training", "load_training", "rng_state", "set_rng_state",
           "LAST_CHECKPOINT", "check_settings", "check_resumable", "iterations_done", "written_outputs",
           "resolve_init_from", "continued_run", "resume_advice", "finished_since",
           "DEFAULT_KEEP_LAST"]

LAST_CHECKPOINT = "last_checkpoint"
STATE_SUFFIX = ".state.pt"
_FORMAT = "sed_fast.training.state"
_VERSION = 1
#: Checkpoints a run keeps by default (``--keep-last``): the newest, and the one before in case it is unusable.
DEFAULT_KEEP_LAST = 2
#: What a finished run's state leaves out: only an interrupted run is resumed.
_RESUME_ONLY = ("optimizer", "scaler", "rng")


def checkpoint_name(done: int, max_iter: int) -> str:
    return "model_final.pth" if done >= max_iter else f"model_{done - 1:07d}.pth"


def iterations_done(name: str, max_iter: int) -> Optional[int]:
    """The iterations done when checkpoint ``name`` was written (None: not one of this scheme's names)."""
    if name == "model_final.pth":
        return max_iter
    stem = name[len("model_"):-len(".pth")] if name.startswith("model_") and name.endswith(".pth") else ""
    return int(stem) + 1 if stem.isdigit() else None


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


def save_training(out_dir: Path, model_state: Dict[str, torch.Tensor], done: int, max_iter: int, state: dict,
                  written: Sequence[str] = (), keep_last: int = DEFAULT_KEEP_LAST,
                  protected: Iterable[Path] = ()) -> Tuple[Path, List[str]]:
    """Write the checkpoint's state, the checkpoint and ``last_checkpoint``, then delete this run's older files:
    every older state, and the checkpoints older than the ``keep_last`` newest. ``written``: the
    checkpoint names this run wrote before (oldest first; a resumed run's come from its state);
    ``protected``: files never deleted. Returns the checkpoint's path and the names kept."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    out_dir = Path(out_dir)
    name = checkpoint_name(done, max_iter)
    path = out_dir / name
    earlier = [n for n in written if n != name and _own_name(n)]
    kept = (earlier + [name])[-keep_last:]
    finished = done >= max_iter
    payload = {"format": _FORMAT, "version": _VERSION, "checkpoint": name, "iteration": done - 1,
               "finished": finished, "checkpoints": kept,
               **{k: v for k, v in state.items() if not (finished and k in _RESUME_ONLY)}}
    # The state first: a checkpoint in --out without its state beside it is not taken for this
    # run's (the --out rule), so a process killed in between leaves none such; a write that fails
    # takes its state with it.
    state_path = Path(str(path) + STATE_SUFFIX)
    atomic_write_bytes(state_path, _serialise(payload), fsync=True)
    try:
        atomic_write_bytes(path, _serialise({"model": model_state, "iteration": done - 1}), fsync=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(state_path)
        raise
    atomic_write_text(out_dir / LAST_CHECKPOINT, name + "\n", fsync=True)
    keep = {_identity(p) for p in protected} - {None}
    for old in earlier:
        targets = [out_dir / (old + STATE_SUFFIX)] + ([] if old in kept else [out_dir / old])
        for target in targets:
            if _identity(target) not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
    return path, kept


def _own_name(name) -> bool:
    """A checkpoint name of this scheme, a bare file name (never a path out of the folder)."""
    return isinstance(name, str) and iterations_done(name, 1) is not None and Path(name).name == name


def _identity(path: Path):
    """(device, inode) of an existing file, None otherwise: the same file under any name."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def written_outputs(out_dir: Path) -> List[Path]:
    """The checkpoints and states that the run in ``out_dir`` recorded as its own (from the state
    that ``last_checkpoint`` names); empty when there is no readable state."""
    path = last_checkpoint(out_dir)
    if path is None:
        return []
    try:
        state = torch.load(Path(str(path) + STATE_SUFFIX), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - no readable state: nothing is provably the run's
        return []
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        return []
    names = [n for n in state.get("checkpoints", [state.get("checkpoint")]) if _own_name(n)]
    return [Path(out_dir) / n for n in names] + [Path(out_dir) / (n + STATE_SUFFIX) for n in names]


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
    state = read_payload(state_path, _FORMAT, _VERSION, "training state", hint)
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


def resolve_init_from(given) -> Path:
    """The weights file that ``--init-from`` names: a checkpoint file, or a run's folder (its
    ``model_final.pth``, else the checkpoint its ``last_checkpoint`` names)."""
    path = Path(os.path.expanduser(str(given)))
    if path.is_dir():
        final = path / "model_final.pth"
        latest = final if final.is_file() else last_checkpoint(path)
        if latest is None or not latest.is_file():
            raise StateError(f"--init-from {given}: the folder holds no model_final.pth and no last_checkpoint "
                             "naming a checkpoint; give a checkpoint file or the --out folder of a training run")
        return latest
    if not path.is_file():
        raise StateError(f"--init-from {given}: no such file or folder; give a checkpoint file (e.g. "
                         "OUT/model_final.pth) or the --out folder of a training run")
    return path


def continued_run(path: Path) -> str:
    """What ``--init-from`` continues, for the new run's settings and log: the file and its iterations."""
    path = Path(path).resolve()
    try:
        iteration = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("iteration")
    except Exception:  # noqa: BLE001 - the weights are read (and checked) later; this is a note
        iteration = None
    done = f", after {int(iteration) + 1} iterations of the run in {path.parent}" if isinstance(iteration, int) else ""
    return f"{path}{done}"


def resume_advice(out_dir: Path, max_iter: int) -> str:
    """After a failure or an interruption: the last good checkpoint in ``out_dir`` and what
    ``--resume`` will run from it (by its name: no state is read)."""
    path = last_checkpoint(out_dir)
    if path is None or not path.exists():
        return "No checkpoint was saved"
    done = iterations_done(path.name, max_iter)
    if done is None or done >= max_iter:
        return f"The last good checkpoint is {path}"
    return (f"The last good checkpoint is {path}, after {done} of {max_iter} iterations: rerun the same command "
            f"with --resume to run iterations {done + 1}-{max_iter}")


def finished_since(out_dir: Path, since: float) -> bool:
    """Whether ``out_dir`` holds a final checkpoint complete with its state, written after ``since``
    (a time.time(): the start of the process asking)."""
    try:
        named = (Path(out_dir) / LAST_CHECKPOINT).read_text(encoding="utf-8").strip()
        return named == "model_final.pth" and os.stat(Path(out_dir) / (named + STATE_SUFFIX)).st_mtime >= since
    except (OSError, UnicodeDecodeError):
        return False


def check_resumable(state: dict, current: dict, path, out_dir) -> None:
    """Raise :class:`StateError` unless the run saved in ``state`` can go on with ``current``
    settings. A finished run cannot be resumed with a longer schedule (the cosine lr would change
    under the iterations done): the message says how to continue from its weights instead."""
    saved = state.get("settings", {})
    done = int(state.get("iteration", -1)) + 1
    if state.get("finished") and current.get("max_iter") != saved.get("max_iter"):
        raise StateError(
            f"the run in {out_dir} finished after {done} iterations; --resume only continues an interrupted "
            f"run with the same schedule. To train further, start a new run from its weights with a new "
            f"schedule: sed-fast train ... --init-from {Path(out_dir) / 'model_final.pth'} --max-iter "
            f"{current.get('max_iter')} --out NEW_FOLDER (the learning rate starts again at --base-lr and "
            f"follows a cosine over the new --max-iter)")
    check_settings(saved, current, path)


def check_settings(saved: dict, current: dict, path) -> None:
    differences = settings_differences(saved, current)
    if differences:
        raise StateError(f"cannot resume {path}: it was trained with other settings: " + "; ".join(differences)
                         + ". Rerun with the same settings, or pass --overwrite (or another --out) to start over")
