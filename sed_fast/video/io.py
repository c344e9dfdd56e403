"""Reading and writing video with PyAV: sources (files, cameras, stream URLs), a decoding thread
and an encoding thread, each behind a bounded queue.

Errors that a person can act on are :class:`VideoError` with a one-line message (what, where,
what to do); :class:`SourceError` marks those found while opening, before any frame.
"""
from __future__ import annotations

import errno
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from ..inputs.image_files import InputFileError, check_regular_file

#: Encoders tried in order for the overlay video: H.264 (libx264) where PyAV's FFmpeg has it, else
#: MPEG-4 part 2, which every FFmpeg build has.
ENCODERS = ("libx264", "mpeg4")
_ENCODER_NAMES = {"libx264": "H.264 (libx264)", "mpeg4": "MPEG-4 part 2 (mpeg4)"}
#: Frame rate assumed for a live source that does not say its own.
DEFAULT_LIVE_RATE = Fraction(30)
_END = object()


class VideoError(Exception):
    """A problem with a video input or output, as a one-line message."""


class SourceError(VideoError):
    """A video source cannot be opened (nothing was read from it)."""


def import_av():
    """PyAV, or a :class:`SourceError` saying how to install it."""
    try:
        import av
    except ImportError as error:
        raise SourceError(f"video input needs PyAV, which is not installed ({error}): "
                          "pip install -e \".[video]\" (or pip install av)") from None
    return av


# -- sources -------------------------------------------------------------------------------------
@dataclass
class Source:
    """An opened video input."""

    label: str              # what it is, for messages: a path, "camera 0 (/dev/video0)", a URL
    container: object
    stream: object
    live: bool              # a camera or a network stream: no end, frames may be dropped
    rate: Fraction          # frames per second (the stream's average rate, or a guess)
    width: int
    height: int
    expected_frames: Optional[int]  # from the header (files), None when unknown
    duration_s: Optional[float]

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - closing a broken container must not hide the real error
            pass


AVERROR_INVALIDDATA = 1094995529  # FFmpeg's code for input with no valid media in it

#: Why a source cannot be opened, by kind: (error codes, message) rows, first match wins, then the
#: kind's last word; in the messages {label} is the source and {text} the system's words.
_OPEN_ERRORS = {
    "camera": (
        ((errno.ENOENT,), "{label} does not exist: no such V4L2 device (the cameras are /dev/video*; check it "
                          "is plugged in, or choose another --camera N)"),
        ((errno.EBUSY,), "{label} is busy: another program is using it (close it and retry)"),
        ((errno.EACCES, errno.EPERM), "{label}: permission denied (add your user to the 'video' group)"),
        ((errno.ENODEV, errno.ENXIO, errno.EINVAL, errno.ENOTTY),
         "{label} is not a usable camera ({text}): it may be a metadata node; try another --camera N"),
        ((), "cannot open {label}: {text}"),
    ),
    "url": (
        ((), "cannot open the stream {label}: {text} (check the address, the network and that the stream "
             "is live)"),
    ),
    "file": (
        ((errno.ENOENT,), "video file not found: {label}"),
        ((errno.EACCES, errno.EPERM), "cannot read the video {label}: permission denied"),
        ((AVERROR_INVALIDDATA,), "cannot read the video {label}: FFmpeg finds no valid media in it (the file is "
                                 "not a video, or it is truncated: an MP4 cut short loses its index, which is "
                                 "written at its end)"),
        ((), "cannot read the video {label}: {text}"),
    ),
}


def _open_error(label: str, error: BaseException, kind: str) -> SourceError:
    """The message for a source that cannot be opened."""
    code = getattr(error, "errno", None)
    if type(error).__name__ == "InvalidDataError":  # PyAV's class for it, whatever errno it carries
        code = AVERROR_INVALIDDATA
    text = str(getattr(error, "strerror", None) or error).strip()
    rows = _OPEN_ERRORS[kind]
    message = next((message for codes, message in rows if code in codes), rows[-1][1])
    return SourceError(message.format(label=label, text=text))


