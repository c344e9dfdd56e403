"""Video throughput: decode + model + encode (the ``sed-fast segment`` video pipeline) vs the
model alone on the same frames.

    python benchmarks/video_throughput.py [--device cuda] [--frames 96 --width 640 --height 360]
                                          [--batch-size 8] [--classes 150] [--out FILE.jsonl]

A synthetic clip (moving coloured shapes, H.264) is written to a temporary folder. "model only"
runs ``predict_labels`` on its frames, already decoded and in memory, in the same batches (after
one warm-up batch, synchronised); "pipeline" runs the whole video path (decoding thread, batches,
model, overlay + encoding thread, the overlay .mp4 written) on the same file, after the same
warm-up. Random weights and random unit text embeddings (the text encoder is not timed: the video
path computes the embeddings once). One JSON row, printed and appended to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _write_clip(path: Path, frames: int, width: int, height: int, rate: int = 30) -> None:
    import av
    import numpy as np

    yy, xx = np.mgrid[:height, :width]
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264" if _has("libx264") else "mpeg4", rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 2] = (60 + 140 * yy / max(height - 1, 1)).astype(np.uint8)
        frame[..., 1] = (40 + 100 * xx / max(width - 1, 1)).astype(np.uint8)
        x = (8 + 7 * i) % max(width - width // 4, 1)
        frame[height // 8: height // 8 + height // 4, x:x + width // 4] = (230, 30, 30)
        cx = width - width // 6 - (5 * i) % max(width - width // 3, 1)
        frame[(yy - 2 * height // 3) ** 2 + (xx - cx) ** 2 < (height // 6) ** 2] = (30, 210, 60)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _has(codec: str) -> bool:
    import av
    try:
        av.codec.Codec(codec, "w")
        return True
    except Exception:  # noqa: BLE001
        return False


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--resolution", type=int, default=768, help="encoder input side (official: 768)")
    parser.add_argument("--impl", default="fast", choices=("fast", "reference"))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", default=None, help="append the row (JSON) to this file")
    args = parser.parse_args(argv)
    try:
        import av  # noqa: F401
    except ImportError:
        print("video_throughput: PyAV is not installed (pip install -e \".[video]\")", file=sys.stderr)
        return 2
    import numpy as np
    import torch
    import torch.nn.functional as F

    import sed_fast
    from sed_fast.video.io import open_source
    from sed_fast.video.run import VideoOptions, segment_video

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sed_fast.build_sed("b", impl=args.impl, device=device, dtype=dtype, clip_resolution=args.resolution)
    generator = torch.Generator().manual_seed(0)
    model.text_embeddings = F.normalize(torch.randn(args.classes, 80, 640, generator=generator), dim=-1).to(device)
    model.class_names = [f"class{i}" for i in range(args.classes)]

    with tempfile.TemporaryDirectory(prefix="sed_fast_video_bench_") as tmp:
        tmp = Path(tmp)
        clip = tmp / "clip.mp4"
        _write_clip(clip, args.frames, args.width, args.height)
        source = open_source(str(clip))
        frames = [f.to_ndarray(format="rgb24") for f in source.container.decode(source.stream)]
        source.close()

        def forward(batch):
            pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
            return model.predict_labels(pixels).cpu()

        forward(frames[:args.batch_size])  # warm-up: kernels compiled, memory allocated
        _sync(device)
        start = time.perf_counter()
        for first in range(0, len(frames), args.batch_size):
            forward(frames[first:first + args.batch_size])
        _sync(device)
        model_seconds = time.perf_counter() - start

        options = VideoOptions(batch_size=args.batch_size, random_weights=True)
        start = time.perf_counter()
        record = segment_video(model, open_source(str(clip)), model.class_names, tmp, "clip", options, progress=False)
        _sync(device)
        pipeline_seconds = time.perf_counter() - start
    count = len(frames)
    from sed_fast.bench import common

    row = {
        **common.environment(device), "kind": "video", "op": "video_throughput",
        "impl": args.impl, "dtype": str(dtype).replace("torch.", ""), "clip_resolution": args.resolution,
        "width": args.width, "height": args.height, "frames": count, "batch_size": args.batch_size,
        "classes": args.classes, "encoder": record["encoder"],
        "model_only_fps": round(count / model_seconds, 3),
        "pipeline_fps": round(record["frames_written"] / pipeline_seconds, 3),
        "pipeline_vs_model": round((record["frames_written"] / pipeline_seconds) / (count / model_seconds), 4),
        "pipeline_seconds_per_frame": record["seconds_per_frame"],
        "frames_written": record["frames_written"],
    }
    row["valid"] = record["frames_written"] == count
    line = json.dumps(row)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    print(f"video {args.width}x{args.height}, batch {args.batch_size}, {args.classes} classes on {device}: "
          f"model only {row['model_only_fps']:.2f} frames/s, decode+model+encode {row['pipeline_fps']:.2f} "
          f"frames/s ({100 * row['pipeline_vs_model']:.0f}%)", file=sys.stderr)
    return 0 if row["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
