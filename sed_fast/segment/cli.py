"""The ``sed-fast`` command (also ``python -m sed_fast``).

    sed-fast segment IMAGES... --vocab ade150 --checkpoint sed_model_base.pth --out out/
    sed-fast demo           (a built-in sample, random weights: sed_fast.demo)
    sed-fast bench | bench-kernels | profile | report | compile-report ...   (sed_fast.bench)

Exit codes of ``segment``: 0 every image was segmented; 1 some images failed (each is listed in
``summary.json`` and on stderr; the others are still processed) or an unexpected error stopped the
run; 2 usage error (bad option, vocabulary, checkpoint, environment variable, no images, an output
folder that cannot be written or that another run is using): nothing is segmented; 130 interrupted
by SIGINT (Ctrl-C); 143 terminated by SIGTERM; 129 SIGHUP (the terminal closed; not under
``nohup``, whose ignoring of it is kept). Errors are one-line messages; ``--debug`` adds the Python
traceback.

What an interrupted or failed run leaves in ``--out``: every output file (``*_labels.png``,
``*_overlay.png``, ``*_scores.npy``, ``summary.json``) is written to a temporary file in the same
folder and renamed into place, so each file is either the complete new one or the previous one,
never a truncated mix (and a symbolic link of the same name is replaced, not written through).
A signal that arrives while an image's files are being written takes effect once they and the
summary are written. ``summary.json`` is written when the run starts and rewritten after each image
(once it is large, at most as often as keeps its rewriting under ~5% of the run) and at the end,
with ``"status"``: ``"running"``, then ``"complete"`` (``exit_code`` 0 or 1), ``"interrupted"``
(``exit_code`` 129/130/143, ``signal``) or ``"failed"`` (an error stopped the run: ``error``); its
``run_id``, ``pid``, ``host`` and ``started_at`` say which run wrote it, so a run into a used folder
replaces the old summary at its start. When the final rewrite fails (a full disk) a compact final
summary (no per-image records, ``summary_error``) overwrites the file in place; a run killed
outright (SIGKILL) leaves ``"running"``, which :func:`read_summary` reads as ``"interrupted"`` once
that process no longer holds the folder. One run at a time per ``--out``
(:mod:`sed_fast.toolkit.outdir_lock`): a second one exits with code 2 naming the first one's PID.
Output names keep at most 100 bytes of the input's stem (longer stems get a
short hash instead of the rest).
"""
from __future__ import annotations

import argparse
import json
import glob
import os
import re
import socket
import sys
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..toolkit.errors import (EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_USAGE, PROG as _PROG, UsageError, describe,
                              error as _error, parse_command_line, signal_name, warn as _warn)
from ..toolkit.options import DTYPES, add_model_options, build_with_vocabulary, check_model_options, load_vocabulary
from ..toolkit.outputs import STEM_BYTES, OutputFolder, claim_outputs, hold_output, safe_stem, shorten
from ..video import written_by_an_earlier_run
from ..toolkit.progress import Progress
from ..toolkit.record import now, run_record
from ..toolkit.signals import StopSignals

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")
_GLOB_CHARS = re.compile(r"[*?\[]")


# -- parser -------------------------------------------------------------------------------------
DESCRIPTION = ("Segment images with an open vocabulary. Writes, per image, <stem>_labels.png "
               "(class index per pixel: for up to 256 classes a palette PNG, the pixel values the class "
               "indices and shown in the class colours; else 16-bit grey), "
               "<stem>_overlay.png (image blended with class colours and a legend), with --save-label-npy "
               "<stem>_labels.npy and with --save-scores <stem>_scores.npy (float16, T x H x W); and "
               "summary.json (rewritten as the run goes, with its status). Each file is written whole or "
               "not at all. A reused --out: nothing is deleted; the output files of an earlier run that "
               "this run does not rewrite are listed in summary.json (stale_files) and on stderr; a file under one of "
               "this run's output names that no segment run wrote stops the run (exit 2) before anything is "
               "written. "
               "Exit code: 0 all images ok, 1 some failed, 2 usage error, 128+n stopped by signal n "
               "(130 SIGINT, 143 SIGTERM, 129 SIGHUP).")