def open_source(spec: str, *, camera: bool = False, timeout_s: float = 10.0) -> Source:
    """Open a video file, a stream URL or (``camera=True``, ``spec`` = the index) a V4L2 camera."""
    av = import_av()
    from . import is_stream_url

    if camera:
        device = f"/dev/video{spec}"
        label, kind, fmt = f"camera {spec} ({device})", "camera", "v4l2"
        formats = {name for entry in getattr(av, "formats_available", {"v4l2"}) for name in entry.split(",")}
        if "v4l2" not in formats:
            raise SourceError(f"{label}: this PyAV's FFmpeg has no V4L2 input (a Linux build is needed)")
        if not os.path.exists(device):  # FFmpeg says the same, but only after probing
            raise _open_error(label, FileNotFoundError(errno.ENOENT, "No such file or directory", device), kind)
        target = device
    elif is_stream_url(spec):
        label, kind, fmt, target = spec, "url", None, spec
    else:
        path = Path(os.path.expanduser(spec))
        label, kind, fmt, target = str(spec), "file", None, str(path)
        if not path.exists() and not os.path.lexists(path):  # a link loop or to nothing: said below
            raise SourceError(f"video file not found: {spec}")
        if path.is_dir():
            raise SourceError(f"{spec} is a folder, not a video file")
        try:  # a FIFO or device would block av.open: refused up front, naming it
            check_regular_file(path, "video")
        except (InputFileError, OSError) as error:
            raise SourceError(str(error)) from None
    try:
        container = av.open(target, "r", format=fmt,
                            timeout=None if kind == "file" else (timeout_s, timeout_s))
    except (OSError, ValueError, av.error.FFmpegError) as error:  # av's errors are OSError/ValueError too
        raise _open_error(label, error, kind) from None
    if not container.streams.video:
        container.close()
        raise SourceError(f"{label} has no video stream" + (" (an audio file?)" if container.streams.audio else ""))
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads in the decoder
    # A camera is live; so is a stream without a known length (RTSP, UDP, a live HLS); a file served
    # over HTTP is read whole, at the decoder's pace.
    live = kind == "camera" or (kind == "url" and not (stream.frames or container.duration))
    rate = stream.average_rate or stream.guessed_rate or getattr(stream, "base_rate", None)
    rate = Fraction(rate) if rate else (DEFAULT_LIVE_RATE if live else None)
    if rate is None or rate <= 0:
        rate = DEFAULT_LIVE_RATE
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    duration_s = None
    if stream.duration is not None and stream.time_base is not None:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration:
        duration_s = container.duration / 1_000_000  # AV_TIME_BASE
    expected = int(stream.frames) if stream.frames else None
    if expected is None and duration_s and not live:
        expected = int(round(duration_s * float(rate)))
    return Source(label=label, container=container, stream=stream, live=live, rate=rate, width=width,
                  height=height, expected_frames=expected, duration_s=duration_s)


# -- decoding thread -----------------------------------------------------------------------------
@dataclass
class DecodedFrame:
    index: int          # position among the decoded frames (0-based)
    time: Optional[float]  # presentation time in seconds, when the container says it
    rgb: np.ndarray     # (H, W, 3) uint8


@dataclass
class ReaderStats:
    decoded: int = 0
    taken: int = 0
    corrupt: int = 0
    dropped: int = 0
    decode_s: float = 0.0   # demuxing, decoding and converting to RGB: the decoder's own work
    waiting_s: float = 0.0  # blocked on a full queue: the model is behind
    corrupt_messages: List[str] = field(default_factory=list)


