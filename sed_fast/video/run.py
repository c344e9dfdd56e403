"""One video through the model: decode thread -> batches -> model -> render/encode thread.

The model runs on the calling (main) thread, so a signal raised there stops it between batches;
whatever stops the run, :func:`segment_video` closes the overlay container (flushing the encoder
and writing the index), so the part written plays, and its record says how far it got.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..base.files import atomic_write, remove_stale_temporaries
from .io import EncodeThread, FrameReader, Source, VideoWriter, choose_encoder, encoder_description, output_pts
from .overlay import render_frame

STAGES = ("decode", "model", "overlay", "encode", "labels")
#: What the main thread (the one running the model) spends the wall time on; these add up to it.
MAIN_THREAD_PARTS = ("model", "waiting_for_decoded_frames", "waiting_for_encoder_queue", "finishing_encoder",
                     "closing_outputs", "bookkeeping")
_PART_WORDS = {"model": "model", "waiting_for_decoded_frames": "waiting for decoded frames",
               "waiting_for_encoder_queue": "waiting for room in the encoder's queue",
               "finishing_encoder": "encoding the last frames", "closing_outputs": "closing the outputs",
               "bookkeeping": "bookkeeping"}
_PACE_WORDS = {"model": "model", "decoder": "decoder", "encoder": "overlay encoder"}


@dataclass
class VideoOptions:
    batch_size: int = 1
    every: int = 1
    max_frames: Optional[int] = None
    save_labels: Optional[str] = None  # None, "png" or "npz"
    alpha: float = 0.5
    random_weights: bool = False
    encoder: Optional[str] = None      # default: choose_encoder()
    queue_frames: Optional[int] = None  # per queue; default 2 batches (at least 4)


class _ClassTimeline:
    """Which classes each segmented frame holds, as intervals of decoded-frame indices."""

    def __init__(self, num_classes: int, every: int):
        self.num_classes = num_classes
        self.every = every
        self.frames = np.zeros(num_classes, np.int64)
        self.share = np.zeros(num_classes, np.float64)
        self.intervals: Dict[int, List[List[int]]] = {}

    def add(self, index: int, labels: np.ndarray) -> None:
        areas = np.bincount(labels.ravel(), minlength=self.num_classes)[:self.num_classes]
        present = np.flatnonzero(areas)
        self.frames[present] += 1
        self.share += areas / max(int(areas.sum()), 1)
        for c in present.tolist():
            spans = self.intervals.setdefault(c, [])
            if spans and spans[-1][1] >= index - self.every:  # the previous segmented frame had it too
                spans[-1][1] = index
            else:
                spans.append([index, index])

    def summary(self, class_names: List[str], segmented: int) -> List[dict]:
        from ..data.vocabulary import display_name

        order = sorted(self.intervals, key=lambda c: (-int(self.frames[c]), c))
        return [{"index": c, "name": class_names[c], "display_name": display_name(class_names[c]),
                 "frames": int(self.frames[c]), "first_frame": self.intervals[c][0][0],
                 "last_frame": self.intervals[c][-1][1],
                 "mean_share": round(float(self.share[c]) / max(segmented, 1), 6),
                 "intervals": self.intervals[c]} for c in order]


class _LabelSink:
    """Label maps of the segmented frames: PNG files in a folder, or one .npz archive written as it
    goes (one member per frame, the archive's index written on close: it loads after an interrupt)."""

    def __init__(self, kind: str, out_dir: Path, stem: str, num_classes: int, random_weights: bool):
        self.kind = kind
        self.dtype = np.uint8 if num_classes <= 256 else np.uint16
        self.random_weights = random_weights
        self.indices: List[int] = []
        if kind == "png":
            self.folder = out_dir / f"{stem}_labels"
            self.folder.mkdir(exist_ok=True)
            for old in self.folder.glob("frame_*.png"):  # a previous run's frames would mix with these
                old.unlink()
            remove_stale_temporaries(self.folder)  # a killed run's (the folder is this command's, and held)
            self.name = self.folder.name + "/"
        else:
            self.path = out_dir / f"{stem}_labels.npz"
            self.tmp = out_dir / f".{stem}_labels.npz.{os.getpid()}.partial.tmp"  # the owner's pid: see base.files
            self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
            self.name = self.path.name

    def add(self, index: int, labels: np.ndarray) -> None:
        labels = labels.astype(self.dtype)
        if self.kind == "png":
            from PIL import Image

            from ..visualize import png_info

            atomic_write(self.folder / f"frame_{index:06d}.png", lambda handle: Image.fromarray(labels).save(
                handle, format="PNG", pnginfo=png_info(self.random_weights)))
        else:
            with self.zip.open(f"frame_{index:06d}.npy", "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, labels, allow_pickle=False)
        self.indices.append(index)

    def close(self) -> None:
        if self.kind == "npz":
            with self.zip.open("frame_indices.npy", "w") as handle:
                np.lib.format.write_array(handle, np.asarray(self.indices, np.int64), allow_pickle=False)
            self.zip.close()
            os.replace(self.tmp, self.path)


def _stage_clock():
    totals = {name: 0.0 for name in (*STAGES, *MAIN_THREAD_PARTS)}

    @contextlib.contextmanager
    def clock(name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            totals[name] += time.perf_counter() - start
    return totals, clock


def _model_labels(model, frames: List[np.ndarray]):
    """Label maps (B, H, W) of same-sized (H, W, 3) uint8 frames, in one forward."""
    import torch

    batch = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).to(model.device)
    labels = model.predict_labels(batch)
    if isinstance(labels, (list, tuple)):  # a model that answers a batch with a list
        labels = torch.stack(list(labels))
    return labels.cpu().numpy()


def segment_video(model, source: Source, class_names: List[str], out_dir: Path, stem: str,
                  options: VideoOptions, *, info: Callable[[str], None] = lambda message: None,
                  progress: bool = True, deferred=contextlib.nullcontext,
                  on_progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Segment ``source`` (already opened; closed here); returns its summary record.

    ``deferred()`` is a context in which signals wait (the closing of the outputs runs in it);
    ``on_progress(record)`` is called after each batch with the record so far. Exceptions raised on
    this thread (an interrupt) propagate after the outputs are closed, with the record attached as
    ``error.video_record``.
    """
    from ..data.vocabulary import display_name

    encoder = options.encoder or choose_encoder()
    every, batch_size = options.every, options.batch_size
    out_rate = source.rate / every
    capacity = options.queue_frames or max(4, 2 * batch_size)
    shown = [display_name(name) for name in class_names]
    totals, clock = _stage_clock()
    timeline = _ClassTimeline(len(class_names), every)
    expected = source.expected_frames
    to_segment = None
    if expected is not None:
        to_segment = -(-expected // every)
        if options.max_frames is not None:
            to_segment = min(to_segment, options.max_frames)
    elif options.max_frames is not None:
        to_segment = options.max_frames
    overlay_name = f"{stem}_overlay.mp4"
    record: dict = {
        "input": source.label, "status": "running", "live": source.live,
        "outputs": {"overlay": overlay_name},
        "width": source.width, "height": source.height,
        "fps_in": round(float(source.rate), 6), "fps_out": round(float(out_rate), 6),
        "every": every, "max_frames": options.max_frames,
        "frames_in_header": expected, "duration_s": source.duration_s,
        "encoder": encoder,
    }
    info(f"{source.label}: {source.width}x{source.height} at {float(source.rate):.3g} fps"
         + (f", {expected} frames" if expected is not None else (" (live)" if source.live else ""))
         + f"; writing {overlay_name} at {float(out_rate):.3g} fps with {encoder_description(encoder)}"
         + ("" if encoder == "libx264" else " (libx264 is not in this PyAV's FFmpeg)"))

    reader = FrameReader(source, every=every, max_frames=options.max_frames, capacity=capacity)
    writer = labels_sink = None
    try:
        writer = VideoWriter(out_dir / overlay_name, source.width, source.height, out_rate, encoder)
        if options.save_labels:
            labels_sink = _LabelSink(options.save_labels, out_dir, stem, len(class_names), options.random_weights)
            record["outputs"]["labels"] = labels_sink.name
    except BaseException:
        if writer is not None:
            writer.close(keep=False)
        source.close()
        raise
    state = {"first_time": None, "written": 0, "segmented": 0}

    def handle(item) -> None:  # on the encoding thread
        frame, labels = item
        with clock("overlay"):
            picture = render_frame(frame.rgb, labels, shown, alpha=options.alpha, banner=options.random_weights)
        with clock("encode"):
            if state["first_time"] is None:
                state["first_time"] = frame.time
            pts = output_pts(frame, state["first_time"], out_rate, writer.frames)
            writer.write(picture, pts)
        if labels_sink is not None:
            with clock("labels"):
                labels_sink.add(frame.index, labels)
        timeline.add(frame.index, labels)
        state["written"] += 1

    encoder_thread = EncodeThread(handle, capacity=capacity)
    bar = _progress_bar(to_segment, progress)
    start = time.perf_counter()
    stopped: Optional[BaseException] = None

    def fill_record(status: str) -> None:
        stats = reader.stats
        wall = time.perf_counter() - start
        written = state["written"]
        record.update(
            status=status,
            frames_decoded=stats.decoded, frames_segmented=state["segmented"], frames_written=written,
            corrupt_frames=stats.corrupt, dropped_frames=stats.dropped,
            seconds=round(wall, 3), processing_fps=round(written / wall, 3) if wall > 0 else None,
            seconds_per_frame={name: round((stats.decode_s if name == "decode" else totals[name])
                                           / max(stats.taken if name == "decode" else written, 1), 6)
                               for name in STAGES if name != "labels" or labels_sink is not None},
            time_s=_time_breakdown(wall, totals, stats, encoder_thread.idle_s, labels_sink is not None),
            classes=timeline.summary(class_names, written),
        )
        if stats.corrupt_messages:
            record["corrupt_details"] = stats.corrupt_messages

    try:
        reader.start()
        encoder_thread.start()
        pending: List = []
        done = False
        while not done:
            with clock("waiting_for_decoded_frames"):
                frame = reader.get()
            if frame is None:
                done = True
            else:
                pending.append(frame)
            if pending and (done or len(pending) >= batch_size):
                with clock("model"):
                    labels = _model_labels(model, [f.rgb for f in pending])
                state["segmented"] += len(pending)
                with clock("waiting_for_encoder_queue"):
                    for item in zip(pending, labels):
                        encoder_thread.put(item)
                with clock("bookkeeping"):
                    if bar is not None:
                        bar.update(len(pending))
                    pending = []
                    if on_progress is not None:
                        fill_record("running")
                        on_progress(record)
    except BaseException as error:  # noqa: BLE001 - the outputs are closed first, then it goes on
        stopped = error
    finally:
        with deferred():
            reader.stop()
            with clock("finishing_encoder"):
                encoder_thread.finish()
            with clock("closing_outputs"):
                reader.join(timeout=5)
                if bar is not None:
                    bar.close()
                try:
                    writer.close()
                finally:
                    if labels_sink is not None:
                        labels_sink.close()
                    source.close()
    if encoder_thread.error is not None and stopped is None:
        stopped = encoder_thread.error
    status = "ok"
    if isinstance(stopped, KeyboardInterrupt):
        status = "interrupted"
    elif stopped is not None:
        status = "error"
    fill_record(status)
    if not writer.frames:
        record["outputs"].pop("overlay", None)
    if status == "ok" and not source.live and expected:
        missing = expected - reader.stats.decoded - reader.stats.corrupt
        if options.max_frames is None and missing > max(1, 0.02 * expected):
            record["status"] = "truncated"
            record["error"] = (f"the video ended after {reader.stats.decoded} decoded frames of the {expected} its "
                               f"header announces: the file looks truncated (the {state['written']} frames read "
                               "were segmented and written)")
    if stopped is not None:
        stopped.video_record = record  # type: ignore[attr-defined]
        raise stopped
    return record


def _time_breakdown(wall: float, totals: Dict[str, float], stats, encoder_idle_s: float, labels: bool) -> dict:
    """Where the wall time went. ``main`` is the model's thread, whose parts add up to ``wall`` (less a
    small ``unaccounted`` rest); ``decoder`` and ``encoder`` are the other two threads, whose work
    overlaps the model's, each with the time it waited for the model."""
    main = {name: round(totals[name], 4) for name in MAIN_THREAD_PARTS}
    main["unaccounted"] = round(max(0.0, wall - sum(totals[name] for name in MAIN_THREAD_PARTS)), 4)
    encoder = {name: round(totals[name], 4) for name in ("overlay", "encode", "labels") if name != "labels" or labels}
    encoder["waiting_for_model"] = round(encoder_idle_s, 4)
    return {"wall": round(wall, 4), "main": main,
            "decoder": {"decode": round(stats.decode_s, 4), "waiting_for_model": round(stats.waiting_s, 4)},
            "encoder": encoder, "pace_set_by": _pace_setter(totals)}


def _pace_setter(totals: Dict[str, float]) -> str:
    """The stage the model's thread spent most time on or waited for most: what limits the rate."""
    shares = {"model": totals["model"], "decoder": totals["waiting_for_decoded_frames"],
              "encoder": totals["waiting_for_encoder_queue"] + totals["finishing_encoder"]}
    return max(shares, key=shares.get)


def describe_timing(record: dict) -> str:
    """The run's time in words: the parts of the wall time, then the other threads' work per frame."""
    times = record.get("time_s")
    if not times:
        return ""
    wall, main = times["wall"], times["main"]
    parts = [f"{_PART_WORDS.get(name, name)} {_seconds(value)} ({100 * value / wall:.0f}%)"
             for name, value in main.items() if name in _PART_WORDS and (value >= 0.0005 or name == "model")]
    if main.get("unaccounted", 0) >= 0.0005:
        parts.append(f"other {_seconds(main['unaccounted'])}")
    per_frame = record.get("seconds_per_frame", {})
    work = ", ".join(f"{name} {1000 * per_frame[name]:.1f} ms" for name in ("decode", "overlay", "encode", "labels")
                     if name in per_frame)
    decoder_wait = times["decoder"]["waiting_for_model"]
    return (f"of the {_seconds(wall)}: " + ", ".join(parts) + f". Per frame on the other threads: {work} "
            f"(the decoder waited {_seconds(decoder_wait)} for the model). The "
            f"{_PACE_WORDS[times['pace_set_by']]} sets the pace.")


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s" if value < 600 else \
        f"{int(value // 60)} min {value % 60:.0f} s"


def _progress_bar(total: Optional[int], enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="frame", desc="sed-fast", dynamic_ncols=True)
