"""``sed-fast segment`` for videos, cameras and streams (called from :mod:`sed_fast.segment.cli` when the
inputs are videos; the exit codes and ``summary.json`` conventions are the image path's).

Per video: ``<stem>_overlay.mp4``, ``<stem>_labels/`` or ``<stem>_labels.npz`` (``--save-labels``),
and one ``summary.json`` for the run with a record per video under ``"videos"``: frames decoded /
segmented / written, corrupt and dropped frames, fps in and out (the video's frame rates),
processing fps, seconds per frame by stage (decode, model, overlay, encode, labels), where the wall
time went (``time_s``: the model thread's parts, which add up to it, and the decoder's and encoder's
work and waiting) and the classes present over time (intervals of decoded-frame indices).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ..toolkit.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_USAGE, UsageError, describe, \
    error as report_error, signal_name, warn
from ..toolkit.outputs import OutputFolder, claim_outputs, safe_stem
from ..toolkit.record import now, run_record
from . import VIDEO_EXTENSIONS, is_stream_url, split_inputs, written_by_an_earlier_run
from .io import SourceError, VideoError, import_av, open_source
from .run import VideoOptions, describe_timing, segment_video


def _stem(spec: str, used: set) -> str:
    if is_stream_url(spec):
        rest = spec.split("://", 1)[1].split("?", 1)[0]
        suffix = Path(rest).suffix
        base = safe_stem(rest[:-len(suffix)] if suffix.lower() in VIDEO_EXTENSIONS else rest)
    else:
        base = safe_stem(Path(spec).stem)
    candidate, k = base, 2
    while candidate.lower() in used:
        candidate, k = f"{base}-{k}", k + 1
    used.add(candidate.lower())
    return candidate


def _check(args: argparse.Namespace, videos: List[str], others: List[str]) -> None:
    if others:
        raise UsageError("give videos or images, not both, in one run: " + ", ".join(repr(o) for o in others[:3])
                         + (" ..." if len(others) > 3 else "") + " are not videos ("
                         + "/".join(e[1:] for e in VIDEO_EXTENSIONS)
                         + ", animated gif)")
    if args.camera is not None and videos:
        raise UsageError("--camera and video inputs exclude each other: run them separately")
    if args.camera is not None and args.camera < 0:
        raise UsageError(f"--camera must be >= 0, got {args.camera}")
    if args.every < 1:
        raise UsageError(f"--every must be >= 1, got {args.every}")
    if args.max_frames is not None and args.max_frames < 1:
        raise UsageError(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.save_scores:
        raise UsageError("--save-scores is for images; for videos use --save-labels png|npz")


def segment_videos(args: argparse.Namespace, signals, spec, dtype, device, load_vocabulary: Callable,
                   build_with_vocabulary: Callable) -> int:
    """The video run of ``segment``: ``spec``, ``dtype``, ``device`` are the model options as the
    image path's checks returned them; ``--out`` is held by the caller. ``load_vocabulary(text)`` and
    ``build_with_vocabulary(args, spec, dtype, device, class_names, info)`` are the command's model
    options (sed_fast.toolkit.options), handed in so that this module stands below them."""
    videos, others = split_inputs(args.images or [])
    _check(args, videos, others)
    try:
        import_av()
    except SourceError as error:
        raise UsageError(str(error)) from None
    class_names = load_vocabulary(args.vocab)
    out_dir = Path(args.out).expanduser()
    # --out is held by the caller (cli._segment, as for images): a second lock here, on another
    # file description in this process, would find the folder busy with this very run.
    return _segment_videos_locked(args, signals, videos, class_names, spec, dtype, device, out_dir,
                                  build_with_vocabulary)


def _segment_videos_locked(args, signals, videos: List[str], class_names: List[str], spec, dtype, device,
                           out_dir: Path, build_with_vocabulary: Callable) -> int:
    output = OutputFolder(out_dir)
    info = (lambda message: None) if args.quiet else (lambda message: print(f"sed-fast: {message}", file=sys.stderr))

    # Open every file source first: a missing camera or an unreadable only input is a usage error
    # before the model is built; with several files, a bad one fails alone later.
    inputs = [(str(args.camera), True)] if args.camera is not None else [(v, False) for v in videos]
    used: set = set()
    stems = [("camera%s" % spec if camera else _stem(spec, used)) for spec, camera in inputs]
    first_error: Optional[SourceError] = None
    if len(inputs) == 1:
        try:
            opened = {0: open_source(inputs[0][0], camera=inputs[0][1])}
        except SourceError as error:
            raise UsageError(str(error)) from None
    else:
        opened = {}

    names = ["summary.json"]
    for stem in stems:
        names.append(f"{stem}_overlay.mp4")
        if args.save_labels:
            names.append(f"{stem}_labels" if args.save_labels == "png" else f"{stem}_labels.npz")
    claim_outputs(args.out, out_dir, "segment", names, checkpoint=args.checkpoint,
                  legacy_owned=written_by_an_earlier_run(out_dir))
    for stem in stems:  # an overlay a killed run left unfinished (the folder is held: no other run writes it)
        partial = out_dir / f".{stem}_overlay.mp4.partial.mp4"
        if partial.is_file():
            partial.unlink()

    random_weights = args.checkpoint is None
    if random_weights:
        print("sed-fast: WARNING: RANDOM WEIGHTS (--random-weights, no checkpoint): every output of this run is "
              "meaningless and is marked as made with random weights", file=sys.stderr)
    from .. import __version__

    summary: Dict[str, object] = {
        "status": "running", "exit_code": None, "run_id": uuid.uuid4().hex, "pid": os.getpid(),
        "host": socket.gethostname(), "started_at": now(),
        "finished_at": None, "sed_fast_version": __version__, "kind": "video", "random_weights": random_weights,
        "checkpoint": None if random_weights else str(Path(args.checkpoint).expanduser().resolve()),
        "variant": spec.name, "impl": None, "dtype": str(dtype).replace("torch.", ""), "device": None,
        "cer_topk": args.cer_topk, "clip_resolution": args.resolution, "batch_size": args.batch_size,
        "vocabulary": {"spec": args.vocab, "num_classes": len(class_names), "class_names": class_names},
        "num_inputs": len(inputs), "run": run_record(), "videos": [],
    }
    records: List[dict] = summary["videos"]  # type: ignore[assignment]
    last_save = {"t": 0.0}

    def save(**changes) -> None:
        summary.update(changes)
        with signals.deferred():
            output.write_json("summary.json", summary)
        last_save["t"] = time.perf_counter()

    save()
    current: Dict[str, Optional[dict]] = {"record": None}
    try:
        model, impl, class_names = build_with_vocabulary(args, spec, dtype, device, class_names, info)
        random_weights = bool(getattr(model, "random_weights", random_weights))
        save(impl=impl, device=str(model.device), random_weights=random_weights)
        options = VideoOptions(batch_size=args.batch_size, every=args.every, max_frames=args.max_frames,
                               save_labels=args.save_labels, alpha=args.alpha, random_weights=random_weights)

        def on_progress(record: dict) -> None:
            if time.perf_counter() - last_save["t"] > 2.0:  # a live summary, without rewriting it per batch
                save()

        for i, ((spec_text, camera), stem) in enumerate(zip(inputs, stems)):
            try:
                source = opened.pop(i) if i in opened else open_source(spec_text, camera=camera)
            except SourceError as error:
                first_error = first_error or error
                records.append({"input": spec_text, "status": "error", "error": str(error)})
                report_error(str(error))
                save()
                continue
            record = {"input": source.label, "status": "running"}
            records.append(record)
            current["record"] = record
            try:
                result = segment_video(model, source, class_names, out_dir, stem, options, info=info,
                                       progress=not args.quiet, deferred=signals.deferred,
                                       on_progress=lambda r, record=record: (record.update(r), on_progress(r)))
            except KeyboardInterrupt as error:
                record.update(getattr(error, "video_record", {}))
                record["status"] = "interrupted"
                raise
            except (VideoError, OSError, RuntimeError, ValueError, MemoryError) as error:
                record.update(getattr(error, "video_record", {}))
                record.update(status="error", error=f"{type(error).__name__}: {describe(error)}")
                report_error(f"{spec_text}: {record['error']}")
                if args.debug:
                    traceback.print_exception(type(error), error, error.__traceback__)
                save()
                continue
            last = i == len(inputs) - 1  # its overlay is closed: a signal from here on comes after the run's end
            with signals.finishing() if last else contextlib.nullcontext():
                record.update(result)
                current["record"] = None
                _report(record, info)
                save()
    except KeyboardInterrupt as error:
        code = getattr(error, "exit_code", EXIT_SIGINT)
        record = current["record"]
        if record is not None:
            where = (f"{record.get('frames_written', 0)} frame(s) written to "
                     f"{out_dir / record['outputs']['overlay']} (the file is complete and plays)"
                     if record.get("outputs", {}).get("overlay") else "no frame was written")
            report_error(f"interrupted in {record['input']} after {record.get('frames_segmented', 0)} segmented "
                        f"frame(s): {where}")
        save(status="interrupted", exit_code=code, signal=signal_name(code - 128), finished_at=now())
        raise
    except UsageError as error:
        save(status="failed", exit_code=EXIT_USAGE, error=str(error), finished_at=now())
        raise
    except Exception as error:
        save(status="failed", exit_code=EXIT_FAILED, error=f"{type(error).__name__}: {describe(error)}",
             finished_at=now())
        raise
    failed = [r for r in records if r["status"] != "ok"]
    code = EXIT_FAILED if failed else EXIT_OK
    with signals.finishing():
        save(status="complete", exit_code=code, finished_at=now())
    if signals.late is not None:
        warn(f"the run finished before {signal_name(signals.late)} took effect: every output is written")
    for r in failed:
        if r["status"] == "truncated":
            report_error(f"{r['input']}: {r['error']}")
    info(f"{len(records) - len(failed)} of {len(records)} video(s) segmented; outputs in {out_dir}")
    if random_weights:
        print("sed-fast: WARNING: these outputs were made with RANDOM WEIGHTS", file=sys.stderr)
    return code


def _report(record: dict, info) -> None:
    info(f"{record['input']}: {record['frames_written']} frame(s) in {record['seconds']:.1f} s "
         f"({record['processing_fps'] or 0:.2f} frames/s); {describe_timing(record)}")
    if record.get("corrupt_frames"):
        warn(f"{record['input']}: {record['corrupt_frames']} corrupt frame(s) skipped "
                   f"({'; '.join(record.get('corrupt_details', [])[:2])})")
    if record.get("dropped_frames"):
        warn(f"{record['input']}: {record['dropped_frames']} frame(s) dropped (the model was slower than "
                   "the live source)")
