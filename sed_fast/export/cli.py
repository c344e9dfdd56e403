"""``sed-fast export``: the reference SED with a baked-in vocabulary, as an AOTInductor package
(``--format pt2``, loads with torch alone) or an ONNX model (``--format onnx``, ONNX Runtime).

    sed-fast export --vocab ade150 --checkpoint model_final.pth --format pt2 --out sed_b_ade150.pt2
    sed-fast export --vocab cat,dog,grass --random-weights --resolution 64 --format onnx --out m.onnx

The exported model: input ``image`` float32 (1, 3, H, W), RGB in 0..255, H and W each in
[32, --max-side] (dynamic; default 2560), already resized as the official test-time pipeline does
(``sed_fast.preprocess.official_resize``: the resize is left to the caller); output ``labels``
(H, W) int64, with ``--scores`` then ``scores`` (T, H, W) float32, with ``--cer-topk`` then
``kept_counts`` (3,) int64.

Decoding is exact, or with ``--cer-topk K`` category early rejection with a static kept-class budget
(``--kept-budget N``, default: every class): each rejection step carries N rows, the kept classes
then padding that the class attention ignores. That is the official result whenever the first kept
set has at most N classes (the later ones are subsets of it); a larger set is cut to the N classes
with the highest peak aux logit, and ``kept_counts[0] > N`` says so. Compute dtype ``--dtype``:
float32, or for pt2 bfloat16 / float16 (checked against the eager model in that dtype, within
5e-2 / 2e-2; ONNX Runtime's CPU provider lacks 16-bit convolutions, so ONNX is float32 only).

Every export is checked: the exported model's labels equal the eager model's (the same settings)
on sample images, except on ties of the top two classes, which rounding decides, and its scores
agree within 1e-5 in float32; a pt2 package is also loaded in a new process that never imports
sed_fast.

Exit code: 0 exported and checked; 1 the export or its check failed; 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_PROG = "sed-fast export"
CHECK_SIZES = ((96, 128), (131, 77))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0].replace("``", "'"))
    parser.add_argument("--vocab", required=True, metavar="NAME|FILE|LIST", help="vocabulary baked into the model")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", metavar="PATH", help="official SED checkpoint")
    weights.add_argument("--random-weights", action="store_true", help="random weights (tests, benchmarks)")
    parser.add_argument("--variant", default="b", help="b or l (default b)")
    parser.add_argument("--resolution", type=int, default=768, metavar="PX", help="encoder input side (official 768)")
    parser.add_argument("--format", choices=("pt2", "onnx"), required=True, help="pt2 (AOTInductor) or onnx")
    parser.add_argument("--out", required=True, metavar="FILE", help="output file (.pt2 or .onnx)")
    parser.add_argument("--scores", action="store_true", help="also output the scores (T, H, W)")
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype: float32 (default), bfloat16 or float16 (pt2 only)")
    parser.add_argument("--cer-topk", type=int, default=None, metavar="K",
                        help="category early rejection keeping each pixel's top K classes (default: exact decoding)")
    parser.add_argument("--kept-budget", type=int, default=None, metavar="N",
                        help="with --cer-topk: rows each rejection step carries (default: every class, always exact)")
    parser.add_argument("--official-resize", choices=("caller",), default="caller",
                        help="the official test-time resize: 'caller' (done before the model; the only choice so far)")
    parser.add_argument("--max-side", type=int, default=2560, metavar="PX",
                        help="the largest H and W the model accepts (default 2560, the official resize's bound)")
    parser.add_argument("--max-memory-gb", type=float, default=16.0, metavar="GB",
                        help="refuse a vocabulary whose full-size scores (T x max-side^2 float32) exceed this "
                             "(default 16)")
    parser.add_argument("--no-fresh-process-check", action="store_true",
                        help="pt2: skip loading the package in a new process that never imports sed_fast")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if exit_.code in (0, None) else EXIT_USAGE
    from .core import ExportError

    try:
        return _export(args)
    except ExportError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _export(args) -> int:
    import torch

    from . import core
    from .core import ExportError

    if args.cer_topk is not None and args.cer_topk < 1:
        raise ExportError(f"--cer-topk must be at least 1, got {args.cer_topk}")
    if args.kept_budget is not None:
        if args.cer_topk is None:
            raise ExportError("--kept-budget is the row budget of category early rejection: give --cer-topk too")
        if args.kept_budget < 1:
            raise ExportError(f"--kept-budget must be at least 1, got {args.kept_budget}")
    dtype = core.DTYPES.get(args.dtype.lower())
    if dtype is None:
        raise ExportError(f"--dtype {args.dtype}: expected float32, bfloat16 or float16")
    if dtype != torch.float32 and args.format == "onnx":
        raise ExportError(f"--dtype {args.dtype}: --format onnx exports float32 only (ONNX Runtime's CPU provider "
                          "has no 16-bit convolutions); use --format pt2")
    if not core.MIN_MAX_SIDE <= args.max_side <= core.MAX_SIDE:
        raise ExportError(f"--max-side must be in [{core.MIN_MAX_SIDE}, {core.MAX_SIDE}], got {args.max_side}")
    if args.max_memory_gb <= 0:
        raise ExportError(f"--max-memory-gb must be positive, got {args.max_memory_gb}")
    if args.resolution < 32 or args.resolution % 32:
        raise ExportError(f"--resolution must be a positive multiple of 32, got {args.resolution}")
    out = Path(args.out).expanduser()
    suffix = {"pt2": ".pt2", "onnx": ".onnx"}[args.format]
    if out.suffix != suffix:
        raise ExportError(f"--out {args.out}: a --format {args.format} file must end in {suffix}")
    if not out.parent.is_dir():
        raise ExportError(f"--out {args.out}: the folder {out.parent} does not exist")
    if args.format == "onnx":
        from .core import _require_onnx
        _require_onnx()
    if args.checkpoint is not None and not Path(args.checkpoint).expanduser().is_file():
        raise ExportError(f"checkpoint file not found: {args.checkpoint}")

    from ..vocabulary import load_vocabulary, parse_vocabulary_arg

    try:
        names = [str(name) for name in load_vocabulary(parse_vocabulary_arg(args.vocab))]
    except Exception as error:  # noqa: BLE001 - whatever the reason, it is a bad --vocab
        raise ExportError(f"--vocab {args.vocab!r}: {error}") from error
    if not names:
        raise ExportError(f"--vocab {args.vocab!r}: the vocabulary is empty")
    scores_gb = len(names) * args.max_side ** 2 * 4 / 1e9
    if scores_gb > args.max_memory_gb:
        raise ExportError(f"--vocab has {len(names)} classes: at {args.max_side}x{args.max_side} the exported model "
                          f"holds {len(names)} full-size float32 score planes, {scores_gb:.1f} GB, more than "
                          f"--max-memory-gb {args.max_memory_gb:g}: lower --max-side (the largest image side after "
                          "the official resize) or raise --max-memory-gb")
    info = (lambda message: None) if args.json else (lambda message: print(f"{_PROG}: {message}", file=sys.stderr))
    start = time.perf_counter()
    model = core.build_model(args.variant, names, args.checkpoint, args.resolution, dtype)
    model.cer_topk = args.cer_topk  # the eager model the export is checked against decodes the same way
    module = core.ExportableSED(model, return_scores=args.scores, cer_topk=args.cer_topk,
                                kept_budget=args.kept_budget, max_side=args.max_side).eval()
    decoding = ("exact decoding" if args.cer_topk is None else
                f"CER top-{args.cer_topk}, kept-class budget {module.kept_budget} of {len(names)}")
    info(f"SED-{args.variant.upper()}, {len(model.class_names)} classes, {args.resolution} px, {str(dtype)[6:]}, "
         f"{decoding}, {'random weights' if args.random_weights else args.checkpoint}: exporting ({args.format})")
    try:
        if args.format == "pt2":
            path = core.export_pt2(module, out)
            runner = torch._inductor.aoti_load_package(str(path))
        else:
            path = core.export_onnx(module, out)
            runner = core.OnnxRunner(path)
    except ExportError:
        raise
    except Exception as error:  # noqa: BLE001 - the exporter's own error, one line
        print(f"{_PROG}: error: the export failed: {type(error).__name__}: {str(error).strip()[:2000]}",
              file=sys.stderr)
        return EXIT_FAILED
    export_seconds = time.perf_counter() - start
    checks = core.check(runner, model, module, CHECK_SIZES)
    result = {"path": str(path), "format": args.format, "variant": args.variant, "classes": len(model.class_names),
              "class_names": model.class_names, "resolution": args.resolution, "dtype": str(dtype)[6:],
              "cer_topk": args.cer_topk, "kept_budget": module.kept_budget if args.cer_topk is not None else None,
              "outputs": module.output_names, "scores": args.scores,
              "random_weights": bool(args.random_weights), "input": "image float32 (1, 3, H, W) RGB 0..255, "
              f"H, W in [{core.MIN_SIDE}, {args.max_side}], after the official resize",
              "export_seconds": round(export_seconds, 1), "checks": checks}
    if args.format == "pt2" and not args.no_fresh_process_check:
        image = core.sample_images([CHECK_SIZES[0]])[0]
        fresh = core.load_pt2_in_fresh_process(path, image)
        labels = fresh[0] if isinstance(fresh, (tuple, list)) else fresh
        with torch.no_grad():
            here = runner(image)  # the same package loaded in this process: identical output expected
        expected = here[0] if isinstance(here, (tuple, list)) else here
        result["fresh_process_labels_equal"] = bool(torch.equal(labels, expected))
    ok = all(c["ok"] for c in checks) and result.get("fresh_process_labels_equal", True)
    result["ok"] = ok
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for c in checks:
            same = "equal" if c["labels_equal"] else (
                f"differ on {c['labels_differ']} pixel(s), " + ("all ties" if not c["labels_differ_not_ties"]
                                                             else f"{c['labels_differ_not_ties']} NOT ties"))
            kept = ""
            if "kept_counts" in c:
                kept = f", kept {'/'.join(map(str, c['kept_counts']))} classes"
                if c["budget_exceeded"]:
                    kept += (f" (MORE than the budget {module.kept_budget}: not the official result; "
                             f"export with --kept-budget {c['kept_counts'][0]} or more)")
            print(f"check {c['size'][0]}x{c['size'][1]}: labels {same}"
                  + (f", max |score diff| {c['max_score_diff']:.2e}" if "max_score_diff" in c else "")
                  + kept + f" ({c['seconds']} s): {'ok' if c['ok'] else 'FAILED'}")
        if "fresh_process_labels_equal" in result:
            print(f"loaded with torch alone in a new process (no sed_fast import): labels vs this process's "
                  f"{'equal' if result['fresh_process_labels_equal'] else 'DIFFER'}")
        print(f"{'wrote' if ok else 'FAILED the check, wrote'} {path} ({export_seconds:.0f} s)")
    return EXIT_OK if ok else EXIT_FAILED
