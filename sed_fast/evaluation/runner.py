"""The evaluation loop: decode in loader workers, predict labels, accumulate confusion matrices.

Per process: its shard of the images still to do (:func:`distributed.shard`), read by a
``DataLoader`` (``workers`` processes, pinned memory on CUDA), ``batch_size`` images at a time
through :func:`predict`; each image's (H, W) labels go into a confusion matrix on the device
(``torch.bincount``), so no full-size (T, H, W) score tensor leaves the model and nothing but the
label maps is copied. At every sync point (each ``save_every`` images over all processes, and at
the end) the new counts of all processes are summed (all-reduce) and rank 0 saves the state, so an
interrupted run loses at most ``save_every`` images. Every process passes the same number of sync
points whatever the length of its shard, as collectives require.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..toolkit.progress import Progress

from ..toolkit.signals import StopSignals
from .datasets import DatasetError, EvalDataset, InvalidLabelError, ResolvedDataset, collate
from .distributed import Context, shard
from .metrics import ConfusionMatrix
from .state import EvalState, save_state

__all__ = ["predict", "evaluate", "Progress", "COUNTERS"]

#: Counters kept with the confusion matrices (summed over processes and sessions).
COUNTERS = ("invalid_label_pixels", "agree_pixels", "compared_pixels", "agree_labelled_pixels",
            "compared_labelled_pixels")


def predict(model, images: List[torch.Tensor]) -> List[torch.Tensor]:
    """The model's label maps of ``images`` ((3, H_i, W_i) uint8 RGB): a list of (H_i, W_i) int64
    class indices at each image's size (argmax over the classes, first index on ties).

    The single place the evaluation calls a model: ``predict_labels`` applies the official
    test-time resize and never holds the full-size (T, H, W) scores.
    """
    return model.predict_labels(images)


def sync_plan(todo: int, world_size: int, batch_size: int, save_every: int):
    """(images per process between sync points, number of sync points), equal on all processes.

    The step is a multiple of the batch size so that every process reaches each sync point after
    whole batches; ``save_every`` <= 0 means a single sync point at the end.
    """
    longest = math.ceil(todo / world_size)
    if longest == 0:
        return batch_size, 0
    if save_every <= 0:
        return longest, 1
    step = max(1, math.ceil(save_every / world_size))
    step = math.ceil(step / batch_size) * batch_size
    return step, math.ceil(longest / step)


def _from_resource_sharer(tb) -> bool:
    frames = traceback.extract_tb(tb) if tb is not None else []
    return any(frame.filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")) for frame in frames)


def _quiet_excepthook(previous):
    """``sys.excepthook`` without multiprocessing's resource-sharer noise (its serving thread
    reports a connection cut short through ``sys.excepthook`` itself)."""
    def hook(exc_type, exc, tb):
        if not _from_resource_sharer(tb):
            previous(exc_type, exc, tb)
    return hook


def worker_init(worker_id: int) -> None:
    """Set up a loader worker: Ctrl-C (a terminal sends it to the whole process group) is left to
    the main process, which saves the state and stops the workers; and a worker stopped while the
    main process fetches a batch's shared file descriptors from it (multiprocessing's resource
    sharer) does not print the sharer's traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # a closing terminal signals the whole group too
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.excepthook = _quiet_excepthook(sys.excepthook)


@contextlib.contextmanager
def quiet_loader_shutdown():
    """The main process's side of :func:`worker_init`, while the run lasts. Other exceptions are
    reported as usual."""
    previous = sys.excepthook
    sys.excepthook = _quiet_excepthook(previous)
    try:
        yield
    finally:
        sys.excepthook = previous


