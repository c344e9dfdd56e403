"""``sed-fast export``: SED with a baked-in vocabulary, as an AOTInductor package (``--format pt2``,
loads with torch alone) or an ONNX model (``--format onnx``, ONNX Runtime); the reference decoder,
or with ``--impl fast`` the fast decoder in plain PyTorch (sed_fast.export.fast: exact decoding;
the export lists which formulation each piece runs).

    sed-fast export --vocab ade150 --checkpoint model_final.pth --format pt2 --out sed_b_ade150.pt2
    sed-fast export --vocab cat,dog,grass --random-weights --resolution 64 --format onnx --out m.onnx

The exported model's input: with ``--official-resize caller`` (default) ``image`` float32
(1, 3, H, W), RGB in 0..255, already resized as the official test-time pipeline does
(``sed_fast.inputs.preprocess.official_resize``), H and W each in [32, --max-side] (dynamic; default 2560)
or fixed by ``--sizes HxW[,HxW...]``, one file per size; with ``--official-resize included
--sizes ...`` the raw image, uint8 (H, W, 3) RGB, which the model resizes as the official pipeline
does (Pillow's bilinear, bit for bit) and whose outputs come back at the raw size. Outputs
``labels`` (H, W) int64, with ``--scores`` then ``scores`` (T, H, W) float32, with ``--cer-topk``
then ``kept_counts`` (3,) int64.

Decoding is exact, or with ``--cer-topk K`` category early rejection with a static kept-class budget
(``--kept-budget N``, default: every class): each rejection step carries N rows, the kept classes
then padding that the class attention ignores. That is the official result whenever the first kept
set has at most N classes (the later ones are subsets of it); a larger set is cut to the N classes
with the highest peak aux logit, and ``kept_counts[0] > N`` says so. Compute dtype ``--dtype``:
float32, or for pt2 bfloat16 / float16 (checked against the eager model in that dtype, within
5e-2 / 2e-2; ONNX Runtime's CPU provider lacks 16-bit convolutions, so ONNX is float32 only).

Every export is checked: the exported model's labels equal the eager model's (the same settings;
with the resize included, the whole official pipeline on the raw image) on sample images, except
on ties of the top two classes, which rounding decides, and its scores agree within 1e-5 in
float32; a pt2 package is also loaded in a new process that never imports sed_fast.

With ``--vocab-input`` the vocabulary is a second input, ``text_embeddings`` float32 (T, P, C)
(``sed-fast embed-vocab`` writes it), T in [1, --max-classes]; ``--part text`` exports the text side
(token ids in, those embeddings out). Every export carries its input contract and is written with
a standalone loader, ``sed_exported.py``, that checks each call's input (sed_fast.export.runtime).

Exit code: 0 exported and checked; 1 the export or its check failed; 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..toolkit.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError, describe, parse_command_line
from ..toolkit.options import add_model_options, check_weights_options

_PROG = "sed-fast export"
CHECK_SIZES = ((96, 128), (131, 77))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0].replace("``", "'"))
    parser.add_argument("--vocab", required=True, metavar="NAME|FILE|LIST", help="vocabulary baked into the model")
    add_model_options(parser, impl_default="reference", text_cache=False,
                      device_help="pt2: cpu or cuda, the device the package runs on (default cpu); onnx is exported "
                                  "from the CPU")
    parser.add_argument("--format", choices=("pt2", "onnx"), required=True, help="pt2 (AOTInductor) or onnx")
    parser.add_argument("--out", required=True, metavar="FILE", help="output file (.pt2 or .onnx)")
    parser.add_argument("--scores", action="store_true", help="also output the scores (T, H, W)")
    parser.add_argument("--kept-budget", type=int, default=None, metavar="N",
                        help="with --cer-topk: rows each rejection step carries (default: every class, always exact)")
    parser.add_argument("--official-resize", choices=("caller", "included"), default="caller",
                        help="the official test-time resize: 'caller' (done before the model, default) or "
                             "'included' (in the model, for raw uint8 HWC images of the --sizes given)")
    parser.add_argument("--sizes", metavar="HxW[,HxW...]",
                        help="fixed input sizes, one exported file per size (default: one file, dynamic sizes); "
                             "with --official-resize included, the raw images' sizes")
    parser.add_argument("--max-side", type=int, default=None, metavar="PX",
                        help="dynamic sizes: the largest H and W the model accepts (default 2560, the official "
                             "resize's bound)")
    parser.add_argument("--max-memory-gb", type=float, default=16.0, metavar="GB",
                        help="refuse a vocabulary whose full-size scores (T x H x W float32 at the largest size "
                             "accepted) exceed this (default 16)")
    parser.add_argument("--no-fresh-process-check", action="store_true",
                        help="pt2: skip loading the package in a new process that never imports sed_fast")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    # The vocabulary as an input (sed_fast.export.core.ExportableSED's vocab_input).
    parser.add_argument("--vocab-input", action="store_true",
                        help="take the vocabulary at run time: a second input text_embeddings (T, P, C) float32, as "
                             "'sed-fast embed-vocab' writes it; --vocab is then the vocabulary the export is checked "
                             "with")
    parser.add_argument("--max-classes", type=int, default=None, metavar="T",
                        help="with --vocab-input: the largest class count accepted (default 1000)")
    parser.add_argument("--part", choices=("image", "text"), default="image",
                        help="image: the segmentation model (default); text: the CLIP text tower with SED's prompt "
                             "ensembling, token ids in, the image model's text_embeddings out (--vocab is then the "
                             "vocabulary it is checked with)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, code = parse_command_line(build_parser(), argv)
    if args is None:
        return code
    from .core import ExportError

    try:
        return _export(args)
    except (ExportError, UsageError) as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _export(args) -> int:
    import torch

    from . import core
    from .core import ExportError
    from .model import build_model

    try:
        check_weights_options(args)
    except UsageError as error:
        raise ExportError(str(error)) from None
    args.device = args.device or "cpu"
    if args.device not in ("cpu", "cuda"):
        raise ExportError(f"--device {args.device}: a package runs on cpu or cuda (it takes the current CUDA device)")

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
    if args.device == "cuda":
        if args.format == "onnx":
            raise ExportError("--device cuda: an ONNX model is exported from the CPU (it is device-independent); "
                              "drop --device, or use --format pt2 for a CUDA package")
        if not torch.cuda.is_available():
            raise ExportError("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if args.sizes is not None and args.max_side is not None:
        raise ExportError("--max-side bounds dynamic sizes: with --sizes the sizes are fixed; give one or the other")
    if args.official_resize == "included" and args.sizes is None:
        raise ExportError("--official-resize included needs --sizes: the official resize's output size and "
                          "Pillow's tables depend on the raw image's size")
    max_side = core.MAX_SIDE if args.max_side is None else args.max_side
    if not core.MIN_MAX_SIDE <= max_side <= core.MAX_SIDE:
        raise ExportError(f"--max-side must be in [{core.MIN_MAX_SIDE}, {core.MAX_SIDE}], got {max_side}")
    sizes = None if args.sizes is None else parse_sizes(args.sizes, args.official_resize == "included")
    if args.max_classes is not None and not args.vocab_input:
        raise ExportError("--max-classes bounds the vocabulary given at run time: give --vocab-input too")
    max_classes = core.MAX_CLASSES if args.max_classes is None else args.max_classes
    if not 2 <= max_classes <= core.MAX_CLASSES_LIMIT:
        raise ExportError(f"--max-classes must be in [2, {core.MAX_CLASSES_LIMIT}], got {max_classes}")
    if args.impl == "fast" and (args.cer_topk is not None or args.part == "text"):
        raise ExportError("--impl fast exports the fast decoder's exact decoding: without --cer-topk, --part image")
    if args.vocab_input and args.cer_topk is not None:
        raise ExportError("--cer-topk exports a static kept-class budget of a baked-in vocabulary: it cannot be "
                          "combined with --vocab-input")
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
    core.check_loader_slot(out.parent)
    if args.format == "onnx":
        from .core import _require_onnx
        _require_onnx()
    if args.checkpoint is not None and not Path(args.checkpoint).expanduser().is_file():
        raise ExportError(f"checkpoint file not found: {args.checkpoint}")

    _claim_outputs(args, out, suffix, sizes)

    from ..inputs.preprocess import official_resize_shape
    from ..toolkit.options import load_vocabulary

    try:
        names = load_vocabulary(args.vocab)
    except UsageError as error:
        raise ExportError(str(error)) from None
    if args.part == "text":
        return _export_text(args, names)
    largest = (max_side, max_side) if sizes is None else max(sizes, key=lambda size: size[0] * size[1])
    scores_gb = len(names) * largest[0] * largest[1] * 4 / 1e9
    if scores_gb > args.max_memory_gb and not args.vocab_input:  # a run-time vocabulary: its caller's choice
        lower = ("lower --max-side (the largest image side after the official resize)" if sizes is None
                 else "give smaller --sizes")
        raise ExportError(f"--vocab has {len(names)} classes: at {largest[0]}x{largest[1]} the exported model "
                          f"holds {len(names)} full-size float32 score planes, {scores_gb:.1f} GB, more than "
                          f"--max-memory-gb {args.max_memory_gb:g}: {lower} or raise --max-memory-gb")
    info = (lambda message: None) if args.json else (lambda message: print(f"{_PROG}: {message}", file=sys.stderr))
    start = time.perf_counter()
    model = build_model(args.variant, names, args.checkpoint, args.resolution, dtype, device=args.device,
                        impl=args.impl)
    model.cer_topk = args.cer_topk  # the eager model the export is checked against decodes the same way
    resize_included = args.official_resize == "included"
    modules = [core.ExportableSED(model, return_scores=args.scores, cer_topk=args.cer_topk,
                                  kept_budget=args.kept_budget, max_side=max_side, input_size=size,
                                  resize_included=resize_included, vocab_input=args.vocab_input,
                                  max_classes=max_classes, impl=args.impl).eval()
               for size in (sizes or [None])]
    kept_budget = modules[0].kept_budget if args.cer_topk is not None else None
    decoding = ("exact decoding" if args.cer_topk is None else
                f"CER top-{args.cer_topk}, kept-class budget {kept_budget} of {len(names)}")
    info(f"SED-{args.variant.upper()}, {len(model.class_names)} classes, {args.resolution} px, {str(dtype)[6:]}, "
         f"{args.device}, "
         f"{decoding}, {'random weights' if args.random_weights else args.checkpoint}: exporting ({args.format}"
         + (f", {len(modules)} fixed sizes)" if sizes else ")") + f", the {args.impl} decoder")
    for piece, formulation in (modules[0].formulations or {}).items():
        info(f"  {piece}: {formulation}")
    exports = []
    for module in modules:
        size = module.input_size
        path = out if len(modules) == 1 else out.with_name(f"{out.stem}_{size[0]}x{size[1]}{suffix}")
        if size is not None:
            note = ""
            resized = official_resize_shape(*size)
            if not resize_included and resized != size:
                note = (f" (not a size the official resize gives: it makes {size[0]}x{size[1]} images "
                        f"{resized[0]}x{resized[1]}; for raw images of this size use --official-resize included)")
            info(f"{size[0]}x{size[1]} -> {path}{note}")
        try:
            exports.append(_export_one(args, core, model, module, path))
        except ExportError:
            raise
        except Exception as error:  # noqa: BLE001 - the exporter's own error, one line
            print(f"{_PROG}: error: the export failed: {type(error).__name__}: {str(error).strip()[:2000]}",
                  file=sys.stderr)
            return EXIT_FAILED
        if not args.json:
            _print_record(exports[-1], kept_budget)
    ok = all(record["ok"] for record in exports)
    result = {"format": args.format, "variant": args.variant, "classes": len(model.class_names),
              "class_names": model.class_names, "resolution": args.resolution, "dtype": str(dtype)[6:],
              "device": args.device, "cer_topk": args.cer_topk, "kept_budget": kept_budget,
              "impl": args.impl, "formulations": modules[0].formulations,
              "inputs": modules[0].input_names, "outputs": modules[0].output_names,
              "max_classes": max_classes if args.vocab_input else None,
              "scores": args.scores, "official_resize": args.official_resize,
              "random_weights": bool(args.random_weights),
              "export_seconds": round(time.perf_counter() - start, 1), "exports": exports, "ok": ok}
    if len(exports) == 1:  # one file: its record at the top level too
        result.update({key: value for key, value in exports[0].items() if key != "ok"})
    if args.json:
        print(json.dumps(result, indent=2))
    elif len(exports) > 1:
        print(f"{'wrote' if ok else 'FAILED the check of at least one file, wrote'} {len(exports)} files "
              f"({result['export_seconds']:.0f} s)")
    return EXIT_OK if ok else EXIT_FAILED


def _export_text(args, names) -> int:
    from .text import export_text_command

    info = (lambda message: None) if args.json else (lambda message: print(f"{_PROG}: {message}", file=sys.stderr))
    try:
        record = export_text_command(args, names, info)
    except Exception as error:  # noqa: BLE001 - the exporter's own error, one line
        print(f"{_PROG}: error: the export failed: {type(error).__name__}: {str(error).strip()[:2000]}",
              file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        check = record["checks"][0]
        print(f"check {check['classes']} classes: embeddings (T, P, C) {check['shape']} within "
              f"{check['max_relative_diff']:.1e} of the package's (relative): {'ok' if check['ok'] else 'FAILED'}")
        print(f"{'wrote' if record['ok'] else 'FAILED the check, wrote'} {record['path']} "
              f"({record['export_seconds']:.0f} s): inputs tokens int64 (T, S, P, L), synonyms int64 (T,); "
              f"output text_embeddings float32 (T, P, C); make the inputs with sed_exported.text_tokens")
    return EXIT_OK if record["ok"] else EXIT_FAILED


def _claim_outputs(args, out: Path, suffix: str, sizes) -> None:
    """The ``--out`` rule: the files this export writes (one per size; an ONNX model's external data
    file) may replace only files an export wrote into that folder; a file of the user's under one of
    those names (or the ``--checkpoint``) is refused before the model is built."""
    from ..toolkit.outputs import OutputClaim

    paths = [out] if not sizes or args.part == "text" else \
        [out.with_name(f"{out.stem}_{size[0]}x{size[1]}{suffix}") for size in sizes]
    names = [path.name for path in paths] + ([f"{path.name}.data" for path in paths] if args.format == "onnx" else [])
    claim = OutputClaim(out.parent, "export")
    keep = [Path(args.checkpoint).expanduser()] if args.checkpoint else []
    try:
        claim.refuse_collisions(f"--out {args.out}: the folder {out.parent}", names, keep=keep)
        claim.claim(names)
    except OSError as error:
        raise UsageError(f"--out {args.out}: cannot write into {out.parent}: {describe(error)}") from error


def parse_sizes(text: str, raw: bool):
    """``HxW[,HxW...]`` -> [(H, W), ...] in the order given, duplicates dropped. ``raw``: the sizes of
    raw images (the official resize included), else the model's input sizes."""
    from . import core
    from .core import ExportError

    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            size = tuple(int(part) for part in parts)
        except ValueError:
            size = ()
        if len(size) != 2:
            raise ExportError(f"--sizes {text!r}: {item.strip()!r} is not HxW (e.g. 480x640)")
        low, high = (1, core.MAX_RAW_SIDE) if raw else (core.MIN_SIDE, core.MAX_SIDE)
        if not all(low <= side <= high for side in size):
            what = "a raw image side" if raw else "a model input side (after the official resize)"
            raise ExportError(f"--sizes: {size[0]}x{size[1]}: {what} must be in [{low}, {high}]")
        if raw:
            try:
                core.resized_raw_size(*size)
            except ExportError as error:
                raise ExportError(f"--sizes: {error}") from None
        if size not in sizes:
            sizes.append(size)
    return sizes


