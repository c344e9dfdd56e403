"""The ``sed-fast`` command (also ``python -m sed_fast``).

    sed-fast segment IMAGES... --vocab ade150 --checkpoint sed_model_base.pth --out out/
    sed-fast demo           (a built-in sample, random weights: sed_fast.demo)
    sed-fast bench | bench-kernels | profile | report | compile-report ...   (sed_fast.bench)

Exit codes of ``segment``: 0 every image was segmented; 1 some images failed (each is listed in
``summary.json`` and on stderr; the others are still processed) or an unexpected error stopped the
run; 2 usage error (bad option, vocabulary, checkpoint, environment variable, no images, an output
folder that cannot be written): nothing is segmented; 130 interrupted by SIGINT (Ctrl-C); 143
terminated by SIGTERM. Errors are one-line messages; ``--debug`` adds the Python traceback.

What an interrupted or failed run leaves in ``--out``: every output file (``*_labels.png``,
``*_overlay.png``, ``*_scores.npy``, ``summary.json``) is written to a temporary file in the same
folder and renamed into place, so each file is either the complete new one or the previous one,
never a truncated mix (and a symbolic link of the same name is replaced, not written through).
A signal that arrives while an image's files are being written takes effect once they and the
summary are written. ``summary.json`` is written when the run starts and rewritten after each image
(once it is large, at most as often as keeps its rewriting under ~5% of the run) and at the end,
with ``"status"``: ``"running"``, then ``"complete"`` (``exit_code`` 0 or 1), ``"interrupted"``
(``exit_code`` 130/143, ``signal``) or ``"failed"`` (an error stopped the run: ``error``); its
``run_id`` and ``started_at`` say which run wrote it, so a run into a used folder replaces the old
summary at its start. Output names keep at most 100 bytes of the input's stem (longer stems get a
short hash instead of the rest).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import hashlib
import importlib
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .files import atomic_write

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + 2  # 130, as a shell reports a Ctrl-C
EXIT_SIGTERM = 128 + 15  # 143

_STEM_BYTES = 100  # output names keep at most this many bytes of the input's stem (then a hash)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_GLOB_CHARS = re.compile(r"[*?\[]")
_DTYPES = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}
# Subcommands that belong to other modules: name -> (module, description).
_EXTERNAL = {"demo": ("sed_fast.demo", "segment a built-in sample scene with random weights (no download)"),
             "bench": ("sed_fast.bench.e2e", "end-to-end benchmark (see `sed-fast bench --help`)"),
             "bench-kernels": ("sed_fast.bench.kernels", "per-kernel benchmark (see `sed-fast bench-kernels --help`)"),
             "profile": ("sed_fast.bench.profile", "per-stage profile (see `sed-fast profile --help`)"),
             "report": ("sed_fast.bench.report", "Markdown + PNG report of benchmark results"),
             "compile-report": ("sed_fast.bench.compile_report",
                                "compile every Triton kernel for a GPU architecture, without a GPU"),
             "eval": ("sed_fast.evaluation.cli", "dataset evaluation, official metrics (see `sed-fast eval --help`)"),
             "doctor": ("sed_fast.doctor.cli", "check this machine: versions, op backends, dispatch, end to end"),
             "export": ("sed_fast.export.cli", "export SED with a baked-in vocabulary: AOTInductor .pt2 or ONNX")}
_PROG = "sed-fast"


class UsageError(Exception):
    """A problem with the command line or its inputs: nothing is segmented, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run stops, exit code 128 + the signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(_signal_name(signum))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Signals:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread; inside :meth:`deferred`
    they wait until the block ends, so a group of file writes is never cut halfway."""

    def __init__(self):
        self.depth = 0
        self.pending: Optional[int] = None
        self.previous = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
            if signum is None:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # not the main thread: the default handling stays
                pass

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, OSError, TypeError):
                pass
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.depth:
            if self.pending is None:
                self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)


class _OutputFolder:
    """Writes files into ``folder`` atomically: a temporary file in the same folder, renamed over
    the target (which replaces the target itself, also when it is a symbolic link)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def probe(self) -> None:
        """Raise OSError unless a file can be created (and removed) in the folder."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".sed_fast_probe_", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)

    def write(self, name: str, save: Callable) -> Path:
        """``save(binary_file)`` writes the content; returns the final path."""
        return atomic_write(self.folder / name, save)

    def write_json(self, name: str, data) -> Path:
        # backslashreplace: a path with undecodable bytes (surrogate escapes) becomes a \udcXX escape
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        return self.write(name, lambda handle: handle.write(text.encode("utf-8", "backslashreplace")))


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=_PROG, description="Fast inference for SED, open-vocabulary semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser(
        "segment", help="segment images with a vocabulary; write label maps, overlays and a summary",
        description="Segment images with an open vocabulary. Writes, per image, <stem>_labels.png "
                    "(class index per pixel: 8-bit PNG for up to 256 classes, else 16-bit), "
                    "<stem>_overlay.png (image blended with class colours and a legend) and, with "
                    "--save-scores, <stem>_scores.npy (float16, T x H x W); and summary.json (rewritten as "
                    "the run goes, with its status). Each file is written whole or not at all. "
                    "Exit code: 0 all images ok, 1 some failed, 2 usage error, 130 interrupted (SIGINT), "
                    "143 terminated (SIGTERM).")
    seg.add_argument("images", nargs="+", metavar="IMAGES",
                     help="image files, folders (their images, sorted) or glob patterns (quoted)")
    seg.add_argument("--vocab", "--vocabulary", dest="vocab", required=True, metavar="NAME|FILE|LIST",
                     help="built-in vocabulary (ade150, ade847, pc59, pc459, voc20, voc20b, coco), a file "
                          "(JSON list or one name per line) or comma-separated names, e.g. 'cat,dog,grass'")
    seg.add_argument("--checkpoint", metavar="PATH", help="official SED checkpoint (model_final.pth)")
    seg.add_argument("--random-weights", action="store_true",
                     help="run without a checkpoint (random weights: meaningless output, marked as such)")
    seg.add_argument("--variant", default="b", help="b (SED-B, ConvNeXt-B) or l (SED-L, ConvNeXt-L); default b")
    seg.add_argument("--impl", choices=("fast", "reference"), default=None,
                     help="implementation (default: fast, falling back to reference with a warning "
                          "if the fast one cannot be built)")
    seg.add_argument("--cer-topk", type=int, default=None, metavar="K",
                     help="category early rejection keeping the per-pixel top-K classes (default: exact)")
    seg.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                     help="compute dtype (default float32, the official precision)")
    seg.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    seg.add_argument("--resolution", type=int, default=768, metavar="PX",
                     help="encoder input side, a multiple of 32 (official: 768; smaller is faster, non-official)")
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    seg.add_argument("--save-scores", action="store_true",
                     help="also write <stem>_scores.npy (float16; needs the full-size scores in memory: without "
                          "it only the class map is computed)")
    seg.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="images per forward (of any sizes: each is resized to the encoder's input; default 1)")
    seg.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (default 0.5)")
    seg.add_argument("--no-text-cache", action="store_true", help="do not cache text embeddings on disk")
    seg.add_argument("--quiet", "-q", action="store_true", help="no progress bar or info lines (errors still shown)")
    seg.add_argument("--debug", action="store_true", help="show Python tracebacks with errors")

    for name, (_, help_text) in _EXTERNAL.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _EXTERNAL:
        return _dispatch_external(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, argparse usage errors
        return _exit_code(exit_.code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return _run_segment(args)


def _exit_code(code) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILED


def _dispatch_external(command: str, rest: List[str]) -> int:
    module_name = _EXTERNAL[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            _error(f"`{_PROG} {command}` needs the module {module_name}, which is not available "
                   f"(run from the repository root or install sed_fast with its benchmarks)")
        else:
            _error(f"`{_PROG} {command}`: could not import {module_name}: {error}")
        return EXIT_USAGE
    except ImportError as error:
        _error(f"`{_PROG} {command}`: could not import {module_name}: {error}")
        return EXIT_USAGE
    entry = getattr(module, "main", None)
    if entry is None:
        _error(f"`{_PROG} {command}`: {module_name} has no main()")
        return EXIT_USAGE
    try:
        return _exit_code(entry(rest))
    except SystemExit as exit_:
        return _exit_code(exit_.code)


# -- messages -----------------------------------------------------------------------------------
def _error(message: str) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"{_PROG}: warning: {message}", file=sys.stderr)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)) and error.filename:
        text = f"{error.strerror or type(error).__name__}: {error.filename}"
    return text or type(error).__name__


# -- segment ------------------------------------------------------------------------------------
def _run_segment(args: argparse.Namespace) -> int:
    signals = _Signals()
    signals.install()
    try:
        return _segment(args, signals)
    except UsageError as error:
        _error(str(error))
        if args.debug:
            traceback.print_exc()
        return EXIT_USAGE
    except KeyboardInterrupt as error:
        code = getattr(error, "exit_code", EXIT_SIGINT)
        _error(f"interrupted ({_signal_name(code - 128)})")
        return code
    except Exception as error:  # noqa: BLE001 - a one-line message; --debug shows the traceback
        _error(f"{type(error).__name__}: {_describe(error)}")
        if args.debug:
            traceback.print_exc()
        else:
            print(f"{_PROG}: (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signals.restore()


def _check_options(args: argparse.Namespace):
    """Validate the cheap options of ``segment``; return (variant spec, torch dtype, device or None)."""
    spec, dtype, device = check_model_options(args)
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_environment()
    return spec, dtype, device


def check_model_options(args: argparse.Namespace, error=None):
    """The model options every command shares (``--variant``, ``--resolution``, ``--cer-topk``,
    ``--dtype``, ``--device``, ``--checkpoint`` / ``--random-weights``), checked; returns
    (variant spec, torch dtype, torch device or None). Problems raise ``error`` (default
    :class:`UsageError`) with a one-line message."""
    import torch

    from .config import variant_spec

    error = error or UsageError
    try:
        spec = variant_spec(args.variant)
    except ValueError as problem:
        raise error(str(problem)) from None
    if args.resolution < 32 or args.resolution % 32:
        raise error(f"--resolution must be a positive multiple of 32 (official: 768), got {args.resolution}")
    if args.cer_topk is not None and args.cer_topk < 1:
        raise error(f"--cer-topk must be >= 1 (leave it out for exact decoding), got {args.cer_topk}")
    dtype = getattr(torch, _DTYPES[args.dtype])
    device = None
    if args.device is not None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
            raise error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
        if args.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
            index = int(args.device.split(":")[1]) if ":" in args.device else 0
            if index >= torch.cuda.device_count():
                raise error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device(args.device)
    if args.checkpoint is None and not args.random_weights:
        raise error("no --checkpoint given. Pass the official SED checkpoint (e.g. --checkpoint "
                    "sed_model_base.pth), or --random-weights to run with random weights "
                    "(meaningless output, for tests and benchmarks only)")
    if args.checkpoint is not None and args.random_weights:
        raise error("--checkpoint and --random-weights exclude each other")
    if args.checkpoint is not None and not Path(os.path.expanduser(args.checkpoint)).is_file():
        raise error(f"checkpoint file not found: {args.checkpoint}")
    return spec, dtype, device


def _check_environment() -> None:
    """Parse the environment variables now: a malformed one is a usage error before any work."""
    from .checkpoint import trust_checkpoints
    from .text import cache_enabled, cache_limit_bytes

    for read in (trust_checkpoints, cache_enabled, cache_limit_bytes):
        try:
            read()
        except ValueError as error:
            raise UsageError(str(error)) from None


def _load_vocabulary(text: str) -> List[str]:
    from .vocabulary import load_vocabulary, parse_vocabulary_arg

    try:
        names = load_vocabulary(parse_vocabulary_arg(text))
    except Exception as error:  # noqa: BLE001 - whatever the reason, it is a bad --vocab
        raise UsageError(f"--vocab {text!r}: {_describe(error)}") from error
    names = [str(name) for name in names]
    if not names:
        raise UsageError(f"--vocab {text!r}: the vocabulary is empty")
    if len(names) > 65536:
        raise UsageError(f"--vocab {text!r}: {len(names)} classes; label maps hold at most 65536")
    return names


class _Input:
    """One requested image: its path (or the pattern that matched nothing) and output stem."""

    def __init__(self, path: Path, missing: Optional[str] = None):
        self.path = path
        self.missing = missing  # an error message when there is no such file
        self.stem = ""


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def collect_images(specs: Sequence[str], quiet: bool = False) -> List[_Input]:
    """Expand files, folders (their images, sorted) and glob patterns, in order, without repeats.

    Paths that do not exist and patterns that match no image are kept as missing entries (they are
    reported as failed images). Raises :class:`UsageError` when no existing image is found at all.
    """
    inputs: List[_Input] = []
    seen = set()

    def add(path: Path) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            inputs.append(_Input(path))

    def add_folder(folder: Path) -> None:
        found = sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)
        if not found and not quiet:
            _warn(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
        for p in found:
            add(p)

    for spec in specs:
        expanded = os.path.expanduser(spec)
        path = Path(expanded)
        if path.is_dir():
            add_folder(path)
        elif path.exists():
            add(path)
        elif _GLOB_CHARS.search(expanded):
            matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
            images = []
            for match in matches:
                if match.is_dir():
                    add_folder(match)
                    images.append(match)
                elif _is_image_file(match):
                    add(match)
                    images.append(match)
            if not images:
                inputs.append(_Input(path, missing="no image matches this pattern"))
        else:
            inputs.append(_Input(path, missing="file not found"))
    if not any(item.missing is None for item in inputs):
        raise UsageError("no images found in " + " ".join(repr(s) for s in specs)
                         + f" (image files, folders of {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files, "
                           "or glob patterns)")
    _assign_stems(inputs)
    return inputs


def _safe(text: str) -> str:
    text = re.sub(r"[^\w.\-]+", "_", text).strip("._")
    return _shorten(text or "image")


def _shorten(text: str, limit: int = _STEM_BYTES) -> str:
    """``text`` if its UTF-8 form fits in ``limit`` bytes, else its first characters that fit and
    ``-`` + 8 hex digits of its hash (file systems refuse names over 255 bytes)."""
    encoded = text.encode("utf-8", "surrogateescape")
    if len(encoded) <= limit:
        return text
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    head = encoded[:limit - 9].decode("utf-8", "ignore")
    return f"{head}-{digest}"


def _assign_stems(inputs: List[_Input]) -> None:
    """Output name stems: the file's stem, made unique (case-insensitively) when two inputs share it
    (``photo-<folder>``, then ``photo-<folder>-<ext>``, then ``-2``, ``-3``...): never overwrite."""
    stems = [_safe(item.path.stem) for item in inputs]
    counts = Counter(s.lower() for s in stems)
    names = []
    for item, stem in zip(inputs, stems):
        if counts[stem.lower()] > 1:
            folder = _safe(item.path.parent.name or "root")
            stem = f"{stem}-{folder}"
        names.append(stem)
    counts = Counter(n.lower() for n in names)
    names = [f"{n}-{_safe(item.path.suffix.lstrip('.')) or 'noext'}" if counts[n.lower()] > 1 else n
             for item, n in zip(inputs, names)]
    used = set()
    for item, name in zip(inputs, names):
        name = _shorten(name, 2 * _STEM_BYTES)  # folder and extension suffixes keep names well under 255 bytes
        candidate, k = name, 2
        while candidate.lower() in used:
            candidate, k = f"{name}-{k}", k + 1
        used.add(candidate.lower())
        item.stem = candidate


def load_image(path: Path):
    """An image file as an RGB PIL image, as detectron2's ``read_image(path, "RGB")`` reads it:
    EXIF orientation applied, then ``convert("RGB")`` (gray, RGBA, palette, CMYK alike)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        with warnings.catch_warnings():  # Pillow suggests RGBA for palette images with transparency
            warnings.simplefilter("ignore", UserWarning)
            return image.convert("RGB")


