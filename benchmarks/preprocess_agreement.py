"""How much the official test-time resize matters: ``preprocess="official"`` vs ``"none"`` on raw images.

    python benchmarks/preprocess_agreement.py [--out FILE.json]

Random weights (seed 0) and random unit text embeddings for 150 classes, the encoder at the
official 768 px, CPU. For raw uint8 images of several sizes it reports the max |diff| of the scores
and the share of pixels whose argmax label agrees between the two settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
import torch.nn.functional as F

SIZES = [(480, 640), (400, 500), (1000, 1400)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--classes", type=int, default=150)
    args = parser.parse_args(argv)
    import sed_fast

    warnings.simplefilter("ignore")
    model = sed_fast.build_sed("b", impl="reference", device="cpu")
    generator = torch.Generator().manual_seed(0)
    model.text_embeddings = F.normalize(torch.randn(args.classes, 80, 640, generator=generator), dim=-1)
    model.class_names = [f"class{i}" for i in range(args.classes)]
    rows = []
    for height, width in SIZES:
        # a smooth random image (noise upsampled): closer to a photo than per-pixel noise
        base = torch.rand(1, 3, height // 16, width // 16, generator=generator) * 255
        image = F.interpolate(base, size=(height, width), mode="bicubic", align_corners=False)
        image = image.clamp(0, 255).round().to(torch.uint8)[0]
        model.preprocess = "official"
        official = model(image)[0]
        model.preprocess = "none"
        direct = model(image)[0]
        row = {"height": height, "width": width, "classes": args.classes,
               "max_abs_diff_scores": float((official - direct).abs().max()),
               "label_agreement": float((official.argmax(0) == direct.argmax(0)).double().mean())}
        rows.append(row)
        print(f"{height}x{width}: max |diff| {row['max_abs_diff_scores']:.3g}, labels agree on "
              f"{100 * row['label_agreement']:.1f}% of pixels")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