def build_parser() -> argparse.ArgumentParser:
    seg = argparse.ArgumentParser(prog=f"{_PROG} segment", description=DESCRIPTION)
    seg.add_argument("images", nargs="*", metavar="IMAGES",
                     help="image files, folders (their images, sorted) or glob patterns (quoted); or video "
                          "files / stream URLs (see the video options); an animated GIF file is segmented as a "
                          "video, a still GIF as an image")
    seg.add_argument("--vocab", "--vocabulary", dest="vocab", required=True, metavar="NAME|FILE|LIST",
                     help="built-in vocabulary (ade150, ade847, pc59, pc459, voc20, voc20b, coco), a file "
                          "(JSON list or one name per line) or comma-separated names, e.g. 'cat,dog,grass'")
    add_model_options(seg)
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    seg.add_argument("--resume", action="store_true",
                     help="continue an interrupted run in --out: the images whose outputs are complete (listed "
                          "as ok in its summary.json, their files present) are skipped")
    seg.add_argument("--save-scores", action="store_true",
                     help="also write <stem>_scores.npy (float16; needs the full-size scores in memory: without "
                          "it only the class map is computed)")
    seg.add_argument("--save-label-npy", action="store_true",
                     help="also write <stem>_labels.npy (H x W class indices, uint8 or uint16)")
    seg.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="images per forward (of any sizes: each is resized to the encoder's input; default 1)")
    seg.add_argument("--max-pixels", type=int, default=None, metavar="N",
                     help="refuse images of more than N pixels (width x height; 0: no limit; default "
                          "SED_FAST_MAX_PIXELS, else Pillow's MAX_IMAGE_PIXELS): a guard against decompression "
                          "bombs; segmenting takes about 12 bytes of memory per pixel")
    seg.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (default 0.5)")
    seg.add_argument("--quiet", "-q", action="store_true", help="no progress bar or info lines (errors still shown)")
    seg.add_argument("--debug", action="store_true", help="show Python tracebacks with errors")
    from ..video.options import add_arguments as add_video_arguments
    add_video_arguments(seg)
    return seg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``sed-fast segment`` with ``argv``; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, code = parse_command_line(parser, argv)
    if args is None:
        if code == EXIT_USAGE:
            _hint_dash_names(parser, argv)
        return code
    return run(args)


def _hint_dash_names(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """After a usage error: an argument that starts with '-' but names a file (``-dash.png``) was
    taken for an option; say how to pass it."""
    options = {name for action in parser._actions for name in action.option_strings}
    for arg in argv:
        arg = str(arg)
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if (len(arg) > 1 and arg.startswith("-") and name not in options and not re.fullmatch(r"-\d.*", arg)
                and (os.path.lexists(arg) or Path(arg).suffix.lower() in IMAGE_EXTENSIONS or os.sep in arg)):
            print(f"{_PROG}: hint: {arg!r} starts with '-', so it was read as an option; to pass it as a file "
                  f"write ./{arg}, or put it at the end after --  (e.g. ... --out DIR -- {arg})", file=sys.stderr)


# -- segment ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run ``segment`` with parsed ``args``; return the exit code."""
    signals = StopSignals()
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
        _error(f"interrupted ({signal_name(code - 128)})")
        return code
    except Exception as error:  # noqa: BLE001 - a one-line message; --debug shows the traceback
        _error(f"{type(error).__name__}: {describe(error)}")
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
    if args.max_pixels is not None and args.max_pixels < 0:
        raise UsageError(f"--max-pixels must be >= 0 (0: no limit), got {args.max_pixels}")
    return spec, dtype, device


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
    from ..inputs.image_files import InputFileError, check_regular_file

    inputs: List[_Input] = []
    seen = set()

    def add(path: Path) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            inputs.append(_Input(path))

    def skip_special(path: Path) -> None:
        """An image name that is no regular file (a FIFO, a link loop...) is never opened: say so."""
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_file() and not path.is_dir():
            try:
                check_regular_file(path)
            except (InputFileError, OSError) as error:
                _warn(f"skipping {error}")

    def add_folder(folder: Path) -> None:
        for p in folder.iterdir():
            skip_special(p)
        found = sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)
        videos = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
        if videos:  # not silently: the user may expect their frames to be segmented
            _warn(f"skipped {len(videos)} video file(s) in {folder} ({', '.join(videos[:5])}"
                  f"{', ...' if len(videos) > 5 else ''}): a folder is read for its images; give video files "
                  "themselves as inputs to segment their frames")
        if not found and not quiet:
            _warn(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {folder}")
        for p in found:
            add(p)

    for spec in specs:
        expanded = os.path.expanduser(spec)
        path = Path(expanded)
        if path.is_dir():
            add_folder(path)
        elif os.path.lexists(expanded):  # also a link loop or a link to nothing: said so, not "not found"
            try:
                check_regular_file(path)
            except (InputFileError, OSError) as error:
                raise UsageError(f"{error}. Nothing was segmented") from None
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
                else:
                    skip_special(match)
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


def _assign_stems(inputs: List[_Input]) -> None:
    """Output name stems: the file's stem, made unique (case-insensitively) when two inputs share it
    (``photo-<folder>``, then ``photo-<folder>-<ext>``, then ``-2``, ``-3``...): never overwrite."""
    stems = [safe_stem(item.path.stem) for item in inputs]
    counts = Counter(s.lower() for s in stems)
    names = []
    for item, stem in zip(inputs, stems):
        if counts[stem.lower()] > 1:
            folder = safe_stem(item.path.parent.name or "root")
            stem = f"{stem}-{folder}"
        names.append(stem)
    counts = Counter(n.lower() for n in names)
    names = [f"{n}-{safe_stem(item.path.suffix.lstrip('.')) or 'noext'}" if counts[n.lower()] > 1 else n
             for item, n in zip(inputs, names)]
    used = set()
    for item, name in zip(inputs, names):
        name = shorten(name, 2 * STEM_BYTES)  # folder and extension suffixes keep names well under 255 bytes
        candidate, k = name, 2
        while candidate.lower() in used:
            candidate, k = f"{name}-{k}", k + 1
        used.add(candidate.lower())
        item.stem = candidate


def _segment(args: argparse.Namespace, signals: Optional[StopSignals] = None) -> int:
    signals = signals or StopSignals()
    run_start = time.perf_counter()
    spec, dtype, device = _check_options(args)
    from ..video.options import image_run_problem, wants_video
    if wants_video(args):
        from ..video.videos import segment_videos
        with hold_output(args.out, "segment"):  # one run per --out for videos too
            return segment_videos(args, signals, spec, dtype, device, load_vocabulary, build_with_vocabulary)
    if image_run_problem(args):
        raise UsageError(image_run_problem(args))
    if not args.images:
        raise UsageError("no images given: segment IMAGES... (or video files, a stream URL, --camera N)")
    class_names = load_vocabulary(args.vocab)
    inputs = collect_images(args.images, quiet=args.quiet)
    out_dir = Path(os.path.expanduser(args.out))
    with hold_output(args.out, "segment"):  # writable, and no other run in it, before the model is built
        return _segment_locked(args, signals, spec, dtype, device, class_names, inputs, out_dir, run_start)


def _segment_locked(args, signals: StopSignals, spec, dtype, device, class_names: List[str], inputs: List[_Input],
                    out_dir: Path, run_start: float) -> int:
    """``segment`` into ``out_dir``, which this process holds (``run_start``: the command's start,
    for the total time)."""
    output = OutputFolder(out_dir)
    finished = _finished_records(args, out_dir, inputs) if getattr(args, "resume", False) else {}
    claim_outputs(args.out, out_dir, "segment", ["summary.json"] + [item.stem + suffix for item in inputs
                                                                    for suffix in _output_suffixes(args)],
                  checkpoint=args.checkpoint, legacy_owned=written_by_an_earlier_run(out_dir))
    todo = [item for item in inputs if str(item.path) not in finished]
    random_weights = args.checkpoint is None
    if random_weights:
        print(f"{_PROG}: WARNING: RANDOM WEIGHTS (--random-weights, no checkpoint): every output of this "
              "run is meaningless and is marked as made with random weights", file=sys.stderr)
    info = (lambda message: None) if args.quiet else (lambda message: print(f"{_PROG}: {message}", file=sys.stderr))

    from .. import __version__
    summary: Dict[str, object] = {
        "status": "running",
        "exit_code": None,
        "run_id": uuid.uuid4().hex,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": now(),
        "finished_at": None,
        "sed_fast_version": __version__,
        "random_weights": random_weights,
        "checkpoint": None if random_weights else str(Path(os.path.expanduser(args.checkpoint)).resolve()),
        "variant": spec.name,
        "impl": None,
        "impl_requested": args.impl or "fast (default)",
        "dtype": DTYPES[args.dtype],
        "device": None,
        "cer_topk": args.cer_topk,
        "clip_resolution": args.resolution,
        "official_resolution": args.resolution == 768,
        "vocabulary": {"spec": args.vocab, "num_classes": len(class_names), "class_names": class_names},
        "num_inputs": len(inputs),
        "stale_files": _stale_outputs(out_dir, inputs),
        "run": run_record(),
        "images": [],
    }
    records: List[dict] = summary["images"]  # type: ignore[assignment]
    records.extend(finished[str(item.path)] for item in inputs if str(item.path) in finished)
    if finished:
        info(f"--resume: {len(finished)} of {len(inputs)} image(s) already segmented in {out_dir}, skipped")

    timing = {"last": 0.0, "cost": 0.0}

    def save_summary(force: bool = True, **changes) -> Path:
        summary.update(changes)
        failed = [r for r in records if r["status"] != "ok"]
        summary.update(num_images=len(records), num_ok=len(records) - len(failed), num_failed=len(failed))
        path = out_dir / "summary.json"
        # After an image: a write that takes over 10 ms (a summary of thousands of images) is skipped
        # while the previous one is recent relative to its cost: rewriting stays under ~5% of the run.
        # (Only past 100 records: a small summary is always rewritten, however busy the machine.)
        if not force and len(records) > 100 and timing["cost"] > 0.01 and \
                time.perf_counter() - timing["last"] < 20 * timing["cost"]:
            return path
        with signals.deferred():
            start = time.perf_counter()
            output.write_json("summary.json", summary)
            timing["last"], timing["cost"] = time.perf_counter(), time.perf_counter() - start
        return path

    save_summary.summary, save_summary.path = summary, out_dir / "summary.json"  # for _save_final
    summary_path = save_summary()  # replaces a previous run's summary before any work
    stale = summary["stale_files"]
    if stale:
        _warn(f"--out {args.out} holds {len(stale)} output file(s) of an earlier run that this run does not "
              f"rewrite ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}): kept, and listed in "
              f"{summary_path.name} as stale_files")
    try:
        model, impl, class_names = build_with_vocabulary(args, spec, dtype, device, class_names, info)
        random_weights = bool(getattr(model, "random_weights", random_weights))
        save_summary(impl=impl, device=str(model.device), random_weights=random_weights)

        progress = Progress(len(todo), enabled=not args.quiet and len(todo) > 1, desc=_PROG, unit="image")
        for first in range(0, len(todo), args.batch_size):
            for item, result in _segment_batch(model, todo[first:first + args.batch_size], class_names, args,
                                               random_weights):
                signals.check()  # a Ctrl-C whose exception a finaliser swallowed stops the run here
                record = {"input": str(item.path), "status": "ok"}
                try:
                    if isinstance(result, BaseException):
                        raise result
                    if "note" in result["record"]:
                        _report_note(progress, item, result["record"]["note"])
                    # this image's files and the summary, whole; after the last image's, a signal no
                    # longer stops the run: it has finished
                    with signals.finishing() if item is todo[-1] else signals.deferred():
                        record.update(_write_outputs(output, item, result, args, random_weights))
                        records.append(record)
                        save_summary(force=False)
                except KeyboardInterrupt:
                    raise
                except Exception as error:  # noqa: BLE001 - report this image, go on with the others
                    message = item.missing or describe(error)
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
                progress.update(1)
        progress.close()
    except KeyboardInterrupt as error:
        code = getattr(error, "exit_code", EXIT_SIGINT)
        _save_final(save_summary, status="interrupted", exit_code=code, signal=signal_name(code - 128),
                    finished_at=now(), num_not_processed=len(inputs) - len(records))
        raise
    except UsageError as error:
        _save_final(save_summary, status="failed", exit_code=EXIT_USAGE, error=str(error), finished_at=now())
        raise
    except Exception as error:
        _save_final(save_summary, status="failed", exit_code=EXIT_FAILED,
                    error=f"{type(error).__name__}: {describe(error)}", finished_at=now())
        raise
    except BaseException as error:  # SystemExit, GeneratorExit...: the summary does not stay "running"
        _save_final(save_summary, status="failed", exit_code=EXIT_FAILED, error=type(error).__name__,
                    finished_at=now())
        raise

    failed = [r for r in records if r["status"] != "ok"]
    code = EXIT_FAILED if failed else EXIT_OK
    seconds = time.perf_counter() - run_start
    with signals.finishing():
        if not _save_final(save_summary, status="complete", exit_code=code, finished_at=now(),
                           seconds_total=round(seconds, 3)):
            code = EXIT_FAILED  # the outputs are there, their summary is not
            _finish_in_place(summary_path, dict(summary, exit_code=code))
    if signals.late is not None:
        _warn(f"the run finished before {signal_name(signals.late)} took effect: every output is written, nothing "
              "is left to resume")
    if failed:
        _error(f"{len(failed)} of {len(records)} image(s) failed: "
               + "; ".join(f"{r['input']}: {r['error']}" for r in failed[:5])
               + (f"; ... ({len(failed) - 5} more)" if len(failed) > 5 else "")
               + f" (see {summary_path})")
    info(f"{summary['num_ok']} of {len(records)} image(s) segmented in {seconds:.1f} s in all (model, vocabulary "
         f"and images); outputs in {out_dir}")
    if random_weights:
        print(f"{_PROG}: WARNING: these outputs were made with RANDOM WEIGHTS", file=sys.stderr)
    return code


def _finished_records(args, out_dir: Path, inputs: List[_Input]) -> Dict[str, dict]:
    """``--resume``: the summary records (by input path) of the images an earlier, unfinished run
    into ``out_dir`` segmented completely (status ok, each of its output files present). Nothing
    to resume (no summary, not a segment run, a finished one) is a usage error."""
    path = out_dir / "summary.json"
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("images"), list):
        raise UsageError(f"--resume: --out {args.out} holds no segment run to resume (no readable summary.json "
                         "of one); nothing was changed. Leave out --resume to start a run")
    if earlier.get("status") == "complete":
        raise UsageError(f"--resume: the run in --out {args.out} finished (summary.json says complete); nothing "
                         "to resume. Leave out --resume to segment again")
    wanted = {str(item.path): item.stem for item in inputs}
    needed = {"labels", "overlay"} | ({"scores"} if args.save_scores else set()) \
        | ({"labels_npy"} if args.save_label_npy else set())  # this run's outputs, not only the earlier one's
    finished = {}
    for record in earlier["images"]:
        if not isinstance(record, dict) or record.get("status") != "ok" or record.get("input") not in wanted:
            continue
        outputs = record.get("outputs") or {}
        if needed <= set(outputs) and all(isinstance(name, str) and name.startswith(wanted[record["input"]] + "_")
                           and (out_dir / name).is_file() for name in outputs.values()):
            finished[record["input"]] = record
    return finished


_OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png", "_scores.npy", "_labels.npy")


def _output_suffixes(args) -> List[str]:
    """The suffixes of the files this run writes per image."""
    return ["_labels.png", "_overlay.png"] + (["_labels.npy"] if getattr(args, "save_label_npy", False) else []) \
        + (["_scores.npy"] if getattr(args, "save_scores", False) else [])


def _stale_outputs(out_dir: Path, inputs: List[_Input]) -> List[str]:
    """Names of the files in ``out_dir`` that look like segment's outputs (``<stem>_labels.png``...)
    but are not this run's: an earlier run's, kept beside the new summary."""
    mine = {item.stem + suffix for item in inputs for suffix in _OUTPUT_SUFFIXES}
    try:
        names = sorted(entry.name for entry in os.scandir(out_dir) if entry.is_file(follow_symlinks=False)
                       or entry.is_symlink())
    except OSError:
        return []
    return [name for name in names if name.endswith(_OUTPUT_SUFFIXES) and not name.startswith(".")
            and name not in mine]


def _save_final(save_summary: Callable, **changes) -> bool:
    """Write the final summary; when that fails (a full disk), overwrite the file in place with a
    compact one (:func:`_finish_in_place`) and say so rather than raise over the error that stopped
    the run. Returns whether the full summary was written."""
    try:
        save_summary(**changes)
        return True
    except OSError as error:
        summary = save_summary.summary
        summary["summary_error"] = f"summary.json could not be rewritten in full: {describe(error)}"
        written = _finish_in_place(save_summary.path, summary)
        _warn(f"could not write the final summary.json ({describe(error)}); "
              + ("a compact one without the per-image records is in its place" if written else
                 "it still shows an earlier state"))
        return False


