"""``sed-fast eval``: the official metrics on the official datasets, in one process or many.

    sed-fast eval ade150 --checkpoint sed_model_base.pth --out eval/ade150
    sed-fast eval --images imgs/ --labels labels/ --vocab classes.txt --ignore 255 --random-weights --out o/
    torchrun --nproc-per-node 8 -m sed_fast eval pc459 --checkpoint ... --out eval/pc459

Exit codes: 0 evaluated; 1 the evaluation failed (no labelled pixel at all, an unexpected error);
2 bad input: a usage error (bad option, missing dataset folder, unusable resume file, an --out that
cannot be written or lacks the space for the state, an --out another run is using: nothing was
evaluated) or a file of the dataset that cannot be used (an unreadable image or label map, invalid
label values: the message says which fix applies); 128 + n stopped by signal n (130 SIGINT,
143 SIGTERM, 129 SIGHUP: what was finished is saved, rerun with --resume).

Rank 0 holds ``--out`` for the whole run (:func:`sed_fast.toolkit.outdir_lock.exclusive_output_dir`): a
second evaluation into the same folder stops at once, naming the PID of the first.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..toolkit.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_USAGE, UsageError, parse_command_line, \
    signal_name
from ..toolkit.options import DTYPES, add_model_options, build_model, check_model_options, read_checkpoint
from ..base.files import remove_stale_temporaries
from ..toolkit.outputs import OutputClaim, hold_output
from ..toolkit.signals import StopSignals

_PROG = "sed-fast eval"


def build_parser() -> argparse.ArgumentParser:
    from .datasets import DATASETS

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Evaluate SED on a segmentation dataset with detectron2's SemSegEvaluator metrics (mIoU, "
                    "fwIoU, mACC, pACC, per-class IoU and ACC). Writes log.txt (with the official copypaste: "
                    "lines), results.json, results.md, confusion.npy and per_class_iou.png to --out. Runs under "
                    "torchrun for many GPUs or machines.",
        epilog="Datasets are read from --data-root (default $DETECTRON2_DATASETS, else ./datasets) in the layout "
               "of the official datasets/prepare_*.py scripts.")
    data = parser.add_argument_group("dataset")
    data.add_argument("dataset", nargs="?", metavar="DATASET",
                      help=f"an official evaluation set: {', '.join(DATASETS)}; or leave out and give --images, "
                           "--labels, --vocab and --ignore")
    data.add_argument("--data-root", metavar="DIR", help="folder holding the datasets (default $DETECTRON2_DATASETS, "
                                                         "else datasets)")
    data.add_argument("--images", metavar="DIR", help="custom dataset: folder of images")
    data.add_argument("--labels", metavar="DIR", help="custom dataset: folder of label maps (PNG/TIFF, class index "
                                                      "per pixel), paired with the images by file stem")
    data.add_argument("--vocab", metavar="NAME|FILE|LIST",
                      help="custom dataset: the class names (built-in name, file, or comma-separated list); "
                           "label value i is class i")
    data.add_argument("--ignore", type=int, metavar="N", help="custom dataset: the label value of unlabelled pixels")
    data.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images (sorted by file stem)")
    data.add_argument("--invalid-labels", choices=("error", "ignore"), default="error",
                      help="a label value that is neither a class nor the ignore value: stop with an error (default) "
                           "or ignore those pixels, counted in the report")
    data.add_argument("--label-palette", metavar="FILE",
                      help="read colour-coded (RGB) label maps: FILE has one 'R G B name' (or 'R,G,B') line per "
                           "class in vocabulary order, and 'ignore R G B' lines for unscored colours")
    data.add_argument("--palette-from", metavar="DATASET",
                      help="read colour label maps with a built-in dataset's official palette (voc20, voc20b: "
                           "PASCAL VOC's SegmentationClass colours)")
    data.add_argument("--skip-unreadable", action="store_true",
                      help="leave out an image or label map that cannot be read (each one named in the log and "
                           "results.json) instead of stopping")

    model = parser.add_argument_group("model")
    add_model_options(model, impl_default="fast")
    model.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0; every process of "
                                                          "a torchrun job builds the same ones)")
    model.add_argument("--compare", choices=("reference",), default=None,
                       help="also evaluate the reference implementation (same weights, same images) and report "
                            "both metric sets, the pixel agreement of their labels and the classes whose IoU differs")
    model.add_argument("--iou-tolerance", type=float, default=0.0, metavar="PP",
                       help="with --compare: list the classes whose IoU differs by more than PP percentage points "
                            "(default 0: any difference)")

    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    run.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per model call (default 1)")
    run.add_argument("--workers", type=int, default=None, metavar="W",
                     help="image decoding processes per evaluating process (default: up to 8, the CPUs shared "
                          "among the processes of this machine; 0 decodes in the main process)")
    run.add_argument("--save-every", type=int, default=100, metavar="N",
                     help="save the running state every N images over all processes (default 100; 0: only at the end)")
    run.add_argument("--resume", action="store_true",
                     help="continue the evaluation saved in --out (same settings); starts afresh if there is none")
    run.add_argument("--overwrite", action="store_true", help="start over even if --out holds a saved evaluation")
    run.add_argument("--legacy-miou", action="store_true",
                     help="detectron2 <= 0.6's mIoU: classes predicted but absent from the ground truth count as "
                          "IoU 0 (lower on PC-459/ADE-847; both rules are in results.json)")
    run.add_argument("--no-plot", action="store_true", help="do not write per_class_iou.png")
    run.add_argument("--save-predictions", action="store_true",
                     help="also write each image's predicted label map as predictions/<stem>.png (palette PNG: "
                          "pixel values the evaluated class indices, in the class colours; 16-bit grey above 256 "
                          "classes; predictions/<model>/ with --compare)")
    run.add_argument("--progress-every", type=float, default=30.0, metavar="S",
                     help="seconds between progress lines when stderr is not a terminal (default 30)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress or info lines (results still printed)")
    run.add_argument("--debug", action="store_true", help="show Python tracebacks with errors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``sed-fast eval`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args, code = parse_command_line(build_parser(), argv)
    if args is None:
        return code
    from .datasets import DatasetError
    from .runner import quiet_loader_shutdown
    from .state import StateError

    signals = StopSignals()  # the runner holds its own over the images; these stop the rest of the run
    signals.install()
    try:
        with quiet_loader_shutdown():
            return _run(args, signals)
    except (UsageError, StateError) as error:
        _error(str(error), args)
        return EXIT_USAGE
    except DatasetError as error:  # a file of the dataset: bad input, and the fix is the user's
        _error(str(error) + _bad_file_hint(args, error), args)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        code = getattr(stop, "exit_code", EXIT_SIGINT)
        saved = _resume_hint(args) or f"; nothing was saved in {args.out}"
        _error(f"interrupted ({signal_name(code - 128)})" + saved, args)
        return code
    except Exception as error:  # noqa: BLE001 - one line; --debug shows the traceback
        _error(f"{type(error).__name__}: {error}" + _resume_hint(args), args)
        if not args.debug:
            print(f"{_PROG}: (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signals.restore()


def _resume_hint(args) -> str:
    from .state import STATE_FILE

    path = Path(os.path.expanduser(args.out)) / STATE_FILE
    if not path.exists():
        return ""
    return f" (the images finished so far are saved in {path}: rerun the same command with --resume to continue)"


def _bad_file_hint(args, error) -> str:
    """What to do about a file that stopped the run (``--resume`` alone would stop on it again)."""
    from .datasets import InvalidLabelError
    from .state import STATE_FILE

    saved = _finished_images(Path(os.path.expanduser(args.out)) / STATE_FILE) > 0
    if isinstance(error, InvalidLabelError):
        return ". Fix the label map, or pass --invalid-labels ignore" + (
            " with --overwrite (it changes the figures, so the saved images are evaluated again)" if saved else "")
    keep = " --resume" if saved else ""
    return (f". Replace the file with a readable copy and rerun{' with --resume' if saved else ''}, remove it (and "
            f"its image or label) from the dataset{' and rerun with --overwrite' if saved else ''}, or rerun with"
            f"{keep} --skip-unreadable to leave it out (named in results.json)")


def _finished_images(path: Path) -> int:
    """How many images the saved state at ``path`` holds (0: none, or no usable state)."""
    from .state import load_state

    try:
        return len(load_state(path).finished) if path.exists() else 0
    except Exception:  # noqa: BLE001 - only a hint depends on it
        return 0


def _error(message: str, args) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    if getattr(args, "debug", False):
        traceback.print_exc()


# -- options -------------------------------------------------------------------------------------
def _check_options(args):
    import torch

    spec, dtype, device = check_model_options(args)
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--save-every", args.save_every, 0), ("--limit", args.limit, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if args.iou_tolerance < 0:
        raise UsageError(f"--iou-tolerance must be >= 0, got {args.iou_tolerance}")
    if args.compare and args.impl == "reference":
        raise UsageError("--compare reference compares the fast implementation with the reference: use --impl fast")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    custom = [args.images, args.labels, args.vocab, args.ignore]
    if args.dataset is not None and any(v is not None for v in custom):
        raise UsageError("give either a dataset name or --images/--labels/--vocab/--ignore, not both")
    if args.label_palette is not None and args.palette_from is not None:
        raise UsageError("--label-palette and --palette-from exclude each other")
    if args.dataset is None and not all(v is not None for v in custom):
        raise UsageError("no dataset: give a dataset name (ade150, ade847, pc59, pc459, voc20, voc20b, coco) or all "
                         "of --images, --labels, --vocab and --ignore")
    device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return spec, dtype, device_type

def _device(args, device_type: str, ctx):
    """The torch device of this process (:func:`sed_fast.toolkit.options.parse_device`; under torchrun
    cuda:LOCAL_RANK)."""
    import torch

    from ..toolkit.options import parse_device

    if device_type == "cpu":
        return torch.device("cpu")
    return parse_device(args.device or "cuda", ctx.local_rank if ctx.distributed else None)


def _default_workers() -> int:
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def _load_dataset(args):
    from .dataset_options import load_dataset

    return load_dataset(args.dataset, data_root=args.data_root, images=args.images, labels=args.labels,
                        vocab=args.vocab, ignore=args.ignore, limit=args.limit, label_palette=args.label_palette,
                        palette_from=args.palette_from)


def _fingerprint(items: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for item in items:
        digest.update(item.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _settings(args, dataset, spec, device) -> dict:
    """What a resumed run must share with the saved one: everything that changes a figure."""
    # The images by file stem: a copy of the dataset elsewhere resumes, and a label map fixed after
    # an "invalid label" error (not finished yet) does not block the resume.
    stems = [sample.stem for sample in dataset.samples]
    if args.checkpoint is not None:
        weights = f"sha256 {_checkpoint_sha256(args.checkpoint)}"
    else:
        weights = f"random (seed {args.seed})"
    return {"dataset": dataset.spec.name, "images": f"{len(stems)} images, stems sha1 {_fingerprint(stems)[:16]}",
            "num_classes": dataset.num_classes, "vocabulary": f"sha1 {_fingerprint(dataset.vocabulary)[:16]}",
            "class_names": f"sha1 {_fingerprint(dataset.class_names)[:16]}",
            "ignore_label": dataset.spec.ignore_label, "background_from": dataset.spec.background_from,
            "invalid_labels": args.invalid_labels, "variant": spec.name, "impl": args.impl, "compare": args.compare,
            "weights": weights, "dtype": DTYPES[args.dtype], "cer_topk": args.cer_topk, "resolution": args.resolution,
            "device_type": device.type,
            # only with a palette: states saved without one stay resumable
            **({"label_palette": dataset.palette.fingerprint()} if getattr(dataset, "palette", None) else {})}


def _checkpoint_sha256(path_text: str) -> str:
    from ..data.checkpoint import checkpoint_sha256

    try:
        return checkpoint_sha256(os.path.expanduser(path_text))
    except OSError as error:
        raise UsageError(f"cannot read the checkpoint {path_text}: {error.strerror or error}") from error


def _needed_bytes(num_classes: int, models: int) -> int:
    """Free space the outputs need: per model the state's matrix, confusion.npy and a temporary copy
    of each while it replaces the previous one; the reports (~2 KiB per class) and the plot."""
    matrix = 8 * (num_classes + 1) ** 2
    return models * 4 * matrix + 2048 * num_classes + (1 << 20)


# -- model ---------------------------------------------------------------------------------------
def _build_models(args, spec, dtype, device, vocabulary: List[str], ctx, info,
                  settings_weights: str = "") -> Dict[str, object]:
    state_dict = None
    if args.checkpoint is not None:
        state_dict = read_checkpoint(args.checkpoint)
        # The settings (and a resumed state) name the weights by the file's sha256, taken before
        # the model was built: the file read must still be that one (cached unless cheap to hash).
        read, named = _checkpoint_sha256(args.checkpoint), settings_weights.split(" ", 1)[-1]
        if settings_weights.startswith("sha256 ") and read != named:
            raise UsageError(f"the checkpoint {args.checkpoint} changed while the evaluation started (sha256 "
                             f"{named} when the settings were taken, {read} when it was read): rerun")

    start = time.perf_counter()
    first, impl = build_model(args, spec, dtype, device, state_dict, impl="reference" if args.compare else None)
    state_dict = None  # the weights are in the model now
    info(f"built SED-{spec.name.upper()} ({impl}, {args.dtype}, {device}) in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    # Rank 0 first: it fills the on-disk text cache that the other processes then read.
    if not ctx.is_main:
        ctx.barrier()
    first.set_vocabulary(vocabulary, progress=False if (args.quiet or not ctx.is_main) else None)
    if ctx.is_main:
        ctx.barrier()
    info(f"vocabulary: {len(vocabulary)} classes ({time.perf_counter() - start:.1f} s)")
    if not args.compare:
        return {impl: first}
    from ..models.fast.model import SEDFast
    try:
        fast = SEDFast.from_reference(first)
    except Exception as error:  # noqa: BLE001
        raise UsageError(f"the fast implementation cannot be built ({type(error).__name__}: {error})") from error
    return {"fast": fast, "reference": first}


# -- run -----------------------------------------------------------------------------------------
def _run(args, signals: StopSignals) -> int:
    from . import distributed, report, runner, state as state_mod
    from .metrics import compute_metrics, copypaste_lines

    wall_start = time.perf_counter()
    spec, dtype, device_type = _check_options(args)
    dataset = _load_dataset(args)
    out_dir = Path(os.path.expanduser(args.out))
    ctx = distributed.setup(device_type)
    held = contextlib.ExitStack()  # rank 0's lock on --out, for the whole run
    try:
        device = _device(args, device_type, ctx)
        quiet = args.quiet or not ctx.is_main
        info = (lambda message: None) if quiet else (lambda message: print(f"{_PROG}: {message}", file=sys.stderr))
        log: List[str] = []

        def note(message: str) -> None:
            log.append(report.log_line(message))
            info(message)

        note(f"dataset {dataset.spec.name}: {len(dataset.samples)} images with labels "
             f"(images without a label: {len(dataset.images_without_label)}; labels without an image: "
             f"{len(dataset.labels_without_image)}) from {dataset.image_dir} and {dataset.label_dir}")
        if dataset.labels_without_image and ctx.is_main:
            print(f"{_PROG}: warning: {len(dataset.labels_without_image)} label map(s) have no image and are not "
                  f"evaluated (e.g. {', '.join(dataset.labels_without_image[:3])})", file=sys.stderr)
        settings = _settings(args, dataset, spec, device)
        state_file = state_mod.state_path(out_dir)

        # Rank 0 owns the output folder: it decides whether to resume and tells the others which
        # images are finished (all they need of the state), or why nothing can be evaluated.
        state, decision = None, None
        if ctx.is_main:
            try:
                _hold_output(held, args, out_dir, dataset, note)
                state = _prepare_state(args, out_dir, state_file, settings, dataset, state_mod, runner, note)
                decision = ("ok", list(state.finished))
            except (UsageError, state_mod.StateError) as error:
                decision = ("error", str(error))
        decision = ctx.broadcast_object(decision)
        if decision[0] == "error":
            raise UsageError(decision[1])
        if not ctx.is_main:
            state = runner.new_state(settings, [], dataset.num_classes)
            state.finished = decision[1]
        if args.random_weights and ctx.is_main:
            print(f"{_PROG}: WARNING: RANDOM WEIGHTS (--random-weights, no checkpoint): every figure of this run is "
                  "meaningless and is marked as such", file=sys.stderr)

        # before the models: their set-up waits for every process, so no rank writes while rank 0 clears
        sink = _prediction_writer(args, out_dir, dataset, ["fast", "reference"] if args.compare else [args.impl],
                                  clear=ctx.is_main and not state.finished) if args.save_predictions else None
        models = _build_models(args, spec, dtype, device, dataset.vocabulary, ctx, info, settings["weights"])
        if ctx.is_main:
            for name in models:
                fresh = runner.new_state(settings, [name], dataset.num_classes)
                state.confusion.setdefault(name, fresh.confusion[name])
        before = len(state.finished)
        eval_start = time.perf_counter()
        state = runner.evaluate(models, dataset, state, ctx=ctx, device=device,
                                state_file=state_file if ctx.is_main else None, batch_size=args.batch_size,
                                workers=args.workers if args.workers is not None else _default_workers(),
                                save_every=args.save_every, invalid_labels=args.invalid_labels, progress=not quiet,
                                progress_interval=args.progress_every, palette=dataset.palette,
                                skip_unreadable=args.skip_unreadable, on_predictions=sink)
        eval_seconds = time.perf_counter() - eval_start
        if not ctx.is_main:
            return EXIT_OK

        session_images = len(state.finished) - before
        confusion = {name: state.confusion[name].numpy() for name in models}
        config = {key: getattr(args, key) for key in ("variant", "impl", "compare", "cer_topk", "dtype", "resolution",
                                                       "batch_size", "workers", "seed", "limit", "invalid_labels",
                                                       "legacy_miou", "data_root")}
        config.update(random_weights=args.checkpoint is None, world_size=ctx.world_size,
                      checkpoint=str(Path(os.path.expanduser(args.checkpoint)).resolve()) if args.checkpoint else None,
                      checkpoint_sha256=settings["weights"].split(" ", 1)[-1] if args.checkpoint else None,
                      official_resolution=args.resolution == 768, settings=settings,
                      preprocess=getattr(next(iter(models.values())), "preprocess", None),
                      label_palette=dataset.palette.source if dataset.palette is not None else None,
                      skip_unreadable=args.skip_unreadable)
        from ..toolkit.record import run_record
        env = run_record(device)  # versions, device, CPU features, threads, commit, PID, host, command line
        env["git"] = {"commit": env["commit"], "dirty": env["dirty"]}
        timing = {"wall_seconds_this_session": time.perf_counter() - wall_start,
                  "eval_seconds_this_session": eval_seconds, "images_this_session": session_images,
                  "images_per_second_this_session":
                      session_images / eval_seconds if eval_seconds > 0 and session_images else None,
                  "eval_seconds_all_sessions": state.seconds, "resumed_images": before}
        counts = {"evaluated": len(state.finished) - len(state.skipped), "in_dataset": len(dataset.samples),
                  "skipped_unreadable": len(state.skipped),
                  "images_without_label": len(dataset.images_without_label),
                  "labels_without_image": len(dataset.labels_without_image)}
        results = report.build_results(confusion=confusion, class_names=dataset.class_names, legacy=args.legacy_miou,
                                       config=config, dataset=dataset.describe(), counts=counts, timing=timing,
                                       env=env, counters=state.counters, iou_tolerance=args.iou_tolerance)
        results["skipped_unreadable"] = [{"stem": stem, "error": error} for stem, error in state.skipped]
        if state.skipped:
            note(f"skipped {len(state.skipped)} unreadable file(s) (--skip-unreadable), not in the figures: "
                 + "; ".join(error for _, error in state.skipped))
        lines = []
        for position, name in enumerate(results["models"]):
            detectron2 = compute_metrics(confusion[name], dataset.class_names, legacy=args.legacy_miou)
            task = "sem_seg" if position == 0 else f"sem_seg[{name}]"
            if len(models) > 1:
                lines.append(f"model {name}:")
            lines.extend(copypaste_lines(detectron2, task=task))
        invalid = state.counters.get("invalid_label_pixels", 0)
        if invalid:
            note(f"{invalid} label pixel(s) had values that are neither a class nor the ignore label; ignored "
                 "(--invalid-labels ignore)")
        if "comparison" in results:
            c = results["comparison"]
            note(f"labels of fast and reference agree on {100 * (c['pixel_agreement'] or 0):.4f}% of "
                 f"{c['pixels_compared']} pixels; {len(c['classes_with_different_iou'])} class(es) differ in IoU")
        note(f"evaluated {len(state.finished)} images ({session_images} in this session, "
             f"{timing['images_per_second_this_session'] or 0:.2f} images/s)")
        log.extend(report.log_line(line) for line in lines)
        for line in lines:
            print(line, flush=True)
        with signals.finishing():  # the result set whole: a signal during it comes after the run's end
            messages = report.write_reports(out_dir, results, confusion, log, plot=not args.no_plot)
        for message in messages:
            print(f"{_PROG}: {message}", file=sys.stderr)
        if signals.late is not None:
            print(f"{_PROG}: the evaluation finished before {signal_name(signals.late)} took effect: the results "
                  "are complete, nothing is left to resume", file=sys.stderr)
        info(f"results in {out_dir} (results.json, results.md, log.txt)")
        if args.random_weights:
            print(f"{_PROG}: WARNING: these figures were made with RANDOM WEIGHTS", file=sys.stderr)
        first = next(iter(results["models"].values()))
        if first["summary"]["mIoU"] is None:
            print(f"{_PROG}: error: no labelled pixel in the {len(state.finished)} image(s): the metrics are "
                  "undefined", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    finally:
        held.close()
        ctx.close()


def _hold_output(held: contextlib.ExitStack, args, out_dir: Path, dataset, note) -> None:
    """Rank 0: take --out for this run (writable, space for the state, no other run in it)."""
    models = 2 if args.compare else 1
    lock = held.enter_context(hold_output(args.out, f"eval {args.dataset or 'custom dataset ' + str(args.images)}",
                                          need_bytes=_needed_bytes(dataset.num_classes, models)))
    if lock.previous:
        note(f"took over the lock of {out_dir} left by PID {lock.previous.get('pid')} on "
             f"{lock.previous.get('host')}, which is no longer running")


PREDICTIONS_DIR = "predictions"


def _prediction_writer(args, out_dir: Path, dataset, models: List[str], clear: bool):
    """``on_predictions`` for :func:`runner.evaluate`: each image's scored labels as a PNG in
    ``<out>/predictions/`` (``<model>/`` sub-folders with --compare), written atomically. A fresh
    (not resumed) run first removes the PNGs an earlier run left there: the folder is this tool's."""
    import numpy as np

    from ..base.files import atomic_write
    from ..visualize import label_map_image, png_info

    folders = {name: out_dir / PREDICTIONS_DIR / (name if len(models) > 1 else "") for name in models}
    for folder in folders.values():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot create {folder} for --save-predictions: {error}") from error
        if clear:
            for stale in folder.glob("*.png"):
                stale.unlink()
    colours = np.asarray(dataset.palette.colours, dtype=np.uint8) if getattr(dataset, "palette", None) else None
    info = png_info(args.checkpoint is None)

    def write(stems, predictions) -> None:
        for name, preds in predictions.items():
            for stem, pred in zip(stems, preds):
                picture = label_map_image(pred.cpu().numpy(), dataset.num_classes, colours)
                atomic_write(folders[name] / f"{stem}.png",
                             lambda handle, picture=picture: picture.save(handle, format="PNG", pnginfo=info))
    return write


