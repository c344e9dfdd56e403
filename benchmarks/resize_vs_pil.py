"""The official resize of a 1920x1080 photo: the ``pil_bilinear_resize`` op on the device vs PIL on
the CPU, bit-exactness checked in the same run.

    python benchmarks/resize_vs_pil.py [--device cuda] [--out FILE.jsonl]

Times (medians after warm-up: CUDA events on the GPU, wall clock on the CPU): the op alone on a
(3, 1080, 1920) uint8 tensor already on the device, the op plus the host-to-device copy of the
image from pinned memory, and PIL's ``Image.resize((1138, 640), BILINEAR)``.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--out", default=None, help="append the row to this JSON-lines file")
    args = parser.parse_args(argv)
    from sed_fast.bench import common
    from sed_fast.kernels import dispatch, pil_bilinear_resize
    from sed_fast.inputs.preprocess import official_resize_shape

    device = torch.device(args.device)
    size = official_resize_shape(args.height, args.width)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR))
    host = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W) view of the HWC array, as decoded
    pinned = host.contiguous().pin_memory() if device.type == "cuda" else host
    image = pinned.to(device)
    backend = dispatch.resolve_name("pil_bilinear_resize", device, (image, size))
    out = pil_bilinear_resize(image, size)
    exact = bool(torch.equal(out.permute(1, 2, 0).cpu(), torch.from_numpy(expected.copy())))
    def median_ms(fn, on, reps):
        return common.time_fn(fn, on, warmup=3, reps=reps).median_ms

    row = dict(common.environment(device), kind="resize", op="pil_bilinear_resize", backend=backend,
               shape=f"{args.height}x{args.width}->{size[0]}x{size[1]}", bit_exact_vs_pil=exact,
               op_ms=median_ms(lambda: pil_bilinear_resize(image, size), device, args.reps),
               op_with_copy_ms=median_ms(lambda: pil_bilinear_resize(pinned.to(device, non_blocking=True), size),
                                         device, args.reps),
               pil_cpu_ms=median_ms(lambda: Image.fromarray(array).resize((size[1], size[0]), Image.BILINEAR),
                                    "cpu", 20))
    print(json.dumps(row))
    if args.out:
        common.append_rows(args.out, [row])
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
