"""Training-step benchmark: forward + backward of ``model.losses`` per image, time and peak memory.

    sed-fast bench-train --device cuda                       # the official setting: SED-B, 768, 171 classes
    sed-fast bench-train --device cpu --resolution 64 --classes 8 --iters 2   # a small CPU run

One row per (impl, activation checkpointing): median seconds per training step (zero_grad, losses,
backward; no optimizer step) and per image, and the peak memory: CUDA ``max_memory_allocated``
during the timed steps; on CPU the process's peak RSS so far (``ru_maxrss``: it never goes down,
so later rows read at least earlier ones' peak). Random weights and random unit text embeddings:
what is measured is the cost, not a result. Rows go to ``--out`` (JSON lines) and a Markdown table
to stdout.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sed-fast bench-train", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b", choices=["b", "l"])
    parser.add_argument("--impls", default="reference,fast", help="comma list of reference, fast")
    parser.add_argument("--checkpointing", default="off,on", help="comma list of off, on")
    parser.add_argument("--resolution", type=int, default=768, help="crop and encoder side (official: 768)")
    parser.add_argument("--classes", type=int, default=171, help="training classes (COCO-Stuff: 171)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (official: 1 per GPU)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", default="off", choices=["off", "bf16"], help="bf16 autocast")
    parser.add_argument("--out", help="append JSON rows to this file")
    return parser


def _list(value: str, allowed, what: str, parser) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        parser.error(f"--{what}: expected a comma list of {', '.join(allowed)}, got {value!r}")
    return items


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(reference, impl: str, checkpointing: bool, args, device: torch.device) -> dict:
    from ..models.fast.model import SEDFast

    model = reference if impl == "reference" else SEDFast.from_reference(reference)
    model.train()
    model.decoder.activation_checkpointing = checkpointing
    generator = torch.Generator().manual_seed(0)
    side = args.resolution
    images = (torch.rand(args.batch, 3, side, side, generator=generator) * 255).to(device)
    labels = torch.randint(0, args.classes, (args.batch, side, side), generator=generator)
    labels[:, : side // 8] = 255
    labels = labels.to(device)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            losses = model.losses(images, labels)
        total = sum(losses.values())
        total.backward()
        return float(total.detach())

    try:
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            loss = step()  # float(): synchronises
            times.append(time.perf_counter() - start)
    finally:
        model.decoder.activation_checkpointing = False
        model.zero_grad(set_to_none=True)
    seconds = statistics.median(times)
    return {"kind": "train_step", "variant": args.variant, "impl": impl, "checkpointing": checkpointing,
            "resolution": side, "classes": args.classes, "batch": args.batch, "autocast": args.autocast,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "iters": args.iters, "seconds_per_step": seconds, "seconds_per_image": seconds / args.batch,
            "peak_bytes": _peak_bytes(device), "peak_bytes_per_image": _peak_bytes(device) / args.batch,
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (cumulative)",
            "loss": loss, "torch": torch.__version__}


def main(argv: Optional[List[str]] = None) -> int:
    import sed_fast

    parser = _parser()
    args = parser.parse_args(argv)
    impls = _list(args.impls, ("reference", "fast"), "impls", parser)
    modes = _list(args.checkpointing, ("off", "on"), "checkpointing", parser)
    for name in ("resolution", "classes", "batch", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.resolution % 32:
        parser.error("--resolution must be a multiple of 32")
    if args.classes > 255:
        parser.error("--classes must be <= 255 (255 is the ignore label)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sed_fast.RandomWeightsWarning)
        reference = sed_fast.build_sed(args.variant, impl="reference", device=device,
                                       clip_resolution=args.resolution)
    generator = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(args.classes, 80, reference.spec.embed_dim, generator=generator), dim=-1)
    reference.text_embeddings = text.to(device)
    reference.class_names = [f"class{i}" for i in range(args.classes)]
    rows = []
    for impl in impls:
        for mode in modes:
            row = measure(reference, impl, mode == "on", args, device)
            rows.append(row)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print("| impl | checkpointing | s / image | peak MiB / image | loss |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['impl']} | {'on' if row['checkpointing'] else 'off'} | {row['seconds_per_image']:.3f} | "
              f"{row['peak_bytes_per_image'] / 2**20:.0f} | {row['loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