def _export_one(args, core, model, module, path: Path):
    """Export one module to ``path``, load it back and check it: its record (path, input, checks,
    the fresh-process check for pt2, ok)."""
    import torch

    start = time.perf_counter()
    if args.format == "pt2":
        path = core.export_pt2(module, path)
        runner = torch._inductor.aoti_load_package(str(path))
    else:
        path = core.export_onnx(module, path)
        runner = core.OnnxRunner(path)
    seconds = time.perf_counter() - start
    check_sizes = CHECK_SIZES if module.input_size is None else (module.input_size,)
    checks = core.check(runner, model, module, check_sizes)
    if module.vocab_input:  # the same file with another vocabulary: its first class alone, T's lower bound
        full = model.text_embeddings
        model.text_embeddings = full[:1]
        try:
            checks += core.check(runner, model, module, check_sizes[:1])
        finally:
            model.text_embeddings = full
    record = {"path": str(path), "input": core.input_description(module), "export_seconds": round(seconds, 1),
              "checks": checks}
    if module.resize_included:  # Pillow's pass order, which changes some pixels by one level
        record["resize_passes"] = "".join(module.resize_passes) or "none"
    if args.format == "pt2" and not args.no_fresh_process_check:
        image = module.sample_input(check_sizes[0])
        if module.vocab_input:
            image = (image, model.text_embeddings.float().contiguous())
        fresh = core.load_pt2_in_fresh_process(path, image)
        labels = fresh[0] if isinstance(fresh, (tuple, list)) else fresh
        with torch.no_grad():
            here = runner(*image) if module.vocab_input else runner(image)  # this process: same output expected
        expected = here[0] if isinstance(here, (tuple, list)) else here
        record["fresh_process_labels_equal"] = bool(torch.equal(labels, expected.cpu()))
    record["loader"] = str(core.write_loader(path.parent))
    record["ok"] = all(c["ok"] for c in record["checks"]) and record.get("fresh_process_labels_equal", True)
    return record


