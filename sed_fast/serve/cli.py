"""``sed-fast serve``: the browser demo (Gradio; ``pip install -e ".[demo]"``).

    sed-fast serve --checkpoint model_final.pth --port 7860
    sed-fast serve --random-weights                 # no checkpoint: meaningless output, said on the page

It serves on 127.0.0.1 unless ``--host`` says otherwise (``--host 0.0.0.0`` exposes it to the
network: no authentication). One model is built at start-up and shared by all requests.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

from ..toolkit.errors import EXIT_OK, EXIT_USAGE, UsageError, error
from ..toolkit.options import add_model_options, build_model, check_model_options, read_checkpoint
from .limits import (DEFAULT_MAX_CLASSES, DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_NAME_CHARS, DEFAULT_MAX_QUEUE,
                     DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_MAX_VIDEO_SECONDS, DEFAULT_TIME_LIMIT_S)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sed-fast serve", description=__doc__.split("\n\n")[0])
    add_model_options(parser, impl_default="fast", cer_topk=False)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    # The bounds of one request (sed_fast/serve/limits.py); a request beyond one is refused on the page.
    parser.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                        help=f"largest image accepted (default {DEFAULT_MAX_MEGAPIXELS:g} megapixels)")
    parser.add_argument("--max-video-frames", type=int, default=DEFAULT_MAX_VIDEO_FRAMES,
                        help=f"frames segmented per clip (default {DEFAULT_MAX_VIDEO_FRAMES})")
    parser.add_argument("--max-video-seconds", type=float, default=DEFAULT_MAX_VIDEO_SECONDS, metavar="S",
                        help=f"seconds of a clip segmented (default {DEFAULT_MAX_VIDEO_SECONDS:g})")
    parser.add_argument("--max-classes", type=int, default=DEFAULT_MAX_CLASSES, metavar="N",
                        help=f"classes per request (default {DEFAULT_MAX_CLASSES}; the page lists the built-in "
                             "vocabularies that fit)")
    parser.add_argument("--max-name-chars", type=int, default=DEFAULT_MAX_NAME_CHARS, metavar="N",
                        help=f"characters per class name (default {DEFAULT_MAX_NAME_CHARS})")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, metavar="S",
                        help=f"seconds of work per request, waiting not counted (default {DEFAULT_TIME_LIMIT_S:g})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                        help=f"requests waiting at most; more are refused (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--share", action="store_true",
                        help="also serve on a public gradio.live link (anyone with it can use the page)")
    return parser


def build_segmenter(args: argparse.Namespace):
    """The model (built once) wrapped for the app; raises the CLI's UsageError for bad options."""
    from .app import Segmenter
    from .limits import Limits

    args.cer_topk = None
    args.debug = False
    spec, dtype, device = check_model_options(args)
    state = None if args.random_weights else read_checkpoint(args.checkpoint)
    model, impl = build_model(args, spec, dtype, device, state)
    random_weights = bool(getattr(model, "random_weights", args.random_weights))
    return Segmenter(model, random_weights=random_weights, limits=Limits.from_options(args)), impl


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import gradio  # noqa: F401
    except ImportError as problem:
        error(f"`sed-fast serve` needs Gradio ({problem}): pip install -e \".[demo]\"")
        return EXIT_USAGE
    from .limits import Limits

    try:
        Limits.from_options(args)
    except ValueError as problem:
        error(str(problem))
        return EXIT_USAGE
    if not 0 <= args.port <= 65535:
        error(f"--port must be in 0..65535, got {args.port}")
        return EXIT_USAGE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            segmenter, impl = build_segmenter(args)
    except UsageError as problem:
        error(str(problem))
        return EXIT_USAGE
    from .app import build_app, launch_kwargs, sample_classes

    if segmenter.random_weights:
        print("sed-fast serve: WARNING: RANDOM WEIGHTS (--random-weights): the page says so; every segmentation is "
              "meaningless", file=sys.stderr)
    segmenter.prepare_vocabulary(sample_classes())  # the page's default classes: no visitor waits for them
    app = build_app(segmenter)
    kwargs = launch_kwargs(args.host, args.port or None, share=args.share)
    try:
        _, local_url, share_url = app.launch(prevent_thread_lock=True, **kwargs)
        print(f"sed-fast serve: SED-{args.variant.upper()} ({impl}, {segmenter.model.device}); serving on "
              f"{local_url} (Ctrl-C stops)", file=sys.stderr)
        if share_url:
            print(f"sed-fast serve: also public, to anyone with this link: {share_url}", file=sys.stderr)
        app.block_thread()
    except KeyboardInterrupt:
        pass
    except OSError as problem:  # the port is taken
        error(f"cannot serve on {args.host}:{args.port}: {problem} (choose another --port)")
        return EXIT_USAGE
    finally:
        app.close()
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