def evaluate(models: Dict[str, torch.nn.Module], dataset: ResolvedDataset, state: EvalState, *, ctx: Context,
             device: torch.device, state_file=None, batch_size: int = 1, workers: int = 0, save_every: int = 0,
             invalid_labels: str = "error", progress: bool = True, progress_interval: float = 30.0,
             on_batch: Optional[Callable[[int], None]] = None, palette=None,
             skip_unreadable: bool = False, on_predictions: Optional[Callable] = None) -> EvalState:
    """Evaluate the images of ``dataset`` not yet in ``state.finished`` with each of ``models``
    (``{"model": m}``, or ``{"fast": f, "reference": r}`` to compare); update and return ``state``
    (complete on rank 0; the other ranks only contribute their counts).

    ``state_file``: where rank 0 saves the state at each sync point (None: not saved).
    ``palette``: reads colour label maps (:mod:`sed_fast.evaluation.palette`).
    ``skip_unreadable``: an image or label map that cannot be read is left out, named with its
    error in ``state.skipped`` (and finished: a resumed run does not retry it), instead of
    stopping the run.
    ``on_predictions(stems, {model name: [scored (H, W) label tensors]})``: called with each
    batch's predictions (``--save-predictions``).
    """
    samples = dataset.samples
    finished = set(state.finished)
    todo = [i for i, sample in enumerate(samples) if sample.stem not in finished]
    mine = shard(todo, ctx.rank, ctx.world_size)
    step, syncs = sync_plan(len(todo), ctx.world_size, batch_size, save_every)
    num_classes = dataset.num_classes

    loader = torch.utils.data.DataLoader(
        EvalDataset(samples, mine, num_classes, dataset.spec.ignore_label, invalid_labels, palette),
        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=worker_init if workers > 0 else None)
    batches = iter(loader)
    matrices = {name: ConfusionMatrix(num_classes, device, dataset.spec.background_from) for name in models}
    counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
    done: List[str] = []  # stems finished since the last sync
    skipped: List[List[str]] = []  # [stem, error] of the unreadable ones among them
    bar = Progress(len(mine), progress and ctx.is_main, interval=progress_interval,
                   desc="sed-fast eval" + (f" (rank 0 of {ctx.world_size})" if ctx.distributed else ""))
    session_start = time.perf_counter()
    seconds_before = state.seconds
    processed = 0

    def merge() -> None:
        """Sum the new counts of all processes into ``state`` (rank 0) and save it."""
        for name, matrix in matrices.items():
            total = ctx.all_reduce_sum(matrix.matrix)
            if ctx.is_main:
                state.confusion[name] = state.confusion[name] + total.cpu()
            matrix.matrix.zero_()
        totals = ctx.all_reduce_sum(counters).cpu().tolist()
        counters.zero_()
        stems = [stem for part in ctx.all_gather_objects(list(done)) for stem in part]
        done.clear()
        left_out = [entry for part in ctx.all_gather_objects(list(skipped)) for entry in part] \
            if skip_unreadable else []
        skipped.clear()
        if ctx.is_main:
            for key, value in zip(COUNTERS, totals):
                state.counters[key] = int(state.counters.get(key, 0)) + int(value)
            state.finished.extend(stems)
            state.skipped.extend(left_out)
            state.seconds = seconds_before + (time.perf_counter() - session_start)
            state.complete = len(state.finished) == len(samples)
            if state_file is not None:
                save_state(state_file, state)

    # A batch's counts and its stems are added together (``adding``); an error anywhere else
    # leaves the running counts consistent with ``done``, so one process can still save them.
    adding = False
    # SIGINT, SIGTERM and SIGHUP raise Interrupted (a KeyboardInterrupt that carries its exit code
    # 128 + n) and are recorded: one swallowed in a finaliser still stops the loop at the next image.
    interrupt = StopSignals()
    try:
        interrupt.install()
        for sync in range(syncs):
            target = min((sync + 1) * step, len(mine))
            while processed < target:
                batch = next(batches)
                usable, unreadable = _split_unreadable(batch, skip_unreadable)
                for stem, error in unreadable:
                    bar.write(f"sed-fast eval: warning: skipped (--skip-unreadable): {error}")
                updates, extra = (_process(usable, models, matrices, counters, device, num_classes, on_predictions)
                                  if usable["stem"] else ({}, torch.zeros_like(counters)))
                adding = True
                for name, delta in updates.items():
                    matrices[name].matrix += delta
                counters += extra
                done.extend(batch["stem"])
                skipped.extend([stem, error] for stem, error in unreadable)
                adding = False
                processed += len(batch["stem"])
                bar.update(len(batch["stem"]))
                interrupt.check()
                if on_batch is not None:
                    on_batch(processed)
            merge()
        if syncs == 0:
            merge()
    except BaseException:
        # One process (no collective to wait for): save what is finished before stopping, on an
        # interrupt as on an unreadable image. Under torchrun the last sync point's save stands.
        if not ctx.distributed and not adding and state_file is not None:
            try:
                merge()
            except Exception as save_error:  # noqa: BLE001 - the first error is the one to report
                bar.write(f"sed-fast eval: warning: could not save the finished images ({save_error}); "
                          "the last periodic save stands")
        raise
    finally:
        interrupt.restore()
        bar.close()
        del batches
    return state


