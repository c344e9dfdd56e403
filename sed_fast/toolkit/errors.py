"""One usage-error type, one exit-code table and the one-line messages of every command.

Exit codes (the README's table):

=========  ==============================================================================
0          the command did what it was asked (a run that finished is never "interrupted")
1          a failure: some inputs failed, or an unexpected error stopped the run
2          a usage error or bad input (options, vocabulary, checkpoint, environment
           variable, output folder, ``--resume`` with nothing to resume): nothing was done
128 + n    stopped by signal n: 130 SIGINT (Ctrl-C), 143 SIGTERM, 129 SIGHUP
=========  ==============================================================================
"""
from __future__ import annotations

import signal
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGHUP = 128 + 1  # 129
EXIT_SIGINT = 128 + 2  # 130, as a shell reports a Ctrl-C
EXIT_SIGTERM = 128 + 15  # 143

PROG = "sed-fast"


class UsageError(Exception):
    """A problem with the command line or its inputs: nothing is done, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: the run stops, exit code 128 + the signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(signal_name(signum))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code_of(code) -> int:
    """The exit code a ``SystemExit(code)`` (or a command's return value) stands for."""
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILED


def error(message: str, prog: str = PROG) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def warn(message: str, prog: str = PROG) -> None:
    print(f"{prog}: warning: {message}", file=sys.stderr)


def describe(problem: BaseException) -> str:
    """``problem`` in one line: for a missing or unreadable file, its reason and its name."""
    text = str(problem).strip()
    if isinstance(problem, (FileNotFoundError, IsADirectoryError, PermissionError)) and problem.filename:
        text = f"{problem.strerror or type(problem).__name__}: {problem.filename}"
    return text or type(problem).__name__


def parse_command_line(parser, argv=None):
    """``(args, None)``, or ``(None, exit code)`` once argparse has answered ``--help`` (0) or
    reported a usage error (2). ``argv``: default ``sys.argv[1:]``."""
    try:
        return parser.parse_args([str(a) for a in (sys.argv[1:] if argv is None else argv)]), None
    except SystemExit as exit_:
        return None, EXIT_OK if exit_.code in (0, None) else EXIT_USAGE
