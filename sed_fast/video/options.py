"""The video options of ``sed-fast segment`` (added to its parser; argparse only, no PyAV)."""
from __future__ import annotations

import argparse

from . import split_inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "video", "Video files (mp4, mov, avi, mkv, webm... anything FFmpeg reads), stream URLs (rtsp://, "
                 "http://...) and cameras: per video, <stem>_overlay.mp4 (same size and frame rate, the legend "
                 "drawn in its top-right corner; H.264 where PyAV's FFmpeg has libx264, else MPEG-4) and "
                 "summary.json. Needs PyAV: pip install -e \".[video]\".")
    group.add_argument("--camera", type=int, default=None, metavar="N",
                       help="segment the V4L2 camera /dev/videoN live, until Ctrl-C or --max-frames")
    group.add_argument("--every", type=int, default=1, metavar="N",
                       help="segment every Nth decoded frame (default 1); the overlay video's frame rate is the "
                            "input's divided by N")
    group.add_argument("--max-frames", type=int, default=None, metavar="N",
                       help="stop after N segmented frames per video")
    group.add_argument("--save-labels", choices=("png", "npz"), default=None,
                       help="also save each segmented frame's label map: png = one PNG per frame in "
                            "<stem>_labels/frame_NNNNNN.png (8-bit up to 256 classes, else 16-bit; NNNNNN = the "
                            "decoded frame's index); npz = one compressed NumPy archive <stem>_labels.npz with an "
                            "array per frame (frame_NNNNNN) and frame_indices. Images always get <stem>_labels.png")


def wants_video(args: argparse.Namespace) -> bool:
    """Whether this ``segment`` run is a video run (a camera, a URL or video files)."""
    if getattr(args, "camera", None) is not None:
        return True
    videos, _ = split_inputs(args.images or [])
    return bool(videos)


def image_run_problem(args: argparse.Namespace) -> str:
    """Why the video-only options of an image run are wrong, or ""."""
    given = [flag for flag, value, default in (("--every", args.every, 1), ("--max-frames", args.max_frames, None),
                                               ("--save-labels", args.save_labels, None)) if value != default]
    if given:
        return f"{', '.join(given)} are for videos (images always get <stem>_labels.png)"
    return ""
