"""``sed-fast demo``: the whole pipeline on a built-in sample, with nothing to download.

It draws a sample photo-like scene (:mod:`sed_fast.data.sample_scene`: sky, sun, mountains, grass, a
lake, a road, a house, a tree), writes it as ``sample.png`` into the output folder and segments it
with ``sed-fast segment`` using the names of those things and random weights (seeded, so two runs
give the same outputs and reuse the cached text embeddings). The segmentation means nothing
without the official checkpoint: the demo shows that everything runs and what the outputs look like.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .data.sample_scene import SAMPLE_SCENE_VOCABULARY, SAMPLE_SIZE  # noqa: F401 - demo.SAMPLE_SIZE for callers
from .data.sample_scene import draw_sample_scene as draw_sample
from .toolkit.errors import EXIT_OK, EXIT_USAGE

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ui" in argv:
        from .serve.cli import main as serve
        rest = [a for a in argv if a != "--ui"]
        asked = any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in rest)
        weights = [] if asked else ["--random-weights"]  # the demo runs on random weights unless given some
        return serve(rest + weights)
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        sample = out / "sample.png"
        draw_sample().save(sample)
    except OSError as error:
        print(f"sed-fast demo: error: cannot write the sample image into {out}: {error}", file=sys.stderr)
        return EXIT_USAGE
    from .segment.cli import main as segment_main

    segment = [str(sample), "--vocab", args.vocab, "--random-weights", "--out", str(out),
               "--resolution", str(args.resolution)]
    for flag, value in (("--device", args.device), ("--impl", args.impl)):
        if value is not None:
            segment += [flag, value]
    if args.quiet:
        segment.append("--quiet")
    code = segment_main(segment)
    if code == EXIT_OK:
        print(f"sed-fast demo: done. The model had RANDOM WEIGHTS, so the segmentation is meaningless; "
              f"it shows the pipeline runs. Outputs in {out.resolve()}: sample.png (input), "
              f"sample_labels.png, sample_overlay.png, summary.json. For real results pass the official "
              f"checkpoint (linked from github.com/xb534/SED): sed-fast segment {sample} --vocab "
              f"{args.vocab} --checkpoint model_final.pth --out DIR")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