def _build_model(args, spec, dtype, device, checkpoint_state):
    """Build the model; the default impl falls back from fast to reference with a warning.
    Returns (model, impl used)."""
    from .api import RandomWeightsWarning, build_sed
    from .checkpoint import CheckpointError

    def build(impl: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)  # the CLI says it its own way
            return build_sed(spec.name, impl=impl, checkpoint=checkpoint_state, device=device, dtype=dtype,
                             cer_topk=args.cer_topk, clip_resolution=args.resolution,
                             text_cache=not args.no_text_cache)

    impl = args.impl or "fast"
    try:
        return build(impl), impl
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001
        if impl != "fast":
            raise
        reason = f"{type(error).__name__}: {_describe(error)}"
        if args.impl == "fast":  # asked for explicitly: no silent substitute
            raise UsageError(f"the fast implementation cannot be built ({reason}); use --impl reference") from error
        _warn(f"the fast implementation cannot be built ({reason}); using --impl reference")
        if args.debug:
            traceback.print_exc()
    try:
        return build("reference"), "reference"
    except CheckpointError as error:
        raise UsageError(str(error)) from error


def _read_checkpoint(path_text: str):
    from .checkpoint import CheckpointError, read_state_dict

    path = Path(os.path.expanduser(path_text))
    if not path.exists():
        raise UsageError(f"checkpoint file not found: {path_text}")
    try:
        return read_state_dict(path)
    except (CheckpointError, OSError) as error:
        raise UsageError(_describe(error)) from error


