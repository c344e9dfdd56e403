"""The model options every command shares, declared once, and their checks.

:func:`add_model_options` adds ``--checkpoint``, ``--random-weights``, ``--variant``, ``--impl``,
``--dtype``, ``--device``, ``--resolution``, ``--cer-topk`` and ``--no-text-cache`` to a parser
(or an argument group); :func:`check_model_options` checks them (a problem is a
:class:`~sed_fast.toolkit.errors.UsageError`); :func:`read_checkpoint` reads ``--checkpoint``;
:func:`parse_device` is the one reading of ``--device`` (``cpu``, ``cuda``, ``cuda:N``, and
torchrun's ``LOCAL_RANK``); :func:`load_vocabulary` reads ``--vocab``. No command starts on random
weights unless ``--random-weights`` asks for it.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import List, Optional

from .errors import UsageError, describe

#: ``--dtype`` spellings and the torch dtype each names.
DTYPES = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
# What a built-in vocabulary name looks like (a family and a class count): "ade9999" is a typo of
# one, not a one-class vocabulary.
_BUILTIN_LIKE = re.compile(r"(ade|pc|voc|coco)\d+b?", re.IGNORECASE)


def add_model_options(parser, *, impl_default: Optional[str] = None, impl: bool = True, cer_topk: bool = True,
                      text_cache: bool = True, device_help: Optional[str] = None,
                      checkpoint_help: str = "official SED checkpoint (model_final.pth)") -> None:
    """Add the shared model options to ``parser`` (an ``ArgumentParser`` or an argument group);
    ``impl``, ``cer_topk`` and ``text_cache``: whether the command has ``--impl``, ``--cer-topk``
    and ``--no-text-cache``; ``device_help``: what ``--device`` means for it, when it differs."""
    parser.add_argument("--checkpoint", metavar="PATH", help=checkpoint_help)
    parser.add_argument("--random-weights", action="store_true",
                        help="run without a checkpoint (random weights: meaningless output, marked as such; for "
                             "tests and benchmarks)")
    parser.add_argument("--variant", default="b", help="b (SED-B, ConvNeXt-B) or l (SED-L, ConvNeXt-L); default b")
    if impl:
        parser.add_argument("--impl", choices=("fast", "reference"), default=impl_default,
                            help=f"implementation (default: {impl_default or 'fast'}" + (
                                ", falling back to reference with a warning if the fast one cannot be built)"
                                if impl_default is None else ")"))
    if cer_topk:
        parser.add_argument("--cer-topk", type=int, default=None, metavar="K",
                            help="category early rejection keeping the per-pixel top-K classes (default: exact)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute dtype (default float32, the official precision)")
    parser.add_argument("--device", default=None,
                        help=device_help or "cpu, cuda or cuda:N (default: cuda if available; under torchrun each "
                                            "process uses cuda:LOCAL_RANK)")
    parser.add_argument("--resolution", type=int, default=768, metavar="PX",
                        help="encoder input side, a multiple of 32 (official: 768; smaller is faster, non-official)")
    if text_cache:
        parser.add_argument("--no-text-cache", action="store_true", help="do not cache text embeddings on disk")


def check_model_options(args: argparse.Namespace):
    """Check the shared model options; return (variant spec, torch dtype, torch device or None).
    Problems raise :class:`UsageError` with a one-line message."""
    import torch

    from ..models.config import variant_spec

    try:
        spec = variant_spec(args.variant)
    except ValueError as problem:
        raise UsageError(str(problem)) from None
    if args.resolution < 32 or args.resolution % 32:
        raise UsageError(f"--resolution must be a positive multiple of 32 (official: 768), got {args.resolution}")
    if getattr(args, "cer_topk", None) is not None and args.cer_topk < 1:
        raise UsageError(f"--cer-topk must be >= 1 (leave it out for exact decoding), got {args.cer_topk}")
    dtype = getattr(torch, DTYPES[args.dtype])
    device = parse_device(args.device) if args.device is not None else None
    check_weights_options(args)
    return spec, dtype, device


def check_weights_options(args: argparse.Namespace) -> None:
    """``--checkpoint`` xor ``--random-weights``, and the checkpoint file exists."""
    if args.checkpoint is None and not args.random_weights:
        raise UsageError("no --checkpoint given. Pass the official SED checkpoint (e.g. --checkpoint "
                         "sed_model_base.pth), or --random-weights to run with random weights "
                         "(meaningless output, for tests and benchmarks only)")
    if args.checkpoint is not None and args.random_weights:
        raise UsageError("--checkpoint and --random-weights exclude each other")
    if args.checkpoint is not None and not Path(os.path.expanduser(args.checkpoint)).is_file():
        raise UsageError(f"checkpoint file not found: {args.checkpoint}")


def parse_device(text: Optional[str], distributed_local_rank: Optional[int] = None):
    """The torch device ``--device`` names (None: cuda if available, else cpu). Under torchrun
    (``distributed_local_rank`` given) a CUDA run uses ``cuda:LOCAL_RANK``, and ``cuda:N`` is a
    usage error, since each process must use its own GPU."""
    import torch

    if text is not None and not _DEVICE.fullmatch(text):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
    if distributed_local_rank is not None:
        if ":" in text:
            raise UsageError(f"--device {text}: under torchrun each process uses cuda:LOCAL_RANK; pass "
                             "--device cuda (or nothing)")
        return torch.device("cuda", distributed_local_rank)
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(text)


def read_checkpoint(path_text: str):
    """The state dict of ``--checkpoint``; a missing, unreadable or unusable file is a usage error."""
    from ..data.checkpoint import CheckpointError, read_state_dict

    path = Path(os.path.expanduser(path_text))
    if not path.exists():
        raise UsageError(f"checkpoint file not found: {path_text}")
    try:
        return read_state_dict(path)
    except (CheckpointError, OSError) as problem:
        raise UsageError(describe(problem)) from problem


def check_vocabulary_name(text: str) -> None:
    """A ``--vocab`` that looks like a built-in name but is none (``ade9999``) is a usage error
    listing the built-in names, rather than a one-class vocabulary of that name."""
    from ..data.vocabulary import BUILTIN_VOCABULARIES

    name = text.strip()
    if (_BUILTIN_LIKE.fullmatch(name) and name.lower() not in BUILTIN_VOCABULARIES
            and not os.path.exists(os.path.expanduser(name))):
        raise UsageError(f"--vocab {text!r} is not a built-in vocabulary; the built-in ones are "
                         f"{', '.join(BUILTIN_VOCABULARIES)} (for one class of that name write {name + ','!r})")


def load_vocabulary(text: str, max_classes: int = 65536) -> List[str]:
    """The class names of ``--vocab`` (a built-in name, a file or a comma-separated list)."""
    from ..data.vocabulary import load_vocabulary as load, parse_vocabulary_arg

    check_vocabulary_name(text)
    try:
        names = load(parse_vocabulary_arg(text))
    except Exception as problem:  # noqa: BLE001 - whatever the reason, it is a bad --vocab
        raise UsageError(f"--vocab {text!r}: {describe(problem)}") from problem
    names = [str(name) for name in names]
    if not names:
        raise UsageError(f"--vocab {text!r}: the vocabulary is empty")
    if len(names) > max_classes:
        raise UsageError(f"--vocab {text!r}: {len(names)} classes; label maps hold at most {max_classes}")
    return names


def build_model(args: argparse.Namespace, spec, dtype, device, checkpoint_state, impl: Optional[str] = None):
    """Build the model of the model options (``impl``: this one rather than ``--impl``'s); the
    default ``--impl`` falls back from fast to reference with a warning (an explicit ``--impl fast``
    has no silent substitute). Returns (model, impl used)."""
    import traceback
    import warnings

    from ..api import RandomWeightsWarning, build_sed
    from ..data.checkpoint import CheckpointError
    from .errors import warn

    def build(impl: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)  # the commands say it their own way
            return build_sed(spec.name, impl=impl, checkpoint=checkpoint_state, device=device, dtype=dtype,
                             cer_topk=getattr(args, "cer_topk", None), clip_resolution=args.resolution,
                             text_cache=not getattr(args, "no_text_cache", False),
                             **({"seed": args.seed} if getattr(args, "seed", None) is not None else {}))

    impl = impl or args.impl or "fast"
    try:
        return build(impl), impl
    except CheckpointError as problem:
        raise UsageError(str(problem)) from problem
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as problem:  # noqa: BLE001
        if impl != "fast":
            raise
        reason = f"{type(problem).__name__}: {describe(problem)}"
        if args.impl == "fast":  # asked for explicitly: no silent substitute
            raise UsageError(f"the fast implementation cannot be built ({reason}); use --impl reference") from problem
        warn(f"the fast implementation cannot be built ({reason}); using --impl reference")
        if getattr(args, "debug", False):
            traceback.print_exc()
    try:
        return build("reference"), "reference"
    except CheckpointError as problem:
        raise UsageError(str(problem)) from problem


def build_with_vocabulary(args: argparse.Namespace, spec, dtype, device, class_names: List[str], info):
    """Read ``--checkpoint`` (none with ``--random-weights``), build the model (:func:`build_model`)
    and set its vocabulary, saying each step's time through ``info(message)``. Returns (model, impl
    used, class names as the model holds them)."""
    import time

    checkpoint_state = None if args.checkpoint is None else read_checkpoint(args.checkpoint)
    start = time.perf_counter()
    model, impl = build_model(args, spec, dtype, device, checkpoint_state)
    del checkpoint_state
    info(f"built SED-{spec.name.upper()} ({impl}, {args.dtype}, {model.device}) in "
         f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    try:
        class_names = model.set_vocabulary(class_names, progress=False if getattr(args, "quiet", False) else None)
    except ValueError as problem:  # e.g. names the tokenizer makes identical
        raise UsageError(f"--vocab {args.vocab!r}: {problem}") from problem
    info(f"vocabulary: {len(class_names)} classes ({time.perf_counter() - start:.1f} s)")
    return model, impl, class_names