def _print_record(record, kept_budget) -> None:
    for c in record["checks"]:
        same = "equal" if c["labels_equal"] else (
            f"differ on {c['labels_differ']} pixel(s), " + ("all ties" if not c["labels_differ_not_ties"]
                                                         else f"{c['labels_differ_not_ties']} NOT ties"))
        kept = ""
        if "kept_counts" in c:
            kept = f", kept {'/'.join(map(str, c['kept_counts']))} classes"
            if c["budget_exceeded"]:
                kept += (f" (MORE than the budget {kept_budget}: not the official result; "
                         f"export with --kept-budget {c['kept_counts'][0]} or more)")
        print(f"check {c['size'][0]}x{c['size'][1]}, {c['classes']} class{'es' if c['classes'] != 1 else ''}: "
              f"labels {same}"
              + (f", max |score diff| {c['max_score_diff']:.2e}" if "max_score_diff" in c else "")
              + kept + f" ({c['seconds']} s): {'ok' if c['ok'] else 'FAILED'}")
    if "fresh_process_labels_equal" in record:
        print(f"loaded with torch alone in a new process (no sed_fast import): labels vs this process's "
              f"{'equal' if record['fresh_process_labels_equal'] else 'DIFFER'}")
    status = "wrote" if record["ok"] else "FAILED the check, wrote"
    print(f"{status} {record['path']} ({record['export_seconds']:.0f} s): input {record['input']}")
