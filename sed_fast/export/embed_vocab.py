"""``sed-fast embed-vocab``: a vocabulary's text embeddings as a ``.npy`` file, in exactly the
layout an image model exported with ``--vocab-input`` takes as its ``text_embeddings`` input:
(T, P, C) float32, row t the class t of the vocabulary (P prompt templates, C the CLIP width).

    sed-fast embed-vocab --vocab ade150 --checkpoint model_final.pth --out ade150.npy
    sed-fast embed-vocab --vocab cat,dog,grass --random-weights --out three.npy

The class names are written beside it, one a line, in ``<out>.txt`` (``ade150.npy.txt``), so that
label t can be named. The weights must be the image model's (the same checkpoint, or
``--random-weights`` for both). Neither file is overwritten: an existing ``--out`` is refused.

Exit code: 0 written; 1 failed; 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_PROG = "sed-fast embed-vocab"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0].replace("``", "'"))
    parser.add_argument("--vocab", required=True, metavar="NAME|FILE|LIST", help="the vocabulary to embed")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", metavar="PATH", help="official SED checkpoint (the image model's)")
    weights.add_argument("--random-weights", action="store_true", help="random weights (tests)")
    parser.add_argument("--variant", default="b", help="b or l (default b)")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .npy file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if exit_.code in (0, None) else EXIT_USAGE
    out = Path(args.out).expanduser()
    names_path = out.with_name(out.name + ".txt")
    problem = None
    if out.suffix != ".npy":
        problem = f"--out {args.out}: the file must end in .npy"
    elif not out.parent.is_dir():
        problem = f"--out {args.out}: the folder {out.parent} does not exist"
    elif out.exists() or names_path.exists():
        problem = (f"--out {args.out}: {out if out.exists() else names_path} exists; it is never overwritten: "
                   "remove it or choose another --out")
    elif args.checkpoint is not None and not Path(args.checkpoint).expanduser().is_file():
        problem = f"checkpoint file not found: {args.checkpoint}"
    names = None
    if problem is None:
        from ..data.vocabulary import load_vocabulary, parse_vocabulary_arg

        try:
            names = [str(name) for name in load_vocabulary(parse_vocabulary_arg(args.vocab))]
        except Exception as error:  # noqa: BLE001 - whatever the reason, it is a bad --vocab
            problem = f"--vocab {args.vocab!r}: {error}"
    if problem is not None:
        print(f"{_PROG}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    embeddings = embed(names, args.variant, args.checkpoint)
    write(out, names_path, embeddings, names)
    print(f"wrote {out}: text_embeddings float32 {tuple(embeddings.shape)} for {len(names)} classes "
          f"(names in {names_path})")
    return EXIT_OK


def embed(names: Sequence[str], variant: str = "b", checkpoint: Optional[str] = None):
    """(T, P, C) float32 numpy array: the package's text embeddings of ``names``."""
    import warnings

    import torch

    from ..api import RandomWeightsWarning, build_sed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_sed(variant, impl="reference", checkpoint=checkpoint, device="cpu", dtype=torch.float32,
                          clip_resolution=64, preprocess="none")
    model.set_vocabulary(list(names), progress=False)
    return model.text_embeddings.float().cpu().contiguous().numpy()


def write(out: Path, names_path: Path, embeddings, names: Sequence[str]) -> None:
    import io

    import numpy

    from ..base.files import atomic_write_bytes, atomic_write_text

    buffer = io.BytesIO()
    numpy.save(buffer, numpy.ascontiguousarray(embeddings, dtype=numpy.float32))
    atomic_write_text(names_path, "".join(f"{name}\n" for name in names))
    atomic_write_bytes(out, buffer.getvalue())


if __name__ == "__main__":
    sys.exit(main())
