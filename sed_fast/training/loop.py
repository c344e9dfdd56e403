"""The training loop: one process or many (DDP), resumable, stopping cleanly on signals.

Each iteration: the process's part of the global batch (:mod:`data`), the official losses
(``model.losses``, through :func:`_compute_losses`), one all-reduce that agrees on the loss values,
a non-finite loss and a stop request, then backward (DDP averages the gradients over processes),
full-model gradient clipping, AdamW with the cosine lr. Rank 0 writes ``metrics.jsonl``,
``log.txt``, the loss curve and the checkpoints; every process passes the same collectives.
"""
from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..evaluation.datasets import DatasetError
from ..base.files import atomic_write_text
from ..toolkit.signals import STOP_SIGNALS, SignalHandlers
from .optim import set_lr, trainable_parameters
from .state import DEFAULT_KEEP_LAST, rng_state, save_training, set_rng_state

__all__ = ["NonFiniteError", "Stopped", "LOSS_KEYS", "train", "RunIO"]

#: The official loss names, in the official order (final head, then the three auxiliary heads).
LOSS_KEYS = ("loss_sem_seg_0", "loss_sem_seg_1", "loss_sem_seg_2", "loss_sem_seg_3")


class NonFiniteError(RuntimeError):
    """A loss or the gradient norm is NaN or infinite: training stops, nothing is written."""


class Stopped(Exception):
    """SIGINT/SIGTERM before the end: the state was saved at ``done`` of ``max_iter`` iterations."""

    def __init__(self, signum: int, done: int, path: Optional[Path], max_iter: Optional[int] = None):
        self.signum, self.done, self.path, self.max_iter = signum, done, path, max_iter
        of = f" of {max_iter}" if max_iter is not None else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} after {done}{of} iterations")

    def redo(self) -> str:
        """What ``--resume`` will do: the iterations left, numbered from 1."""
        if self.max_iter is None:
            return "the iterations left"
        left = self.max_iter - self.done
        return (f"iteration{'s' if left > 1 else ''} {self.done + 1}"
                f"{f'-{self.max_iter}' if left > 1 else ''} ({left} left)")


def _compute_losses(model, images: torch.Tensor, labels: torch.Tensor, ignore_value: int) -> Dict[str, torch.Tensor]:
    """The training losses of a batch: the model's own ``losses`` (the official training forward)."""
    return model.losses(images, labels, ignore_value=ignore_value)


class _LossForward(torch.nn.Module):
    """``forward`` = the losses, so that DDP's hooks see the training forward."""

    def __init__(self, model: torch.nn.Module, ignore_value: int):
        super().__init__()
        self.model = model
        self.ignore_value = ignore_value

    def forward(self, images, labels):
        return _compute_losses(self.model, images, labels, self.ignore_value)


class SignalFlag(SignalHandlers):
    """The first SIGINT/SIGTERM asks the loop to stop after the current iteration (saving a
    state); a second one stops at once (the last saved state stands)."""

    def __init__(self):
        super().__init__(STOP_SIGNALS)

    def handle(self, signum: int, first: bool) -> None:
        if not first:
            raise KeyboardInterrupt