_FINAL_KEYS = ("status", "exit_code", "run_id", "pid", "host", "started_at", "finished_at", "error", "signal",
               "summary_error", "num_inputs", "num_images", "num_ok", "num_failed", "num_not_processed")


def _finish_in_place(path: Path, summary: dict) -> bool:
    """Overwrite the existing ``path`` in place with ``summary`` less its per-image records (or,
    if that is longer than the file, its status fields alone): rewriting a file's allocated blocks
    needs no free space, where the atomic rewrite (a new file) does. Returns whether it was written."""
    compact = dict({k: v for k, v in summary.items() if k != "images"}, images=None)
    minimal = dict({k: summary[k] for k in _FINAL_KEYS if k in summary}, images=None)
    try:
        with open(path, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            for record in (compact, minimal):
                data = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"
                if len(data) <= size:
                    handle.seek(0)
                    handle.write(data)
                    handle.truncate()
                    handle.flush()
                    os.fsync(handle.fileno())
                    return True
    except OSError:
        pass
    return False


def read_summary(path) -> dict:
    """A ``summary.json`` (a file or its folder) as written by ``segment``; a summary that still says
    ``"running"`` although its run has ended (killed, its host lost power) reads as
    ``"interrupted"`` with ``"exit_code": None`` and a ``"note"``. The run is known to be live when it
    still holds its output folder's lock, or, without a lock to test, when its PID exists on this host."""
    from ..toolkit.outdir_lock import holder, pid_alive

    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    if summary.get("status") != "running":
        return summary
    pid, host = summary.get("pid"), summary.get("host")
    if pid is None:  # written by an older sed-fast: nothing to check
        return summary
    lock = holder(path.parent)
    if lock is not None and (lock.get("pid"), lock.get("host")) == (pid, host) and lock.get("held") is not None:
        alive = lock["held"]
    elif host == socket.gethostname():
        alive = pid_alive(pid)
    else:
        alive = None
    if alive is False:
        summary = dict(summary, status="interrupted", exit_code=None,
                       note=f"the run (PID {summary.get('pid')} on {summary.get('host')}) ended without finishing "
                            "this summary (killed, or its machine stopped)")
    return summary


def _segment_batch(model, items: List[_Input], class_names: List[str], args, random_weights: bool):
    """Segment a batch of images in one forward (the list API: any sizes); yields (item, result or
    the exception that stopped this image). A failed forward is retried image by image, so that a
    bad image fails alone."""
    from ..inputs.image_files import read_rgb

    start = time.perf_counter()
    loaded = []  # [item, (H, W, 3) uint8 pixels or None once let go, ImageInfo]
    for item in items:
        if item.missing is not None:
            yield item, FileNotFoundError(item.missing)
            continue
        try:
            pixels, image_info = read_rgb(item.path, args.max_pixels)
        except Exception as error:  # noqa: BLE001 - reported as this image's failure
            yield item, error
            continue
        loaded.append([item, pixels, image_info])
        del pixels
    if not loaded:
        return
    try:
        predictions = _predict(model, loaded, args.save_scores)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # noqa: BLE001
        if len(loaded) == 1:
            yield loaded[0][0], error
            return
        _free_device_memory(error)
        items = [item for item, _, _ in loaded]
        del loaded
        for item in items:  # find which image fails
            yield from _segment_batch(model, [item], class_names, args, random_weights)
        return
    seconds = (time.perf_counter() - start) / len(loaded)
    for entry, (labels, scores) in zip(loaded, predictions):
        item, pixels, image_info = entry
        entry[1] = None
        try:
            if pixels is None:  # let go while the labels were made: read again for the overlay
                pixels, again = read_rgb(item.path, args.max_pixels)
                if (again.height, again.width) != (image_info.height, image_info.width):
                    raise ValueError(f"the file changed while it was segmented ({image_info.width}x"
                                     f"{image_info.height}, now {again.width}x{again.height})")
            result = _result(pixels, labels.cpu().numpy(), scores, class_names, args, random_weights, seconds,
                             image_info)
        except Exception as error:  # noqa: BLE001 - reported as this image's failure
            result = error
        del pixels, labels, scores
        yield item, result


#: Images of this many pixels or more are let go while their labels are made and read again for the
#: overlay: their peak memory stays near 9 bytes per pixel rather than 12.
_REREAD_PIXELS = 8 << 20


def _predict(model, loaded: List[list], save_scores: bool):
    """[(labels (H, W), scores (T, H, W) or None)] for the loaded images ([item, pixels, info]):
    the class map alone, in the smallest integer dtype, unless the scores are to be saved. The
    pixels of large images are dropped from ``loaded`` once the model no longer needs them."""
    import torch

    images = [torch.from_numpy(pixels).permute(2, 0, 1).to(model.device) for _, pixels, _ in loaded]
    if save_scores:
        return [(scores.argmax(0), scores) for scores in model(images)]
    if not hasattr(model, "decoder_scores"):  # a model with the plain API
        return [(labels, None) for labels in model.predict_labels(images)]
    scores, sizes = model.decoder_scores(images)
    del images
    for entry in loaded:
        if entry[1].shape[0] * entry[1].shape[1] >= _REREAD_PIXELS:
            entry[1] = None
    return [(labels, None) for labels in model.labels_at_sizes(scores, sizes, label_dtype=None)]


def _result(image, labels, scores, class_names: List[str], args, random_weights: bool, seconds: float,
            image_info=None) -> dict:
    """What one image's outputs are made of (nothing is written here). ``image``: (H, W, 3)
    uint8; ``labels``: (H, W) integer class indices."""
    import numpy as np
    import torch

    from ..visualize import class_areas, render_overlay
    from ..data.vocabulary import display_name

    height, width = labels.shape
    label_dtype = np.uint8 if len(class_names) <= 256 else np.uint16
    labels = labels.astype(label_dtype, copy=False)
    result = {
        "num_classes": len(class_names),
        "labels": labels,
        "overlay": render_overlay(image, labels, class_names, alpha=args.alpha, banner=random_weights),
        "scores": scores.to(torch.float16).cpu().numpy() if scores is not None else None,
    }
    del image
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
    if image_info is not None and image_info.frames > 1:
        result["record"].update(frame=image_info.frame, num_frames=image_info.frames, note=(
            f"{image_info.frame_note}: only this frame of the {image_info.format or ''} file is segmented"))
    if image_info is not None and getattr(image_info, "transparency_note", None):
        result["record"]["transparency"] = image_info.transparency_note
    return result


def _write_outputs(output: OutputFolder, item: _Input, result: dict, args, random_weights: bool) -> dict:
    """Write one image's files (each atomically); returns its summary record."""
    import numpy as np
    from ..visualize import label_map_image, png_info

    outputs = {}
    name = f"{item.stem}_labels.png"
    picture = label_map_image(result["labels"], result["num_classes"])
    output.write(name, lambda handle: picture.save(handle, format="PNG", pnginfo=png_info(random_weights)))
    outputs["labels"] = name
    if getattr(args, "save_label_npy", False):
        name = f"{item.stem}_labels.npy"
        output.write(name, lambda handle: np.save(handle, result["labels"]))
        outputs["labels_npy"] = name
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


def _report_note(progress: Progress, item: _Input, message: str) -> None:
    progress.write(f"{_PROG}: warning: {item.path}: {message}")


def _report_failure(progress: Progress, item: _Input, message: str) -> None:
    progress.write(f"{_PROG}: error: {item.path}: {message}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
