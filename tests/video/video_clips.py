"""Clips written by the tests with PyAV (moving coloured shapes on a gradient), tiny and short."""
from pathlib import Path

import numpy as np

import av  # the [test] extra installs PyAV

WIDTH, HEIGHT, RATE = 96, 64, 12


def shapes_frame(i: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Frame ``i``: a vertical gradient, a red square moving right, a green disc moving left."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 2] = np.linspace(60, 200, height, dtype=np.uint8)[:, None]
    frame[..., 1] = 40
    x = (4 + 6 * i) % (width - 20)
    frame[8:28, x:x + 20] = (230, 30, 30)
    yy, xx = np.mgrid[:height, :width]
    cx = width - 16 - (5 * i) % (width - 32)
    frame[(yy - 44) ** 2 + (xx - cx) ** 2 < 100] = (30, 210, 60)
    return frame


def write_clip(path: Path, frames: int = 7, *, codec: str = "libx264", fmt=None, rate: int = RATE,
               pix_fmt: str = "yuv420p", width: int = WIDTH, height: int = HEIGHT) -> Path:
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(shapes_frame(i, width, height), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def decode(path: Path):
    """(frames as (H, W, 3) uint8 arrays, average rate, width, height) of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.width, stream.codec_context.height