def _split_unreadable(batch: dict, skip: bool):
    """(the batch without its unreadable items, [(stem, error)] of those) when ``skip``; else the
    batch as it is (its errors stop the run in :func:`_process`)."""
    if not skip:
        return batch, []
    bad = [i for i, (error, unreadable) in enumerate(zip(batch["error"], batch["unreadable"]))
           if error is not None and unreadable]
    if not bad:
        return batch, []
    keep = [i for i in range(len(batch["stem"])) if i not in bad]
    return {key: [values[i] for i in keep] for key, values in batch.items()}, \
        [(batch["stem"][i], batch["error"][i]) for i in bad]


def _process(batch: dict, models, matrices, counters: torch.Tensor, device: torch.device, num_classes: int,
             on_predictions: Optional[Callable] = None):
    """One batch's confusion-matrix increments per model and counter increments (not yet added)."""
    for error, unreadable in zip(batch["error"], batch["unreadable"]):
        if error is not None:  # the loader names the file and the problem
            raise (DatasetError if unreadable else InvalidLabelError)(error)
    images = [image.to(device, non_blocking=True) for image in batch["image"]]
    labels = [label.to(device, non_blocking=True) for label in batch["label"]]
    predictions = {}
    for name, model in models.items():
        predictions[name] = predict(model, images)
        if len(predictions[name]) != len(images):
            raise RuntimeError(f"the {name} model returned {len(predictions[name])} label maps for "
                               f"{len(images)} images")
    if on_predictions is not None:
        on_predictions(list(batch["stem"]), {name: [matrices[name].map_prediction(p) for p in preds]
                                             for name, preds in predictions.items()})
    updates = {}
    for name, preds in predictions.items():
        matrix = matrices[name]
        delta = torch.zeros_like(matrix.matrix)
        for stem, pred, gt in zip(batch["stem"], preds, labels):
            if tuple(pred.shape) != tuple(gt.shape):
                raise RuntimeError(f"{stem}: the {name} model's labels are {tuple(pred.shape)}, the ground truth "
                                   f"{tuple(gt.shape)}")
            delta += _confusion(matrix, pred, gt)
        updates[name] = delta
    extra = torch.zeros_like(counters)
    extra[0] = sum(int(n) for n in batch["invalid"])
    if len(predictions) == 2:
        first, second = predictions.values()
        for a, b, gt in zip(first, second, labels):
            same = a.to(device) == b.to(device)
            labelled = gt != num_classes
            extra[1] += same.sum()
            extra[2] += same.numel()
            extra[3] += (same & labelled).sum()
            extra[4] += labelled.sum()
    return updates, extra


def _confusion(matrix: ConfusionMatrix, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    from .metrics import confusion_from_labels
    return confusion_from_labels(matrix.map_prediction(pred), gt, matrix.num_classes)


def new_state(settings: dict, model_names: Sequence[str], num_classes: int) -> EvalState:
    size = num_classes + 1
    return EvalState(settings=settings,
                     confusion={name: torch.zeros(size, size, dtype=torch.int64) for name in model_names},
                     counters={key: 0 for key in COUNTERS})