@dataclass
class RunIO:
    """What rank 0 writes (other ranks: ``out_dir`` None, nothing written)."""

    out_dir: Optional[Path]
    quiet: bool = False
    progress_every: float = 30.0
    plot: bool = True
    log_lines: List[str] = field(default_factory=list)
    history: List[dict] = field(default_factory=list)  # metrics lines, for the plot
    _last_plot: float = 0.0

    def note(self, message: str, always: bool = False) -> None:
        if self.out_dir is None:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        with open(self.out_dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if not self.quiet or always:
            print(f"sed-fast train: {message}", file=sys.stderr, flush=True)

    def metrics(self, record: dict) -> None:
        if self.out_dir is None:
            return
        self.history.append(record)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def plot_curve(self, force: bool = False) -> None:
        if self.out_dir is None or not self.plot or not self.history:
            return
        now = time.monotonic()
        if not force and now - self._last_plot < 60.0:
            return
        self._last_plot = now
        from .plot import loss_curve
        loss_curve(self.history, self.out_dir / "loss_curve.png")


@dataclass
class LoopConfig:
    max_iter: int
    batch_per_rank: int
    ignore_label: int
    clip_value: float
    save_every: int
    eval_every: int
    autocast_dtype: Optional[torch.dtype]
    settings: dict
    keep_last: int = DEFAULT_KEEP_LAST  # checkpoints kept (the final counts); older ones this run wrote go
    written: List[str] = field(default_factory=list)  # checkpoint names this run wrote before (a resumed run's)
    protected: tuple = ()  # files never deleted (the weights the run started from)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader_factory: Callable[[int], object],
          config: LoopConfig, ctx, device: torch.device, io: RunIO, start: int = 0, scaler=None,
          rng_states: Optional[List[dict]] = None, seconds_before: float = 0.0,
          evaluate: Optional[Callable[[int], Dict[str, float]]] = None, flag: Optional[SignalFlag] = None) -> int:
    """Train from ``start`` (iterations done) to ``config.max_iter``; return the iterations done.

    Raises :class:`Stopped` after saving on a signal, :class:`NonFiniteError` on a NaN/inf loss or
    gradient (nothing saved), :class:`DatasetError` on an unusable training pair.
    """
    wrapped = _LossForward(model, config.ignore_label)
    if ctx.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    params = trainable_parameters(optimizer)
    if rng_states is not None:
        set_rng_state(rng_states[ctx.rank], device)
    flag = flag or SignalFlag()
    batches = iter(loader_factory(start))
    done = start
    session_start = time.perf_counter()
    session_iters = 0
    last_progress = -math.inf
    last_saved: Optional[Path] = None
    written = list(config.written)
    iteration_seconds = 0.0

    def save(reason: str) -> Optional[Path]:
        nonlocal last_saved, written
        states = ctx.all_gather_objects(rng_state(device))
        if not ctx.is_main:
            return None
        payload = {"settings": config.settings, "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict() if scaler is not None else None, "rng": states,
                   "world_size": ctx.world_size,
                   "seconds": seconds_before + time.perf_counter() - session_start}
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        path, written = save_training(io.out_dir, weights, done, config.max_iter, payload, written=written,
                                      keep_last=config.keep_last, protected=config.protected)
        last_saved = path
        what = "" if done >= config.max_iter else " and its resumable state"
        io.note(f"saved {path.name}{what} after {done} iterations ({reason}); kept {', '.join(written)}")
        io.plot_curve(force=True)
        return path

    while done < config.max_iter:
        iteration = done  # detectron2's index of the iteration being run
        tick = time.perf_counter()
        batch = next(batches)
        data_time = time.perf_counter() - tick
        for error in batch["error"]:
            if error is not None:
                raise DatasetError(error)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        lr = set_lr(optimizer, iteration, config.max_iter)
        autocast = (torch.autocast(device.type, dtype=config.autocast_dtype) if config.autocast_dtype is not None
                    else _null())
        with autocast:
            losses = wrapped(images, labels)
        missing = [k for k in LOSS_KEYS if k not in losses]
        if missing:
            raise RuntimeError(f"the model's losses lack {', '.join(missing)} (got {', '.join(losses)})")
        total = sum(losses[k].float() for k in losses)
        values = torch.stack([losses[k].detach().float() for k in losses] + [total.detach()])
        finite = torch.isfinite(values).all()
        # One all-reduce per iteration: the mean losses, and whether any process saw a non-finite
        # loss or a signal, so that all processes stop (or go on) together.
        shared = torch.cat([torch.where(finite, values, torch.zeros_like(values)),
                            (~finite).float().reshape(1),
                            torch.tensor([1.0 if flag.received is not None else 0.0], device=values.device)])
        shared = ctx.all_reduce_sum(shared)
        mean_values = (shared[:-2] / ctx.world_size).tolist()
        if shared[-2].item() > 0:
            shown = ", ".join(f"{k}={v.item():.6g}" for k, v in zip(list(losses) + ["total_loss"], values))
            where = f" on {int(shared[-2].item())} of {ctx.world_size} processes" if ctx.distributed else ""
            raise NonFiniteError(f"iteration {iteration}: non-finite loss{where} ({shown}"
                                 f"{'' if ctx.world_size == 1 else f' on rank {ctx.rank}'}); the weights were not "
                                 "updated")
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        max_norm = config.clip_value if config.clip_value > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=2.0)
        if not bool(torch.isfinite(grad_norm)) and scaler is None:
            raise NonFiniteError(f"iteration {iteration}: the gradient norm is {grad_norm.item()} (losses "
                                 + ", ".join(f"{k}={v:.6g}" for k, v in zip(list(losses) + ["total_loss"],
                                                                             mean_values))
                                 + "); the weights were not updated")
        if scaler is not None:
            scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        session_iters += 1
        now = time.perf_counter()
        iteration_seconds = now - tick
        record = {"iteration": iteration, **{k: v for k, v in zip(list(losses), mean_values[:-1])},
                  "total_loss": mean_values[-1], "lr": lr, "grad_norm": float(grad_norm),
                  "time": iteration_seconds, "data_time": data_time,
                  "peak_memory_mb": _peak_memory_mb(device)}
        if scaler is not None:
            record["loss_scale"] = float(scaler.get_scale())
        stop = shared[-1].item() > 0
        if ctx.is_main and (now - last_progress >= io.progress_every or done == config.max_iter or done == start + 1
                            or stop):
            last_progress = now
            rate = (now - session_start) / session_iters
            io.note(f"iter {done}/{config.max_iter} ({100 * done / config.max_iter:.1f}%), total_loss "
                    f"{mean_values[-1]:.4f}, lr {lr:.3g}, {iteration_seconds:.2f} s/iter (data {data_time:.2f} s), "
                    f"grad_norm {float(grad_norm):.3g}, ETA {_clock(rate * (config.max_iter - done))}")
        if evaluate is not None and config.eval_every > 0 and (done % config.eval_every == 0
                                                               or done == config.max_iter):
            pending_eval = True
        else:
            pending_eval = False
        if stop or done == config.max_iter or (config.save_every > 0 and done % config.save_every == 0):
            reason = "end of training" if done == config.max_iter else ("stop requested" if stop else "periodic")
            save(reason)
        if pending_eval:
            # The evaluation must not move the training's random streams (a resumed run skips it).
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                figures = evaluate(done)
            record.update(figures)
            io.note("evaluation after {} iterations: {}".format(
                done, ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if isinstance(v, float))))
        io.metrics(record)
        io.plot_curve()
        if stop and done < config.max_iter:
            raise Stopped(flag.received or signal.SIGTERM, done, last_saved, config.max_iter)
        if stop:  # the signal came during the last iteration: its checkpoint is written, the run is done
            io.note(f"{signal.Signals(flag.received or signal.SIGTERM).name} came during the last iteration, "
                    "after which the final checkpoint was written: the run finished")
    io.plot_curve(force=True)
    return done


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def truncate_metrics(out_dir: Path, done: int) -> List[dict]:
    """Keep the metrics lines of iterations < ``done`` (a resumed run rewrites the rest); return them."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("iteration"), int) and record["iteration"] < done:
            kept.append(record)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept
