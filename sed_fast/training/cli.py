"""``sed-fast train``: train or fine-tune SED with the official recipe, in one process or many.

    sed-fast train coco --checkpoint sed_model_base.pth --out runs/coco
    sed-fast train --images imgs/ --labels labels/ --vocab classes.txt --ignore 255 \\
        --checkpoint sed_model_base.pth --max-iter 2000 --base-lr 2e-5 --out runs/mine
    torchrun --nproc-per-node 4 -m sed_fast train coco --checkpoint ... --out runs/coco

Every option of the official recipe is a flag named after its config key, with the official value
as default (``configs/convnextB_768.yaml`` over ``configs/config.yaml``, ``train_net.py``).

Exit codes: 0 trained; 1 training failed (unreadable image, non-finite loss...); 2 usage error
(bad option, bad data, unusable resume state, --resume with nothing to resume, a file of the
user's in --out under an output's name): nothing was trained; 128 + signal number: stopped by
SIGINT/SIGTERM/SIGHUP after saving a resumable state (rerun with --resume). A stop request that
lands in the last iteration, or after the final checkpoint was written, finishes the run: exit 0.
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
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from ..toolkit.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_USAGE, UsageError, parse_command_line
from ..toolkit.options import add_model_options, check_model_options

_PROG = "sed-fast train"
_AUTOCAST = {"float32": None, "fp32": None, "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
             "float16": "float16"}


def _sizes(text: str) -> List[int]:
    try:
        values = [int(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Train or fine-tune SED with the official recipe (losses, augmentation, AdamW, cosine schedule, "
                    "gradient clipping). Writes metrics.jsonl, log.txt, loss_curve.png and checkpoints in the "
                    "official format (model_XXXXXXX.pth, model_final.pth) with a resumable state beside each to "
                    "--out. Runs under torchrun for many GPUs or machines.",
        epilog="Defaults are the official values (configs/convnextB_768.yaml). The training set is read from "
               "--data-root (default $DETECTRON2_DATASETS, else ./datasets) in the layout of the official "
               "datasets/prepare_coco_stuff.py.")
    data = parser.add_argument_group("training data")
    data.add_argument("dataset", nargs="?", metavar="DATASET",
                      help="the official training set: coco (COCO-Stuff-171 train2017); or leave out and give "
                           "--images, --labels, --vocab and --ignore")
    data.add_argument("--data-root", metavar="DIR", help="folder holding the datasets")
    data.add_argument("--images", metavar="DIR", help="custom training set: folder of images")
    data.add_argument("--labels", metavar="DIR", help="custom training set: folder of label maps (PNG/TIFF, class "
                                                      "index per pixel), paired with the images by file stem")
    data.add_argument("--vocab", metavar="NAME|FILE|LIST", help="custom training set: the class names")
    data.add_argument("--ignore", type=int, metavar="N", help="custom training set: the label value of unlabelled "
                                                              "pixels (MODEL.SEM_SEG_HEAD.IGNORE_VALUE)")
    data.add_argument("--limit", type=int, metavar="N", help="train on the first N pairs only (sorted by stem)")
    data.add_argument("--label-palette", metavar="FILE",
                      help="read colour-coded (RGB) label maps, as sed-fast eval: one 'R G B name' line per class in "
                           "vocabulary order, 'ignore R G B' lines for unlabelled colours")
    data.add_argument("--palette-from", metavar="DATASET",
                      help="read colour label maps with a built-in dataset's official palette (voc20, voc20b)")
    data.add_argument("--skip-data-check", action="store_true",
                      help="do not read every label map before the first iteration (errors then stop training "
                           "when the bad file comes up)")

    aug = parser.add_argument_group("augmentation (INPUT.*)")
    aug.add_argument("--min-size-train", type=_sizes, default=[768], metavar="S[,S...]",
                     help="INPUT.MIN_SIZE_TRAIN: shortest-edge sizes (default 768)")
    aug.add_argument("--max-size-train", type=int, default=2666, metavar="S", help="INPUT.MAX_SIZE_TRAIN (2666)")
    aug.add_argument("--min-size-train-sampling", choices=("choice", "range"), default="choice",
                     help="INPUT.MIN_SIZE_TRAIN_SAMPLING (choice)")
    aug.add_argument("--crop-size", type=_sizes, default=[768, 768], metavar="H[,W]",
                     help="INPUT.CROP.SIZE, absolute (768,768); 0 disables the crop")
    aug.add_argument("--single-category-max-area", type=float, default=1.0, metavar="F",
                     help="INPUT.CROP.SINGLE_CATEGORY_MAX_AREA (1.0: no constraint)")
    aug.add_argument("--no-color-aug-ssd", dest="color_aug_ssd", action="store_false",
                     help="disable INPUT.COLOR_AUG_SSD (on by default)")
    aug.add_argument("--no-flip", dest="flip", action="store_false", help="disable the random horizontal flip")
    aug.add_argument("--size-divisibility", type=int, default=768, metavar="N",
                     help="INPUT.SIZE_DIVISIBILITY: pad crops to a multiple of N (image 128, labels ignore; "
                          "default 768)")

    solver = parser.add_argument_group("solver (SOLVER.*)")
    solver.add_argument("--max-iter", type=int, default=80000, metavar="N", help="SOLVER.MAX_ITER (80000)")
    solver.add_argument("--ims-per-batch", type=int, default=4, metavar="N",
                        help="SOLVER.IMS_PER_BATCH: images per iteration over all processes (4)")
    solver.add_argument("--base-lr", type=float, default=2e-4, metavar="LR", help="SOLVER.BASE_LR (2e-4)")
    solver.add_argument("--weight-decay", type=float, default=1e-4, metavar="WD", help="SOLVER.WEIGHT_DECAY (1e-4)")
    solver.add_argument("--weight-decay-norm", type=float, default=0.0, metavar="WD",
                        help="SOLVER.WEIGHT_DECAY_NORM (0.0)")
    solver.add_argument("--clip-multiplier", type=float, default=0.01, metavar="F",
                        help="SOLVER.CLIP_MULTIPLIER: lr factor of the CLIP parameters (0.01)")
    solver.add_argument("--clip-value", type=float, default=0.01, metavar="V",
                        help="SOLVER.CLIP_GRADIENTS.CLIP_VALUE, full model, L2 (0.01; 0 disables)")
    solver.add_argument("--seed", type=int, default=0, metavar="S",
                        help="SEED: data order, augmentation, random weights, drop path (default 0; the official "
                             "-1 draws one per run, here a run is reproducible)")

    model = parser.add_argument_group("model")
    add_model_options(model, impl_default="fast", cer_topk=False, text_cache=False,
                      checkpoint_help="weights to start from (official SED checkpoint)")
    model.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute decoder activations in the backward (less memory, more time)")
    model.add_argument("--drop-path", type=float, default=None, metavar="P",
                       help="stochastic depth of the CLIP ConvNeXt trunk, rising linearly to P over its blocks as "
                            "timm spreads it (default: the variant's, as the official code's CLIP configs: "
                            "SED-B 0, SED-L 0.1)")

    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    run.add_argument("--save-every", type=int, default=5000, metavar="N",
                     help="SOLVER.CHECKPOINT_PERIOD: checkpoint every N iterations (5000; 0: only at the end)")
    run.add_argument("--resume", action="store_true", help="continue the run saved in --out (same settings)")
    run.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    run.add_argument("--keep-last", type=int, default=2, metavar="N",
                     help="keep the N newest checkpoints this run wrote (model_final.pth counts), delete its older "
                          "ones; only the newest keeps the resumable state (default 2)")
    run.add_argument("--init-from", metavar="PATH",
                     help="continue a finished run: a NEW run (new --out, new cosine schedule over --max-iter, fresh "
                          "optimizer) starting from the weights of PATH, a checkpoint file or a run's --out folder "
                          "(its model_final.pth); instead of --checkpoint")
    run.add_argument("--workers", type=int, default=None, metavar="W",
                     help="DATALOADER.NUM_WORKERS per process (default: up to 8, the CPUs shared by this "
                          "machine's processes; 0 loads in the main process)")
    run.add_argument("--progress-every", type=float, default=30.0, metavar="S", help="seconds between progress lines")
    run.add_argument("--no-plot", action="store_true", help="do not write loss_curve.png")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr (log.txt has them)")
    run.add_argument("--debug", action="store_true", help="show Python tracebacks with errors")

    ev = parser.add_argument_group("evaluation during training (as sed-fast eval)")
    ev.add_argument("--eval-every", type=int, default=10000, metavar="N",
                    help="TEST.EVAL_PERIOD: evaluate every N iterations and at the end when an evaluation set is "
                         "given (10000; 0: never)")
    ev.add_argument("--eval-dataset", metavar="NAME", help="an official evaluation set (ade150, coco, ...)")
    ev.add_argument("--eval-data-root", metavar="DIR", help="its data root (default: --data-root)")
    ev.add_argument("--eval-images", metavar="DIR")
    ev.add_argument("--eval-labels", metavar="DIR")
    ev.add_argument("--eval-vocab", metavar="NAME|FILE|LIST")
    ev.add_argument("--eval-ignore", type=int, metavar="N")
    ev.add_argument("--eval-limit", type=int, metavar="N", help="evaluate the first N images only")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``sed-fast train`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    started = time.time()
    args, code = parse_command_line(build_parser(), argv)
    if args is None:
        return code
    from ..evaluation.datasets import DatasetError
    from ..evaluation.runner import quiet_loader_shutdown
    from .loop import NonFiniteError, Stopped
    from .state import StateError

    try:
        with quiet_loader_shutdown():
            return _run(args)
    except (UsageError, StateError) as error:
        _error(str(error), args)
        return EXIT_USAGE
    except Stopped as stop:
        where = f" with {stop.path}" if stop.path else ""
        print(f"{_PROG}: {stop}; the resumable state is saved{where}: rerun the same command with --resume to "
              f"run {stop.redo()}", file=sys.stderr)
        return 128 + int(stop.signum)
    except NonFiniteError as error:
        _error(f"{error}. {_last_good(args)}", args)
        return EXIT_FAILED
    except DatasetError as error:
        _error(f"{error}. {_last_good(args)}", args)
        return EXIT_FAILED
    except KeyboardInterrupt as stop:
        if _finished(args, started):
            print(f"{_PROG}: interrupted after the run finished: model_final.pth is complete, nothing is left to "
                  "resume", file=sys.stderr)
            return EXIT_OK
        _error(f"interrupted. {_last_good(args)}", args)
        return getattr(stop, "exit_code", EXIT_SIGINT)
    except Exception as error:  # noqa: BLE001 - one line; --debug shows the traceback
        _error(f"{type(error).__name__}: {error}. {_last_good(args)}", args)
        if not args.debug:
            print(f"{_PROG}: (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def _last_good(args) -> str:
    from .state import resume_advice

    return resume_advice(Path(os.path.expanduser(args.out)), args.max_iter)


def _finished(args, since: float) -> bool:
    from .state import finished_since

    return finished_since(Path(os.path.expanduser(args.out)), since)


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _error(message: str, args) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    if getattr(args, "debug", False):
        traceback.print_exc()


# -- options -------------------------------------------------------------------------------------
def _check_options(args):
    import torch

    args.cer_topk = None
    _apply_init_from(args)
    args_for_model = argparse.Namespace(**{**vars(args), "dtype": "float32"})
    spec, _, device = check_model_options(args_for_model)
    for name, value, low in (("--max-iter", args.max_iter, 1), ("--keep-last", args.keep_last, 1),
                             ("--ims-per-batch", args.ims_per_batch, 1),
                             ("--save-every", args.save_every, 0), ("--eval-every", args.eval_every, 0),
                             ("--workers", args.workers, 0), ("--limit", args.limit, 1),
                             ("--max-size-train", args.max_size_train, 1),
                             ("--size-divisibility", args.size_divisibility, 0), ("--eval-limit", args.eval_limit, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    for name, value in (("--base-lr", args.base_lr), ("--weight-decay", args.weight_decay),
                        ("--weight-decay-norm", args.weight_decay_norm), ("--clip-multiplier", args.clip_multiplier),
                        ("--clip-value", args.clip_value)):
        if not (value >= 0 and value < float("inf")):
            raise UsageError(f"{name} must be a finite number >= 0, got {value}")
    if args.drop_path is not None and not 0 <= args.drop_path < 1:
        raise UsageError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if len(args.crop_size) == 1:
        args.crop_size = args.crop_size * 2
    if len(args.crop_size) != 2:
        raise UsageError(f"--crop-size takes H or H,W, got {args.crop_size}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    custom = [args.images, args.labels, args.vocab, args.ignore]
    if args.dataset is not None and any(v is not None for v in custom):
        raise UsageError("give either a dataset name or --images/--labels/--vocab/--ignore, not both")
    if args.dataset is None and not all(v is not None for v in custom):
        raise UsageError("no training data: give the dataset name coco or all of --images, --labels, --vocab and "
                         "--ignore")
    eval_custom = [args.eval_images, args.eval_labels, args.eval_vocab, args.eval_ignore]
    if args.eval_dataset is not None and any(v is not None for v in eval_custom):
        raise UsageError("give either --eval-dataset or --eval-images/--eval-labels/--eval-vocab/--eval-ignore")
    if any(v is not None for v in eval_custom) and not all(v is not None for v in eval_custom):
        raise UsageError("a custom evaluation set needs all of --eval-images, --eval-labels, --eval-vocab and "
                         "--eval-ignore")
    device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = _AUTOCAST[args.dtype]
    if autocast == "float16" and device_type != "cuda":
        raise UsageError("--dtype float16 trains with a gradient scaler on CUDA only; on CPU use bfloat16 or float32")
    return spec, device_type, autocast


def _apply_init_from(args) -> None:
    """--init-from: the weights of a finished run become this new run's --checkpoint."""
    args.init_from_file = None
    if args.init_from is None:
        return
    for flag, given in (("--checkpoint", args.checkpoint), ("--random-weights", args.random_weights)):
        if given:
            raise UsageError(f"--init-from and {flag} exclude each other: --init-from starts a new run from the "
                             "weights it names")
    from .state import StateError, resolve_init_from

    try:
        args.init_from_file = resolve_init_from(args.init_from)
    except StateError as error:
        raise UsageError(str(error)) from None
    if args.init_from_file.resolve().parent == Path(os.path.expanduser(args.out)).resolve():
        raise UsageError(f"--init-from {args.init_from} is inside --out {args.out}: the new run would overwrite the "
                         "weights it continues from; give the new run another --out")
    args.checkpoint = str(args.init_from_file)


def _augment_config(args):
    from .augment import AugmentConfig

    crop = tuple(args.crop_size)
    try:
        return AugmentConfig(min_size_train=tuple(args.min_size_train), max_size_train=args.max_size_train,
                             min_size_train_sampling=args.min_size_train_sampling, crop_enabled=min(crop) > 0,
                             crop_size=crop if min(crop) > 0 else (1, 1),
                             single_category_max_area=args.single_category_max_area,
                             color_aug_ssd=args.color_aug_ssd, flip=args.flip, size_divisibility=args.size_divisibility)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _solver_config(args):
    from .optim import SolverConfig

    return SolverConfig(base_lr=args.base_lr, weight_decay=args.weight_decay, weight_decay_norm=args.weight_decay_norm,
                        clip_multiplier=args.clip_multiplier, max_iter=args.max_iter, clip_value=args.clip_value,
                        clip_enabled=args.clip_value > 0)


def _load_train_data(args):
    from ..evaluation.datasets import DatasetError
    from ..data.vocabulary import parse_vocabulary_arg
    from .data import load_train_dataset

    try:
        if args.dataset is not None:
            dataset = load_train_dataset(args.dataset.strip().lower(), args.data_root)
        else:
            try:
                names = parse_vocabulary_arg(args.vocab)
            except Exception as error:  # noqa: BLE001 - a bad --vocab, whatever the reason
                raise UsageError(f"--vocab {args.vocab!r}: {error}") from error
            dataset = load_train_dataset(images=args.images, labels=args.labels, vocabulary=names,
                                         ignore_label=args.ignore)
    except DatasetError as error:
        raise UsageError(str(error)) from error
    if args.limit is not None:
        dataset.samples = dataset.samples[:args.limit]
    from ..evaluation.dataset_options import load_palette_option
    dataset.palette = load_palette_option(args.label_palette, args.palette_from, dataset.class_names)
    return dataset


def _load_eval_data(args):
    """The evaluation set, resolved by ``sed-fast eval``'s own options and code."""
    if args.eval_dataset is None and args.eval_images is None:
        return None
    from ..evaluation.dataset_options import load_dataset

    try:
        if args.eval_dataset is not None:
            return load_dataset(args.eval_dataset, data_root=args.eval_data_root or args.data_root,
                                limit=args.eval_limit or None)
        return load_dataset(images=args.eval_images, labels=args.eval_labels, vocab=args.eval_vocab,
                            ignore=args.eval_ignore, limit=args.eval_limit or None)
    except UsageError as error:
        raise UsageError(f"evaluation set: {error}") from error


def _fingerprint(items: Sequence[str]) -> str:
    digest = hashlib.sha1()
    for item in items:
        digest.update(item.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def _settings(args, dataset, eval_dataset, spec, device_type: str, world_size: int) -> dict:
    """What a resumed run must share with the saved one: everything that changes the weights (not
    the workers, the save period or the progress options)."""
    if args.checkpoint is not None:
        path = Path(os.path.expanduser(args.checkpoint)).resolve()
        weights = f"{path} ({path.stat().st_size} bytes)"
    else:
        weights = f"random (seed {args.seed})"
    stems = [s.stem for s in dataset.samples]
    settings = {"dataset": dataset.spec.name, "pairs": f"{len(stems)} pairs, stems sha1 {_fingerprint(stems)}",
                "vocabulary": f"{len(dataset.vocabulary)} names, sha1 {_fingerprint(dataset.vocabulary)}",
                "ignore_label": dataset.spec.ignore_label, "variant": spec.name, "impl": args.impl,
                "label_palette": (None if dataset.palette is None else
                                  f"{args.label_palette or args.palette_from}"),
                "dtype": _AUTOCAST[args.dtype] or "float32", "activation_checkpointing": args.activation_checkpointing,
                "resolution": args.resolution, "drop_path": args.drop_path, "initial_weights": weights,
                "seed": args.seed, "device_type": device_type, "world_size": world_size}
    for key in ("min_size_train", "max_size_train", "min_size_train_sampling", "crop_size", "single_category_max_area",
                "color_aug_ssd", "flip", "size_divisibility", "max_iter", "ims_per_batch", "base_lr", "weight_decay",
                "weight_decay_norm", "clip_multiplier", "clip_value"):
        value = getattr(args, key)
        settings[key] = list(value) if isinstance(value, (list, tuple)) else value
    if getattr(args, "init_from_file", None) is not None:
        from .state import continued_run

        settings["init_from"] = continued_run(args.init_from_file)
    # Not the evaluation set nor its period: evaluating does not change the steps (a resumed run
    # may evaluate on another set, or stop evaluating).
    del eval_dataset
    return settings


def _default_workers() -> int:
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, (os.cpu_count() or 1) // local))


# -- model ---------------------------------------------------------------------------------------
def _build_model(args, spec, device, state_dict, vocabulary: List[str]):
    """The model to train, in training mode, with the training vocabulary."""
    import sed_fast.api as api

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", api.RandomWeightsWarning)
        model = api.build_sed(spec.name, impl=args.impl, checkpoint=state_dict, device=device,
                              clip_resolution=args.resolution, seed=args.seed)
    model.set_vocabulary(vocabulary)
    return model


def _prepare_model(model, args):
    """Training mode, drop path, activation checkpointing; checks that the model can train."""
    model.train()
    if args.drop_path is not None:
        _set_drop_path(model, args.drop_path)
    if args.activation_checkpointing:
        decoder = model.decoder
        if not hasattr(decoder, "activation_checkpointing"):
            raise UsageError("--activation-checkpointing: this decoder has no activation checkpointing")
        decoder.activation_checkpointing = True
    return model


def _set_drop_path(model, rate: float) -> None:
    """Stochastic depth of the CLIP image tower at ``rate`` instead of the variant's, set as the
    model sets its own (``set_train_regularisation``: timm's linear schedule over the blocks)."""
    import dataclasses

    from ..models.encoder import set_train_regularisation

    try:
        set_train_regularisation(model.clip_model, dataclasses.replace(model.spec, train_drop_path=rate))
    except AttributeError as error:
        raise UsageError(f"--drop-path: the CLIP image tower has no ConvNeXt trunk ({error})") from None


# -- run -----------------------------------------------------------------------------------------
def _run(args) -> int:
    import torch

    from ..evaluation import distributed
    from . import loop as loop_mod, state as state_mod
    from .data import IterationSampler, TrainDataset, _Collate, check_samples
    from .optim import build_optimizer

    spec, device_type, autocast = _check_options(args)
    augment_config = _augment_config(args)
    solver = _solver_config(args)
    dataset = _load_train_data(args)
    eval_dataset = _load_eval_data(args)
    out_dir = Path(os.path.expanduser(args.out))
    ctx = distributed.setup(device_type)
    held = contextlib.ExitStack()  # rank 0's lock on --out, released when the run ends, however it ends
    try:
        if args.ims_per_batch % ctx.world_size:
            raise UsageError(f"--ims-per-batch {args.ims_per_batch} is not a multiple of the {ctx.world_size} "
                             "processes (each process takes an equal part of the batch)")
        batch_per_rank = args.ims_per_batch // ctx.world_size
        device = _device(args, device_type, ctx)
        io = loop_mod.RunIO(out_dir if ctx.is_main else None, quiet=args.quiet, progress_every=args.progress_every,
                            plot=not args.no_plot)
        settings = _settings(args, dataset, eval_dataset, spec, device_type, ctx.world_size)

        # Rank 0 owns --out: it decides between a fresh start and a resume, and tells the others.
        decision = None
        if ctx.is_main:
            try:
                lock = _hold_output(held, args, out_dir, spec)
                decision = ("ok", _prepare_out(args, out_dir, settings, state_mod, loop_mod))
                _remove_stale_temporaries(out_dir, io)
                if lock.previous:  # after _prepare_out: a fresh run's log starts there
                    io.note(f"took over the lock of {out_dir} left by PID {lock.previous.get('pid')} on "
                            f"{lock.previous.get('host')}, which is no longer running")
            except (UsageError, state_mod.StateError) as error:
                decision = ("error", str(error))
        decision = ctx.broadcast_object(decision)
        if decision[0] == "error":
            raise UsageError(decision[1])
        resume_from = decision[1]  # None or the checkpoint path
        resumed = state_mod.load_training(out_dir) if resume_from is not None else None
        if resumed is not None and resumed[2].get("finished"):
            io.note(f"the run in {out_dir} finished ({int(resumed[2]['iteration']) + 1} iterations): nothing to "
                    "resume. To train further from its weights, start a new run with --init-from "
                    f"{resumed[0]} and another --out", always=True)
            return EXIT_OK
        if getattr(args, "init_from_file", None) is not None:
            io.note(f"a new run continuing from {settings['init_from']}: fresh optimizer, cosine schedule from "
                    f"--base-lr {args.base_lr:g} over {args.max_iter} iterations")

        if ctx.is_main:
            from ..base.files import atomic_write_text
            from ..toolkit.record import run_record
            atomic_write_text(out_dir / "run.json", json.dumps(run_record(device), indent=2) + "\n")
        io.note(f"training set {dataset.spec.name}: {len(dataset.samples)} pairs from {dataset.image_dir} and "
                f"{dataset.label_dir}, {len(dataset.vocabulary)} classes, ignore {dataset.spec.ignore_label}; "
                f"{ctx.world_size} process(es) x {batch_per_rank} image(s) per iteration on {device}")
        workers = args.workers if args.workers is not None else _default_workers()
        if not args.skip_data_check:
            start = time.perf_counter()
            mine = distributed.shard(list(range(len(dataset.samples))), ctx.rank, ctx.world_size)
            errors, unlabelled = check_samples(dataset.samples, mine, len(dataset.vocabulary),
                                               dataset.spec.ignore_label, workers, palette=dataset.palette)
            gathered = ctx.all_gather_objects((errors, unlabelled))
            errors = [e for part in gathered for e in part[0]]
            unlabelled = sum(part[1] for part in gathered)
            if errors:
                raise UsageError(f"the training set has unusable pairs ({len(errors)} shown, the check stopped at "
                                 f"5 per process): " + " | ".join(errors[:5]))
            if unlabelled == len(dataset.samples):
                raise UsageError("no label map of the training set has a labelled pixel (all are the ignore value "
                                 f"{dataset.spec.ignore_label})")
            io.note(f"checked {len(dataset.samples)} label maps in {time.perf_counter() - start:.1f} s "
                    f"({unlabelled} without a labelled pixel)")

        weights = None
        if resumed is not None:
            weights = resumed[1]
        elif args.checkpoint is not None:
            from ..toolkit.options import read_checkpoint
            weights = read_checkpoint(args.checkpoint)
        from ..data.checkpoint import CheckpointError
        try:
            model = _build_model(args, spec, device, weights, list(dataset.vocabulary))
        except CheckpointError as error:
            raise UsageError(str(error)) from error
        model = _prepare_model(model, args)
        optimizer = build_optimizer(model, solver)
        scaler = torch.amp.GradScaler(device.type) if autocast == "float16" else None
        start_iter, rng_states, seconds_before = 0, None, 0.0
        if resumed is not None:
            path, _, saved = resumed
            optimizer.load_state_dict(saved["optimizer"])
            if scaler is not None and saved.get("scaler") is not None:
                scaler.load_state_dict(saved["scaler"])
            start_iter = int(saved["iteration"]) + 1
            rng_states = saved["rng"]
            seconds_before = float(saved.get("seconds", 0.0))
            if ctx.is_main:
                io.history = loop_mod.truncate_metrics(out_dir, start_iter)
            io.note(f"resuming from {path.name} after {start_iter} iterations")
        else:
            # Seeds per process (detectron2: seed + rank), for what the model draws (drop path).
            torch.manual_seed(args.seed + ctx.rank)
            import random

            import numpy as np
            np.random.seed((args.seed + ctx.rank) % 2**32)
            random.seed(args.seed + ctx.rank)
        if args.random_weights and ctx.is_main and resumed is None:
            print(f"{_PROG}: note: starting from RANDOM WEIGHTS (--random-weights)", file=sys.stderr)

        train_data = TrainDataset(dataset.samples, len(dataset.vocabulary), dataset.spec.ignore_label,
                                  augment_config, args.seed, palette=dataset.palette)

        def loader_factory(first: int):
            generator = torch.Generator()
            generator.manual_seed(args.seed + ctx.rank)  # never the global RNG: it belongs to the model
            return torch.utils.data.DataLoader(
                train_data, batch_sampler=IterationSampler(first, args.max_iter, batch_per_rank, ctx.rank,
                                                           ctx.world_size),
                num_workers=workers, collate_fn=_Collate(dataset.spec.ignore_label),
                pin_memory=device.type == "cuda", worker_init_fn=_WorkerInit(args.seed, ctx.rank) if workers else None,
                prefetch_factor=4 if workers else None, persistent_workers=False, generator=generator)

        evaluate = _evaluator(args, model, eval_dataset, list(dataset.vocabulary), ctx, device, workers, io) \
            if eval_dataset is not None else None
        config = loop_mod.LoopConfig(max_iter=args.max_iter, batch_per_rank=batch_per_rank,
                                     ignore_label=dataset.spec.ignore_label, clip_value=args.clip_value,
                                     save_every=args.save_every, eval_every=args.eval_every,
                                     autocast_dtype=getattr(torch, autocast) if autocast else None, settings=settings,
                                     keep_last=args.keep_last, protected=_protected(args),
                                     written=list(resumed[2].get("checkpoints", [])) if resumed is not None else [])
        flag = loop_mod.SignalFlag()
        flag.install()
        try:
            if start_iter >= args.max_iter:
                io.note(f"the run in {out_dir} is complete ({start_iter} iterations): nothing to do")
                return EXIT_OK
            try:
                loop_mod.train(model, optimizer, loader_factory, config, ctx, device, io, start=start_iter,
                               scaler=scaler, rng_states=rng_states, seconds_before=seconds_before, evaluate=evaluate,
                               flag=flag)
            except loop_mod.Stopped as stop:
                if stop.done < args.max_iter:
                    raise
                # the signal came after the last iteration, whose checkpoint is written: the run finished
                io.note(f"{stop}, after the last iteration: nothing is left to do", always=True)
        finally:
            flag.restore()
        io.note(f"done: {args.max_iter} iterations; weights in {out_dir / 'model_final.pth'}")
        if flag.received is not None:
            print(f"{_PROG}: the run finished before {_signal_name(flag.received)} took effect: model_final.pth is "
                  "complete, nothing is left to resume", file=sys.stderr)
        return EXIT_OK
    finally:
        try:
            ctx.close()
        finally:
            held.close()


class _WorkerInit:
    """Seeds of a loader worker (detectron2's ``worker_init_reset_seed``: per process and worker);
    Ctrl-C is left to the main process, which saves the state."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        import random

        import numpy as np
        import torch

        from ..evaluation.runner import worker_init

        worker_init(worker_id)
        seed = (self.seed * 1000003 + self.rank * 1009 + worker_id) % 2**31
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)


def _device(args, device_type: str, ctx):
    """The torch device of this process (:func:`sed_fast.toolkit.options.parse_device`; under torchrun
    cuda:LOCAL_RANK)."""
    import torch

    from ..toolkit.options import parse_device

    if device_type == "cpu":
        return torch.device("cpu")
    return parse_device(args.device or "cuda", ctx.local_rank if ctx.distributed else None)


# Parameters of the released models (CLIP image and text towers + decoder), for the space check.
_PARAMETERS = {"b": 181_000_000, "l": 400_000_000}


def _needed_bytes(spec) -> int:
    """Free space one more checkpoint needs: fp32 weights (model_*.pth) and their state file
    (Adam's two moments and the rest): about four times the parameter bytes."""
    return 4 * 4 * _PARAMETERS.get(spec.name, max(_PARAMETERS.values()))


def _hold_output(held: contextlib.ExitStack, args, out_dir: Path, spec):
    """Rank 0: take --out for this run (writable, space for a checkpoint, no other run in it)."""
    from ..toolkit.outputs import hold_output

    return held.enter_context(hold_output(args.out, "train", need_bytes=_needed_bytes(spec)))


#: What a training run writes into --out (the only names it may delete or overwrite there).
TRAIN_OUTPUTS = ("metrics.jsonl", "log.txt", "loss_curve.png", "last_checkpoint", "run.json", "model_final.pth",
                 "model_final.pth.state.pt", "model_" + "[0-9]" * 7 + ".pth", "model_" + "[0-9]" * 7 + ".pth.state.pt")


def _prepare_out(args, out_dir: Path, settings: dict, state_mod, loop_mod):
    """Rank 0, holding --out: the checkpoint to resume from, or None for a fresh run. Only
    files a training run provably wrote are deleted (``--overwrite``); a user's file of the same
    name as an output (a ``model_final.pth`` to fine-tune from) stops the run, untouched."""
    from ..toolkit.outputs import OutputClaim

    marker = out_dir / state_mod.LAST_CHECKPOINT
    has_run = marker.exists() or (out_dir / "metrics.jsonl").exists()
    if args.resume:
        if not marker.exists():
            raise UsageError(f"--resume: {args.out} holds no saved training state to resume (no "
                             f"{state_mod.LAST_CHECKPOINT}); nothing was changed. Leave out --resume to start a run")
        resumed = state_mod.load_training(out_dir)
        state_mod.check_resumable(resumed[2], settings, resumed[0], out_dir)
        return resumed[0]
    if has_run and not args.overwrite:
        raise UsageError(f"{out_dir} holds a training run: pass --resume to continue it, --overwrite to start over, "
                         "or another --out")

    def written_by_an_earlier_run(name: str) -> bool:  # a folder trained into by a sed-fast without claims
        if name.endswith(state_mod.STATE_SUFFIX) or name in ("metrics.jsonl", "log.txt", "loss_curve.png",
                                                             "run.json", state_mod.LAST_CHECKPOINT):
            return has_run
        return name in recorded or (out_dir / (name + state_mod.STATE_SUFFIX)).exists()

    recorded = {path.name for path in state_mod.written_outputs(out_dir)}  # the checkpoints the run kept

    def with_its_state(name: str) -> bool:  # a checkpoint a run wrote: its state beside it, or recorded in it
        return (not name.endswith(".pth") or name in recorded
                or (out_dir / (name + state_mod.STATE_SUFFIX)).exists())

    claim = OutputClaim(out_dir, "train", TRAIN_OUTPUTS, legacy_owned=written_by_an_earlier_run,
                        confirm=with_its_state)
    keep = [Path(os.path.expanduser(args.checkpoint))] if args.checkpoint else []
    claim.refuse_collisions(f"--out {args.out}", keep=keep)  # before anything is deleted
    if args.overwrite:
        claim.remove_owned(keep=keep)
    claim.claim()
    return None


def _protected(args) -> List[Path]:
    """Files the run never deletes: the weights it starts from."""
    return [Path(os.path.expanduser(args.checkpoint))] if args.checkpoint is not None else []


def _remove_stale_temporaries(out_dir: Path, io) -> None:
    """Rank 0, holding --out: delete temporary files that a killed earlier run left there."""
    from ..base.files import remove_stale_temporaries

    removed = remove_stale_temporaries(out_dir)
    if removed:
        io.note(f"removed {len(removed)} temporary file(s) left by an interrupted earlier run: "
                + ", ".join(p.name for p in removed))


def _evaluator(args, model, eval_dataset, train_vocabulary: List[str], ctx, device, workers: int, io):
    """evaluate(done) -> {"eval/mIoU": ...}: the evaluation package's loop on ``eval_dataset``."""
    from ..evaluation import runner
    from ..evaluation.metrics import compute_metrics

    def evaluate(done: int):
        model.eval()
        try:
            model.set_vocabulary(eval_dataset.vocabulary)
            state = runner.new_state({}, ["model"], eval_dataset.num_classes)
            state = runner.evaluate({"model": model}, eval_dataset, state, ctx=ctx, device=device, state_file=None,
                                    batch_size=1, workers=min(workers, 4), save_every=0, progress=False)
            figures = {}
            if ctx.is_main:
                metrics = compute_metrics(state.confusion["model"].numpy(), eval_dataset.class_names)
                figures = {f"eval/{k}": float(metrics[k]) for k in ("mIoU", "fwIoU", "mACC", "pACC")}
                figures["eval/dataset"] = eval_dataset.spec.name
            return figures
        finally:
            model.set_vocabulary(train_vocabulary)
            model.train()
            _prepare_model(model, args)

    return evaluate
