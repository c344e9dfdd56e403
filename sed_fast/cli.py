"""The ``sed-fast`` command (also ``python -m sed_fast``): it only dispatches.

    sed-fast segment IMAGES... --vocab ade150 --checkpoint sed_model_base.pth --out out/
    sed-fast eval | train | video ... | serve | export | doctor | demo
    sed-fast bench | bench-kernels | profile | report | compile-report ...   (sed_fast.bench)

Each command is a package with its own ``cli.py`` (``main(argv) -> exit code``), built on the tool
kit :mod:`sed_fast.toolkit` (model options, usage errors and exit codes, device, signals, the
``--out`` rule, progress, run record). Exit codes, for every command: 0 ok, 1 failure, 2 usage
error or bad input, 128 + n stopped by signal n (:mod:`sed_fast.toolkit.errors`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence

from .toolkit.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE  # noqa: F401
from .toolkit.errors import PROG, UsageError, error, exit_code_of, warn

#: Every subcommand: name -> (module with main(argv), description).
COMMANDS = {
    "segment": ("sed_fast.segment.cli", "segment images with a vocabulary; write label maps, overlays and a summary"),
    "demo": ("sed_fast.demo", "segment a built-in sample scene with random weights (no download)"),
    "bench": ("sed_fast.bench.e2e", "end-to-end benchmark (see `sed-fast bench --help`)"),
    "bench-kernels": ("sed_fast.bench.kernels", "per-kernel benchmark (see `sed-fast bench-kernels --help`)"),
    "profile": ("sed_fast.bench.profile", "per-stage profile (see `sed-fast profile --help`)"),
    "bench-train": ("sed_fast.bench.train_step", "training-step benchmark: forward+backward time and memory"),
    "report": ("sed_fast.bench.report", "Markdown + PNG report of benchmark results"),
    "compile-report": ("sed_fast.bench.compile_report",
                       "compile every Triton kernel for a GPU architecture, without a GPU"),
    "eval": ("sed_fast.evaluation.cli", "dataset evaluation, official metrics (see `sed-fast eval --help`)"),
    "train": ("sed_fast.training.cli", "train or fine-tune, official recipe (see `sed-fast train --help`)"),
    "serve": ("sed_fast.serve.cli", "browser demo (Gradio): upload an image or a clip, type class names"),
    "doctor": ("sed_fast.doctor.cli", "check this machine: versions, op backends, dispatch, end to end"),
    "export": ("sed_fast.export.cli", "export SED (vocabulary baked in or an input, or its text side)"),
    "embed-vocab": ("sed_fast.export.embed_vocab", "text embeddings as .npy for an export's vocab input"),
    "cache": ("sed_fast.cache.cli", "list, size or clear the caches (text embeddings, autotune, CUDA build)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top level only (each command parses its own arguments)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Fast inference for SED, open-vocabulary semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"-h", "--help", "--version"} & set(map(str, argv)) and not _environment_ok():
        return EXIT_USAGE
    if argv and argv[0] in COMMANDS:
        return _dispatch(argv[0], argv[1:])
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, an unknown command
        return exit_code_of(exit_.code)
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _environment_ok() -> bool:
    """Every command parses every environment variable first (sed_fast.base.envvars): a malformed one
    is one usage error before any work, not a failure of each image later."""
    from .base.envvars import EnvError, check_environment

    try:
        for warning in check_environment():
            warn(warning)
    except EnvError as problem:
        error(str(problem))
        return False
    return True


#: Commands that are fronts of another: their module's ``command_line(argv)`` gives the command
#: line they stand for (``.command``, ``.argv``) and what to say once it succeeded (``.done_message``).
FRONTS = ("demo",)


def _dispatch(command: str, rest: List[str]) -> int:
    module_name = COMMANDS[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as problem:
        if problem.name and module_name.startswith(problem.name):
            error(f"`{PROG} {command}` needs the module {module_name}, which is not available "
                  f"(run from the repository root or install sed_fast with its benchmarks)")
        else:
            error(f"`{PROG} {command}`: could not import {module_name}: {problem}")
        return EXIT_USAGE
    except ImportError as problem:
        error(f"`{PROG} {command}`: could not import {module_name}: {problem}")
        return EXIT_USAGE
    try:
        if command in FRONTS:
            return _run_front(command, module, rest)
        return exit_code_of(module.main(rest))
    except SystemExit as exit_:
        return exit_code_of(exit_.code)


def _run_front(command: str, front, rest: List[str]) -> int:
    try:
        run = front.command_line(rest)
    except UsageError as problem:
        error(str(problem), prog=f"{PROG} {command}")
        return EXIT_USAGE
    code = _dispatch(run.command, run.argv)
    if code == EXIT_OK and run.done_message:
        print(run.done_message)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
