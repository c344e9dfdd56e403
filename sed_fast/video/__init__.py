"""Video files, cameras and streams through ``sed-fast segment`` (PyAV: ``pip install -e ".[video]"``).

Frames are decoded in a background thread, batched, segmented with the text embeddings computed
once, and rendered + encoded in another thread; the queues between them are bounded, so memory
does not grow with the video's length. Per video the output folder gets ``<stem>_overlay.mp4``
(same size and frame rate / ``--every``, H.264 when PyAV's FFmpeg has libx264, else MPEG-4 part 2),
optionally the label maps (``--save-labels png|npz``), and ``summary.json``.

This module imports nothing heavy: the command line asks it which inputs are videos.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import List, Sequence, Tuple

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".flv", ".wmv", ".ogv", ".3gp")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")

__all__ = ["VIDEO_EXTENSIONS", "is_animated_gif", "is_stream_url", "is_video_file", "split_inputs",
           "written_by_an_earlier_run"]


def is_stream_url(text: str) -> bool:
    """``rtsp://``, ``http(s)://``, ``udp://``... (anything FFmpeg opens by protocol)."""
    return bool(_URL.match(text))


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def is_animated_gif(path: Path) -> bool:
    """A ``.gif`` regular file of more than one frame (FFmpeg decodes those as videos); a still
    GIF, a file Pillow cannot open or anything that is not a regular file is not (the image
    path reports it)."""
    if path.suffix.lower() != ".gif" or not path.is_file():
        return False
    import warnings

    try:
        from PIL import Image

        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("ignore")  # a decompression-bomb warning is the image path's to give
            return image.format == "GIF" and int(getattr(image, "n_frames", 1) or 1) > 1
    except Exception:  # noqa: BLE001 - unreadable: the image path says why
        return False


def split_inputs(specs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(video inputs, other inputs) of the positional arguments of ``segment``: stream URLs, video
    files, animated GIFs named as files, and the video files of folders and glob patterns are
    videos; the rest is left to the image path (which reports what is missing). Folders and
    patterns list no GIF at all (not one of the image path's extensions either)."""
    videos: List[str] = []
    others: List[str] = []
    for spec in specs:
        if is_stream_url(spec):
            videos.append(spec)
            continue
        expanded = os.path.expanduser(spec)
        path = Path(expanded)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.is_file() and is_video_file(p))
            videos.extend(found)
            if not found:
                others.append(spec)
        elif path.exists():
            (videos if is_video_file(path) or is_animated_gif(path) else others).append(spec)
        elif _GLOB_CHARS.search(expanded):
            found = [m for m in sorted(glob.glob(expanded, recursive=True)) if is_video_file(Path(m))]
            videos.extend(found)
            if not found:
                others.append(spec)
        elif is_video_file(path):
            videos.append(spec)  # a missing video file: reported by the video path
        else:
            others.append(spec)
    return videos, others


def written_by_an_earlier_run(out_dir: Path):
    """``legacy_owned`` of ``segment``'s claim (:func:`sed_fast.toolkit.outputs.claim_outputs`) in a
    folder that a segment run of a sed-fast without claim files wrote: its ``summary.json`` (which
    has a ``run_id``) and the outputs that summary lists per image or video."""
    import json

    listed = None
    try:
        summary = json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and "run_id" in summary:
        listed = {"summary.json"}
        for record in (summary.get("images") or []) + (summary.get("videos") or []):
            outputs = record.get("outputs") if isinstance(record, dict) else None
            if isinstance(outputs, dict):
                listed.update(name.rstrip("/") for name in outputs.values() if isinstance(name, str))
    return lambda name: listed is not None and name in listed
