"""Signal handlers a command installs while it runs and restores when it ends.

:class:`SignalHandlers` does the installing and restoring for every command (only the main thread
can install: elsewhere the default handling stays; a SIGHUP ignored by ``nohup`` stays ignored);
each command says what a signal does by overriding :meth:`SignalHandlers.handle`. Every handler
records the signal in ``received`` before acting on it, so that a command can also look after a
KeyboardInterrupt that Python swallowed ("Exception ignored in ...": raised while a finaliser or a
weakref callback ran) with :meth:`SignalHandlers.check`.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Dict, Optional, Sequence

from .errors import Interrupted

#: The signals that stop a command: each exits 128 + its number once the command has saved its work.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class SignalHandlers:
    """Install with :meth:`install`, undo with :meth:`restore`; ``names`` are the signals handled
    (those this platform lacks are skipped)."""

    def __init__(self, names: Sequence[str] = ("SIGINT",)):
        self.names = tuple(names)
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> None:
        for name in self.names:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                if name == "SIGHUP" and signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # nohup: the terminal closing must not stop the run
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):  # not the main thread: the default handling stays
                pass

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler)
            except (ValueError, OSError, TypeError):
                pass
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        first = self.received is None
        self.received = signum
        self.handle(signum, first)

    def handle(self, signum: int, first: bool) -> None:
        """What a signal does; ``first``: no signal came before it. Default: KeyboardInterrupt."""
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came (its own exception may have been swallowed)."""
        if self.received is not None:
            raise KeyboardInterrupt


class StopSignals(SignalHandlers):
    """SIGINT, SIGTERM and SIGHUP raise :class:`~sed_fast.toolkit.errors.Interrupted` in the main
    thread; inside :meth:`deferred` they wait until the block ends, so that a group of file writes
    (an image's outputs and the summary, a state file) is never cut halfway."""

    def __init__(self):
        super().__init__(STOP_SIGNALS)
        self.depth = 0
        self.pending: Optional[int] = None
        self.late: Optional[int] = None  # a signal that came while the last outputs were written

    def handle(self, signum: int, first: bool) -> None:
        if self.depth:
            if self.pending is None:
                self.pending = signum
            return
        raise Interrupted(signum)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came and its exception was swallowed."""
        if self.received is not None and not self.depth:
            raise Interrupted(self.received)

    def deferred(self):
        """A block in which the stop signals wait; one that came takes effect when it ends."""
        return self._held(finished=False)

    def finishing(self):
        """Hold the stop signals back while the command writes its last outputs: one that comes
        then does not stop it (it has finished: exit 0, never "interrupted") and is kept in
        :attr:`late` for the command to say so."""
        return self._held(finished=True)

    @contextlib.contextmanager
    def _held(self, finished: bool):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                if not finished:
                    raise Interrupted(signum)
                self.late = signum