class FrameReader(threading.Thread):
    """Decodes ``source`` into a bounded queue of :class:`DecodedFrame` (every ``every``-th frame, at
    most ``max_frames``), then puts the end marker. A packet the decoder refuses is skipped and
    counted (``stats.corrupt``). For live sources a full queue drops the oldest frame (a camera does
    not wait), for files the thread waits. ``error`` holds what stopped it, if anything."""

    def __init__(self, source: Source, *, every: int = 1, max_frames: Optional[int] = None, capacity: int = 8):
        super().__init__(name="sed-fast-video-decode", daemon=True)
        self.source = source
        self.every = every
        self.max_frames = max_frames
        self.frames: "queue.Queue" = queue.Queue(maxsize=max(1, capacity))
        self.stop_event = threading.Event()
        self.stats = ReaderStats()
        self.error: Optional[BaseException] = None
        self.size = (source.height, source.width)

    def stop(self) -> None:
        self.stop_event.set()

    def _put(self, item) -> bool:
        start = time.perf_counter()
        try:
            return self._put_waiting(item)
        finally:
            self.stats.waiting_s += time.perf_counter() - start

    def _put_waiting(self, item) -> bool:
        while not self.stop_event.is_set():
            try:
                self.frames.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self.source.live and item is not _END:
                    try:
                        self.frames.get_nowait()
                        self.stats.dropped += 1
                    except queue.Empty:
                        pass
        return False

    def run(self) -> None:
        av = import_av()
        stream, stats = self.source.stream, self.stats
        try:
            packets = self.source.container.demux(stream)
            while not self.stop_event.is_set():
                start = time.perf_counter()
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                try:
                    frames = packet.decode()
                except av.error.EOFError:
                    break
                except (av.error.InvalidDataError, av.error.UndefinedError, av.error.BugError) as error:
                    stats.corrupt += 1
                    if len(stats.corrupt_messages) < 5:
                        stats.corrupt_messages.append(f"after frame {stats.decoded}: {error}")
                    stats.decode_s += time.perf_counter() - start
                    continue
                for frame in frames:
                    index = stats.decoded
                    stats.decoded += 1
                    if index % self.every:
                        continue
                    if self.max_frames is not None and stats.taken >= self.max_frames:
                        self.stop_event.set()
                        break
                    height, width = self.size
                    if not height or not width:
                        self.size = height, width = frame.height, frame.width
                    rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
                    stats.decode_s += time.perf_counter() - start
                    stats.taken += 1
                    if not self._put(DecodedFrame(index, frame.time, rgb)):  # its wait counts as waiting_s
                        break
                    start = time.perf_counter()  # the packet's next frame is decoding work again
                else:
                    stats.decode_s += time.perf_counter() - start
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            self.error = error
        finally:
            # The end marker must arrive even when the queue is full and nobody stops us.
            while True:
                try:
                    self.frames.put(_END, timeout=0.1)
                    break
                except queue.Full:
                    if self.stop_event.is_set() or self.source.live:  # a live source waits for nobody
                        try:
                            self.frames.get_nowait()
                            if not self.stop_event.is_set():
                                self.stats.dropped += 1
                        except queue.Empty:
                            pass

    def get(self, timeout: float = 0.2):
        """The next :class:`DecodedFrame`, or None at the end (re-raises the thread's error).
        Waits in short steps, so a signal reaches the main thread."""
        while True:
            try:
                item = self.frames.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is _END:
                self.frames.put(_END)  # later calls see the end too
                if self.error is not None:
                    raise self.error
                return None
            return item


# -- encoding thread -----------------------------------------------------------------------------
def choose_encoder(preferred=None) -> str:
    """The first of ``preferred`` (default :data:`ENCODERS`) this PyAV's FFmpeg can encode with."""
    av = import_av()
    preferred = ENCODERS if preferred is None else preferred
    for name in preferred:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - unknown to this FFmpeg build
            continue
    raise VideoError(f"none of the video encoders {', '.join(preferred)} is in this PyAV's FFmpeg")


def encoder_description(name: str) -> str:
    return _ENCODER_NAMES.get(name, name)