def _segment(args: argparse.Namespace, signals: Optional[_Signals] = None) -> int:
    signals = signals or _Signals()
    spec, dtype, device = _check_options(args)
    class_names = _load_vocabulary(args.vocab)
    inputs = collect_images(args.images, quiet=args.quiet)
    out_dir = Path(os.path.expanduser(args.out))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the output folder {args.out}: {_describe(error)}") from error
    if not out_dir.is_dir():
        raise UsageError(f"--out {args.out} is not a folder")
    output = _OutputFolder(out_dir)
    try:
        output.probe()
    except OSError as error:
        raise UsageError(f"--out {args.out}: cannot write in this folder ({_describe(error)}); choose another "
                         "--out or make it writable") from error

    random_weights = args.checkpoint is None
    if random_weights:
        print(f"{_PROG}: WARNING: RANDOM WEIGHTS (--random-weights, no checkpoint): every output of this "
              "run is meaningless and is marked as made with random weights", file=sys.stderr)
    info = (lambda message: None) if args.quiet else (lambda message: print(f"{_PROG}: {message}", file=sys.stderr))

    from . import __version__
    summary: Dict[str, object] = {
        "status": "running",
        "exit_code": None,
        "run_id": uuid.uuid4().hex,
        "started_at": _now(),
        "finished_at": None,
        "sed_fast_version": __version__,
        "random_weights": random_weights,
        "checkpoint": None if random_weights else str(Path(os.path.expanduser(args.checkpoint)).resolve()),
        "variant": spec.name,
        "impl": None,
        "impl_requested": args.impl or "fast (default)",
        "dtype": _DTYPES[args.dtype],
        "device": None,
        "cer_topk": args.cer_topk,
        "clip_resolution": args.resolution,
        "official_resolution": args.resolution == 768,
        "vocabulary": {"spec": args.vocab, "num_classes": len(class_names), "class_names": class_names},
        "num_inputs": len(inputs),
        "images": [],
    }
    records: List[dict] = summary["images"]  # type: ignore[assignment]

    timing = {"last": 0.0, "cost": 0.0}

    def save_summary(force: bool = True, **changes) -> Path:
        summary.update(changes)
        failed = [r for r in records if r["status"] != "ok"]
        summary.update(num_images=len(records), num_ok=len(records) - len(failed), num_failed=len(failed))
        path = out_dir / "summary.json"
        # After an image: a write that takes over 10 ms (a summary of thousands of images) is skipped
        # while the previous one is recent relative to its cost: rewriting stays under ~5% of the run.
        if not force and timing["cost"] > 0.01 and time.perf_counter() - timing["last"] < 20 * timing["cost"]:
            return path
        with signals.deferred():
            start = time.perf_counter()
            output.write_json("summary.json", summary)
            timing["last"], timing["cost"] = time.perf_counter(), time.perf_counter() - start
        return path

    summary_path = save_summary()  # replaces a previous run's summary before any work
    try:
        checkpoint_state = None if random_weights else _read_checkpoint(args.checkpoint)
        start = time.perf_counter()
        model, impl = _build_model(args, spec, dtype, device, checkpoint_state)
        del checkpoint_state
        info(f"built SED-{spec.name.upper()} ({impl}, {args.dtype}, {model.device}) in "
             f"{time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        try:
            class_names = model.set_vocabulary(class_names, progress=False if args.quiet else None)
        except ValueError as error:  # e.g. names the tokenizer makes identical
            raise UsageError(f"--vocab {args.vocab!r}: {error}") from error
        info(f"vocabulary: {len(class_names)} classes ({time.perf_counter() - start:.1f} s)")
        random_weights = bool(getattr(model, "random_weights", random_weights))
        save_summary(impl=impl, device=str(model.device), random_weights=random_weights)

        progress = _progress(len(inputs), disable=args.quiet or len(inputs) <= 1)
        for first in range(0, len(inputs), args.batch_size):
            for item, result in _segment_batch(model, inputs[first:first + args.batch_size], class_names, args,
                                               random_weights):
                record = {"input": str(item.path), "status": "ok"}
                try:
                    if isinstance(result, BaseException):
                        raise result
                    with signals.deferred():  # this image's files and the summary, whole
                        record.update(_write_outputs(output, item, result, args, random_weights))
                        records.append(record)
                        save_summary(force=False)
                except KeyboardInterrupt:
                    raise
                except Exception as error:  # noqa: BLE001 - report this image, go on with the others
                    message = item.missing or _describe(error)
                    if type(error).__name__ in ("UnidentifiedImageError",) or isinstance(error, SyntaxError):
                        message = f"cannot decode the image: {message}"
                    record.update(status="error", error=message)
                    if item.missing is None:
                        record["error_type"] = type(error).__name__
                    if not any(r is record for r in records):  # not when only the summary write failed
                        records.append(record)
                    save_summary(force=False)
                    _report_failure(progress, item, message)
                    if args.debug and item.missing is None:
                        traceback.print_exception(type(error), error, error.__traceback__)
                    _free_device_memory(error)
                if progress is not None:
                    progress.update(1)
        if progress is not None:
            progress.close()
    except KeyboardInterrupt as error:
        code = getattr(error, "exit_code", EXIT_SIGINT)
        save_summary(status="interrupted", exit_code=code, signal=_signal_name(code - 128), finished_at=_now(),
                     num_not_processed=len(inputs) - len(records))
        raise
    except UsageError as error:
        save_summary(status="failed", exit_code=EXIT_USAGE, error=str(error), finished_at=_now())
        raise
    except Exception as error:
        save_summary(status="failed", exit_code=EXIT_FAILED, error=f"{type(error).__name__}: {_describe(error)}",
                     finished_at=_now())
        raise

    failed = [r for r in records if r["status"] != "ok"]
    code = EXIT_FAILED if failed else EXIT_OK
    save_summary(status="complete", exit_code=code, finished_at=_now())
    if failed:
        _error(f"{len(failed)} of {len(records)} image(s) failed: "
               + "; ".join(f"{r['input']}: {r['error']}" for r in failed[:5])
               + (f"; ... ({len(failed) - 5} more)" if len(failed) > 5 else "")
               + f" (see {summary_path})")
    info(f"{summary['num_ok']} of {len(records)} image(s) segmented; outputs in {out_dir}")
    if random_weights:
        print(f"{_PROG}: WARNING: these outputs were made with RANDOM WEIGHTS", file=sys.stderr)
    return code


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _segment_batch(model, items: List[_Input], class_names: List[str], args, random_weights: bool):
    """Segment a batch of images in one forward (the list API: any sizes); yields (item, result or
    the exception that stopped this image). A failed forward is retried image by image, so that a
    bad image fails alone."""
    import numpy as np
    import torch

    start = time.perf_counter()
    loaded = []
    for item in items:
        if item.missing is not None:
            yield item, FileNotFoundError(item.missing)
            continue
        try:
            image = load_image(item.path)
        except Exception as error:  # noqa: BLE001 - reported as this image's failure
            yield item, error
            continue
        loaded.append((item, image, torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)))
    if not loaded:
        return
    try:
        predictions = _predict(model, [pixels for _, _, pixels in loaded], args.save_scores)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001
        if len(loaded) == 1:
            yield loaded[0][0], error
            return
        _free_device_memory(error)
        for item, _, _ in loaded:  # find which image fails
            yield from _segment_batch(model, [item], class_names, args, random_weights)
        return
    seconds = (time.perf_counter() - start) / len(loaded)
    for (item, image, _), (labels, scores) in zip(loaded, predictions):
        yield item, _result(image, labels.cpu().numpy(), scores, class_names, args, random_weights, seconds)


