"""Peak host memory of labels for a large photo: ``model(image).argmax`` vs ``model.predict_labels``.

    python benchmarks/label_memory.py [--height 3000 --width 4000 --classes 150] [--out FILE.json]

Each way runs in a fresh subprocess (random weights, random unit text embeddings, CPU, the encoder
at 64 px: the decoder's output and what follows it do not depend on the encoder's size) and reports
its peak resident memory (``ru_maxrss``) beside the process's resident memory before the call.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, warnings
import torch, torch.nn.functional as F
import sed_fast
way, height, width, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
warnings.simplefilter("ignore")
model = sed_fast.build_sed("b", impl="reference", device="cpu", clip_resolution=64)
model.text_embeddings = F.normalize(torch.randn(classes, 80, 640), dim=-1)
model.class_names = [f"class{i}" for i in range(classes)]
image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
labels = model(image)[0].argmax(0) if way == "scores" else model.predict_labels(image)[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"way": way, "peak_rss_bytes": peak, "rss_before_bytes": before,
                  "labels_shape": list(labels.shape)}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for way in ("predict_labels", "scores"):
        run = subprocess.run([sys.executable, "-c", CHILD, way, str(args.height), str(args.width), str(args.classes)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{way}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(run.stdout.strip().splitlines()[-1])
        row.update(height=args.height, width=args.width, classes=args.classes, device="cpu")
        rows.append(row)
        print(f"{way:>15}: peak {row['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"(before the call {row['rss_before_bytes'] / 2**30:.2f} GiB)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