def _prepare_state(args, out_dir: Path, state_file: Path, settings: dict, dataset, state_mod, runner, note):
    """Rank 0, holding --out: the state to start from (a resumed one, or new)."""
    model_names = ["fast", "reference"] if args.compare else [args.impl]
    names = _output_names(args, state_file, model_names)
    claim = OutputClaim(out_dir, "eval", legacy_owned=_written_by_an_earlier_run(out_dir, state_file, names,
                                                                                 state_mod))
    claim.refuse_collisions(f"--out {args.out}", names, keep=[Path(os.path.expanduser(args.checkpoint))]
                            if args.checkpoint else [])  # before anything is read, deleted or written
    if state_file.exists() and args.resume:
        state = state_mod.load_state(state_file)
        state_mod.check_resumable(state, settings, [s.stem for s in dataset.samples], state_file,
                                  names=_names(dataset))
        note(f"resuming: {len(state.finished)} of {len(dataset.samples)} images already evaluated ({state_file})")
        claim.claim(names)
        remove_stale_temporaries(out_dir)
        return state
    if state_file.exists() and not args.overwrite:
        raise UsageError(f"{out_dir} holds a saved evaluation ({state_file.name}): pass --resume to continue it, "
                         "--overwrite to start over, or another --out")
    if args.resume:
        raise UsageError(f"--resume: --out {args.out} holds no saved evaluation to resume (no {state_file.name}); "
                         "nothing was changed. Leave out --resume to start an evaluation")
    claim.claim(names)
    claim.remove_owned(names=names)  # an earlier run's results (and state, with --overwrite): this run's are new
    remove_stale_temporaries(out_dir)
    state = runner.new_state(settings, model_names, dataset.num_classes)
    state.names = _names(dataset)
    return state


