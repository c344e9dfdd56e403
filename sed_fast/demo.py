"""``sed-fast demo``: the whole pipeline on a built-in sample, with nothing to download.

It draws a sample photo-like scene (sky, sun, hills, grass, a road, a house, a tree), writes it as
``sample.png`` into the output folder and segments it with ``sed-fast segment`` using a built-in
vocabulary and random weights (seeded, so two runs give the same outputs and reuse the cached text
embeddings). The segmentation means nothing without the official checkpoint: the demo shows that
everything runs and what the outputs look like.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

SAMPLE_SIZE = (480, 640)  # (height, width) of the drawn scene
DEFAULT_OUT = "sed_fast_demo"
DEFAULT_VOCAB = "voc20"


def draw_sample(height: int = SAMPLE_SIZE[0], width: int = SAMPLE_SIZE[1]):
    """A deterministic RGB scene as a PIL image (no randomness, no files)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.55)
    for y in range(horizon):  # sky: light blue at the horizon, deeper above
        t = y / max(1, horizon - 1)
        draw.line([(0, y), (width, y)], fill=(int(70 + 110 * t), int(130 + 90 * t), int(220 + 30 * t)))
    draw.ellipse([int(width * 0.78), int(height * 0.06), int(width * 0.9), int(height * 0.06) + int(width * 0.12)],
                 fill=(255, 226, 120))
    draw.polygon([(0, horizon), (int(width * 0.3), int(height * 0.38)), (int(width * 0.62), horizon)],
                 fill=(96, 120, 96))
    draw.polygon([(int(width * 0.4), horizon), (int(width * 0.75), int(height * 0.42)), (width, horizon)],
                 fill=(80, 104, 88))
    draw.rectangle([0, horizon, width, height], fill=(76, 150, 60))
    draw.polygon([(int(width * 0.42), height), (int(width * 0.49), horizon), (int(width * 0.53), horizon),
                  (int(width * 0.66), height)], fill=(110, 110, 115))
    house = (int(width * 0.08), int(height * 0.45), int(width * 0.3), int(height * 0.72))
    draw.rectangle(house, fill=(190, 150, 110))
    draw.polygon([(house[0] - 10, house[1]), ((house[0] + house[2]) // 2, house[1] - int(height * 0.12)),
                  (house[2] + 10, house[1])], fill=(150, 60, 50))
    draw.rectangle([house[0] + 20, house[1] + 30, house[0] + 50, house[1] + 60], fill=(200, 225, 240))
    draw.rectangle([house[2] - 50, house[3] - 60, house[2] - 25, house[3]], fill=(90, 60, 40))
    trunk_x = int(width * 0.82)
    draw.rectangle([trunk_x - 8, int(height * 0.5), trunk_x + 8, int(height * 0.75)], fill=(100, 70, 40))
    draw.ellipse([trunk_x - 55, int(height * 0.3), trunk_x + 55, int(height * 0.56)], fill=(40, 110, 45))
    return image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sed-fast demo",
        description="Segment a built-in sample scene with a built-in vocabulary and random weights (no "
                    "download needed): writes sample.png, its label map, overlay and summary.json.")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: ./{DEFAULT_OUT})")
    parser.add_argument("--vocab", default=DEFAULT_VOCAB, metavar="NAME|FILE|LIST",
                        help=f"vocabulary (default: {DEFAULT_VOCAB}, the 20 PASCAL VOC classes)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--impl", choices=("fast", "reference"), default=None, help="implementation (default: fast)")
    parser.add_argument("--resolution", type=int, default=768, metavar="PX",
                        help="encoder input side (official: 768)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or info lines")
    parser.add_argument("--ui", action="store_true",
                        help="serve the browser demo instead (= sed-fast serve; the other options go to it)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--ui" in argv:
        from .serve.cli import main as serve
        return serve([a for a in argv if a != "--ui"])
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        sample = out / "sample.png"
        draw_sample().save(sample)
    except OSError as error:
        print(f"sed-fast demo: error: cannot write the sample image into {out}: {error}", file=sys.stderr)
        return cli.EXIT_USAGE
    segment = ["segment", str(sample), "--vocab", args.vocab, "--random-weights", "--out", str(out),
               "--resolution", str(args.resolution)]
    for flag, value in (("--device", args.device), ("--impl", args.impl)):
        if value is not None:
            segment += [flag, value]
    if args.quiet:
        segment.append("--quiet")
    code = cli.main(segment)
    if code == cli.EXIT_OK:
        print(f"sed-fast demo: done. The model had RANDOM WEIGHTS, so the segmentation is meaningless; "
              f"it shows the pipeline runs. Outputs in {out.resolve()}: sample.png (input), "
              f"sample_labels.png, sample_overlay.png, summary.json. For real results pass the official "
              f"checkpoint: sed-fast segment IMAGE --vocab {args.vocab} --checkpoint model_final.pth --out DIR")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
