"""For tests that Ctrl-C a child process."""

from __future__ import annotations

import signal


def sigint_default() -> None:
    """``preexec_fn`` of a child that a test will send SIGINT: a background job of a
    non-interactive shell inherits SIGINT ignored (POSIX), and Python then never raises
    KeyboardInterrupt, so the child starts with the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
