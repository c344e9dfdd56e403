"""``sed-fast demo``: the whole pipeline on a built-in sample, with nothing to download.

It draws a sample photo-like scene (:mod:`sed_fast.data.sample_scene`: sky, sun, mountains, grass, a
lake, a road, a house, a tree), writes it as ``sample.png`` into the output folder and segments it
with ``sed-fast segment`` using the names of those things and random weights (seeded, so two runs
give the same outputs and reuse the cached text embeddings). The segmentation means nothing
without the official checkpoint: the demo shows that everything runs and what the outputs look like.

The demo is a front: :func:`command_line` rewrites its command line into the ``segment`` (or, with
``--ui``, ``serve``) command line it stands for, and ``sed_fast.cli`` runs that command, so the
demo imports no command.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .data.sample_scene import SAMPLE_SCENE_VOCABULARY, SAMPLE_SIZE  # noqa: F401 - demo.SAMPLE_SIZE for callers
from .data.sample_scene import draw_sample_scene as draw_sample
from .toolkit.errors import UsageError

DEFAULT_OUT = "sed_fast_demo"
DEFAULT_VOCAB = SAMPLE_SCENE_VOCABULARY  # what the scene shows (sky, grass, mountain, water...)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sed-fast demo",
        description="Segment a built-in sample scene with a built-in vocabulary and random weights (no "
                    "download needed): writes sample.png, its label map, overlay and summary.json.")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--vocab", default=DEFAULT_VOCAB, metavar="NAME|FILE|LIST",
                        help=f"vocabulary (default: what the scene shows: {DEFAULT_VOCAB})")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--impl", choices=("fast", "reference"), default=None, help="implementation (default: fast)")
    parser.add_argument("--resolution", type=int, default=768, metavar="PX",
                        help="encoder input side (official: 768)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or info lines")
    parser.add_argument("--ui", action="store_true",
                        help="serve the browser demo instead (= sed-fast serve; the other options go to it)")
    return parser


@dataclass(frozen=True)
class DemoRun:
    """The command line the demo stands for, and what it says once that command has succeeded."""

    command: str  # the sed-fast command to run: "segment", or "serve" with --ui
    argv: List[str]
    done_message: Optional[str] = None


def command_line(argv: Optional[Sequence[str]] = None) -> DemoRun:
    """The demo as the command it is a front for (``sed_fast.cli`` runs it): ``segment`` on the
    sample scene, written here into ``--out``, with random weights; with ``--ui``, ``serve`` with the
    other options (random weights unless a checkpoint is given). A sample that cannot be written is
    a :class:`UsageError`; argparse exits as usual for ``--help`` and bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ui" in argv:
        rest = [a for a in argv if a != "--ui"]
        asked = any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in rest)
        weights = [] if asked else ["--random-weights"]  # the demo runs on random weights unless given some
        return DemoRun("serve", rest + weights)
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        sample = out / "sample.png"
        draw_sample().save(sample)
    except OSError as error:
        raise UsageError(f"cannot write the sample image into {out}: {error}") from error
    segment = [str(sample), "--vocab", args.vocab, "--random-weights", "--out", str(out),
               "--resolution", str(args.resolution)]
    for flag, value in (("--device", args.device), ("--impl", args.impl)):
        if value is not None:
            segment += [flag, value]
    if args.quiet:
        segment.append("--quiet")
    done = (f"sed-fast demo: done. The model had RANDOM WEIGHTS, so the segmentation is meaningless; "
            f"it shows the pipeline runs. Outputs in {out.resolve()}: sample.png (input), "
            f"sample_labels.png, sample_overlay.png, summary.json. For real results pass the official "
            f"checkpoint (linked from github.com/xb534/SED): sed-fast segment {sample} --vocab "
            f"{args.vocab} --checkpoint model_final.pth --out DIR")
    return DemoRun("segment", segment, done)
