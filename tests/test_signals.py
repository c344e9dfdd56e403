"""The shared signal handling of the commands (sed_fast.toolkit.signals): installed and restored, every
signal recorded before it acts, a swallowed KeyboardInterrupt still seen by ``check``."""
import os
import signal

import pytest

from sed_fast.toolkit.signals import SignalHandlers


def test_install_records_raises_and_restore_puts_back_the_previous_handler():
    before = signal.getsignal(signal.SIGINT)
    handlers = SignalHandlers(("SIGINT",))
    handlers.install()
    try:
        handlers.check()  # nothing came yet
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
        assert handlers.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # e.g. the first one was swallowed in a finaliser
            handlers.check()
    finally:
        handlers.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_subclass_decides_what_a_signal_does_and_knows_the_first():
    seen = []

    class Counting(SignalHandlers):
        def handle(self, signum, first):
            seen.append((signum, first))

    handlers = Counting(("SIGTERM", "NO_SUCH_SIGNAL"))  # a name this platform lacks is skipped
    handlers.install()
    try:
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        handlers.restore()
    assert seen == [(signal.SIGTERM, True), (signal.SIGTERM, False)]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_an_ignored_sighup_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        handlers = SignalHandlers(("SIGHUP",))
        handlers.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        handlers.restore()
    finally:
        signal.signal(signal.SIGHUP, previous)