def _predict(model, images, save_scores: bool):
    """[(labels (H, W), scores (T, H, W) or None)] for a list of (3, H, W) uint8 images: the
    class map alone (``predict_labels``) unless the scores are to be saved."""
    images = [image.to(model.device) for image in images]
    if save_scores:
        return [(scores.argmax(0), scores) for scores in model(images)]
    return [(labels, None) for labels in model.predict_labels(images)]


def _result(image, labels, scores, class_names: List[str], args, random_weights: bool, seconds: float) -> dict:
    """What one image's outputs are made of (nothing is written here)."""
    import numpy as np
    import torch

    from .visualize import class_areas, render_overlay
    from .vocabulary import display_name

    labels = labels.astype(np.int64)
    height, width = labels.shape
    label_dtype = np.uint8 if len(class_names) <= 256 else np.uint16
    result = {
        "labels": labels.astype(label_dtype),
        "overlay": render_overlay(image, labels, class_names, alpha=args.alpha, banner=random_weights),
        "scores": scores.to(torch.float16).cpu().numpy() if scores is not None else None,
    }
    areas = class_areas(labels, len(class_names))
    total = max(int(areas.sum()), 1)
    present = sorted((int(i) for i in np.flatnonzero(areas)), key=lambda i: (-int(areas[i]), i))
    result["record"] = {
        "height": height,
        "width": width,
        "seconds": round(seconds, 3),
        "classes": [{"index": i, "name": class_names[i], "display_name": display_name(class_names[i]),
                     "share": round(float(areas[i]) / total, 6)} for i in present],
    }
    return result