class VideoWriter:
    """An MP4 of RGB frames at ``rate``, written to a temporary file in the target's folder and
    renamed into place by :meth:`close`, which also flushes the encoder and writes the container's
    index, so that whatever was written plays (also after an interrupt)."""

    def __init__(self, path: Path, width: int, height: int, rate: Fraction, encoder: Optional[str] = None):
        av = import_av()
        self.path = Path(path)
        self.encoder = encoder or choose_encoder()
        self.rate = Fraction(rate).limit_denominator(1_000_000)
        self.tmp = self.path.with_name(f".{self.path.name}.partial.mp4")
        self.container = av.open(str(self.tmp), "w", format="mp4")
        try:
            self.stream = self.container.add_stream(self.encoder, rate=self.rate)
            self.stream.width, self.stream.height = width, height
            # 4:2:0 needs even sides: an odd-sized video keeps its size in 4:4:4 (H.264 High 4:4:4)
            even = width % 2 == 0 and height % 2 == 0
            if even or self.encoder != "libx264":
                self.stream.pix_fmt = "yuv420p"
            else:
                self.stream.pix_fmt = "yuv444p"
            if self.encoder == "libx264":
                self.stream.options = {"crf": "20", "preset": "veryfast"}
            else:
                self.stream.bit_rate = max(400_000, int(width * height * float(self.rate) * 0.25))
            self.stream.time_base = 1 / self.rate
            self.stream.codec_context.time_base = 1 / self.rate
        except BaseException:
            self.container.close()
            self._remove_tmp()
            raise
        self.frames = 0
        self._last_pts = -1
        self.closed = False

    def write(self, rgb: np.ndarray, pts: Optional[int] = None) -> None:
        av = import_av()
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        pts = self._last_pts + 1 if pts is None or pts <= self._last_pts else pts
        frame.pts = pts
        frame.time_base = self.stream.codec_context.time_base
        self._last_pts = pts
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self, keep: bool = True) -> Optional[Path]:
        """Flush, finalise and rename into place (``keep``) or remove; returns the final path."""
        if self.closed:
            return self.path if keep else None
        self.closed = True
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
        finally:
            self.container.close()
        if keep and self.frames:
            os.replace(self.tmp, self.path)
            return self.path
        self._remove_tmp()
        return None

    def _remove_tmp(self) -> None:
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class EncodeThread(threading.Thread):
    """Runs ``handle(item)`` for each queued item in order (rendering + encoding + label files),
    on its own thread behind a bounded queue; :meth:`finish` waits for the queued ones."""

    def __init__(self, handle: Callable, capacity: int = 8):
        super().__init__(name="sed-fast-video-encode", daemon=True)
        self.handle = handle
        self.items: "queue.Queue" = queue.Queue(maxsize=max(1, capacity))
        self.error: Optional[BaseException] = None
        self.idle_s = 0.0  # waiting for an item: the model (or the decoder before it) is behind

    def run(self) -> None:
        while True:
            start = time.perf_counter()
            item = self.items.get()
            self.idle_s += time.perf_counter() - start
            if item is _END:
                return
            if self.error is not None:
                continue  # drain: the main thread stops at its next put
            try:
                self.handle(item)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = error

    def put(self, item) -> None:
        """Queue an item (waiting in short steps while the queue is full); raises the thread's error."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.items.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.is_alive():
                    raise VideoError("the encoding thread stopped") from self.error

    def finish(self) -> None:
        """Let the queued items be handled, then stop the thread."""
        while self.is_alive():
            try:
                self.items.put(_END, timeout=0.2)
                break
            except queue.Full:
                continue
        while self.is_alive():
            self.join(timeout=0.2)


def output_pts(frame: DecodedFrame, first_time: Optional[float], out_rate: Fraction, fallback: int) -> int:
    """The overlay frame's timestamp in 1/out_rate units: from the source time (gaps of skipped or
    corrupt frames kept), else the running count."""
    if frame.time is None or first_time is None or not math.isfinite(frame.time):
        return fallback
    return int(round((frame.time - first_time) * float(out_rate)))