def _output_names(args, state_file: Path, model_names: List[str]) -> List[str]:
    """The names eval writes into --out (files, and the predictions folder)."""
    names = [state_file.name, "results.json", "results.md", "log.txt", "per_class_iou.png"]
    names += ["confusion.npy"] if len(model_names) == 1 else [f"confusion_{name}.npy" for name in model_names]
    return names + ([PREDICTIONS_DIR] if args.save_predictions else [])


def _written_by_an_earlier_run(out_dir: Path, state_file: Path, names: List[str], state_mod):
    """``legacy_owned`` of eval's claim: in a folder an eval of a sed-fast without claim files wrote
    (its resume file, or a results.json that lists its result set), eval's output names are its own.
    Read on first use (a folder with a claim file never asks)."""
    found: List[set] = []

    def earlier_outputs() -> set:
        if not found:
            try:
                results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                results = None
            listed = isinstance(results, dict) and isinstance(results.get("files"), dict)
            earlier = listed or state_mod.is_state_file(state_file)
            found.append((set(names) | (set(results["files"]) if listed else set())) if earlier else set())
        return found[0]

    return lambda name: name in earlier_outputs()


def _names(dataset) -> Dict[str, List[str]]:
    return {"vocabulary": list(dataset.vocabulary), "class_names": list(dataset.class_names)}