def _write_outputs(output: _OutputFolder, item: _Input, result: dict, args, random_weights: bool) -> dict:
    """Write one image's files (each atomically); returns its summary record."""
    import numpy as np
    from PIL import Image

    from .visualize import png_info

    outputs = {}
    name = f"{item.stem}_labels.png"
    output.write(name, lambda handle: Image.fromarray(result["labels"]).save(
        handle, format="PNG", pnginfo=png_info(random_weights)))
    outputs["labels"] = name
    name = f"{item.stem}_overlay.png"
    output.write(name, lambda handle: result["overlay"].save(handle, format="PNG", pnginfo=png_info(random_weights)))
    outputs["overlay"] = name
    if result["scores"] is not None:
        name = f"{item.stem}_scores.npy"
        output.write(name, lambda handle: np.save(handle, result["scores"]))
        outputs["scores"] = name
    return {"outputs": outputs, **result["record"]}


def _free_device_memory(error: BaseException) -> None:
    if "out of memory" in str(error).lower():
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def _progress(total: int, disable: bool):
    """A progress bar over ``total`` images (updated by the caller), or None."""
    if not disable:
        try:
            from tqdm import tqdm
            return tqdm(total=total, file=sys.stderr, unit="image", desc=_PROG, dynamic_ncols=True)
        except ImportError:
            pass
    return None


def _report_failure(progress, item: _Input, message: str) -> None:
    text = f"{_PROG}: error: {item.path}: {message}"
    write = getattr(progress, "write", None)
    if write is not None:
        write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
