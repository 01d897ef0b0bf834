"""SIGINT/SIGTERM as a request to stop cleanly: the trainer finishes the current optimizer
step, saves `last` and returns. A second signal interrupts at once."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], bool]):
    """`request_stop(name)` is called on the first signal; it returns False once a stop was
    already requested, and the next signal then raises KeyboardInterrupt."""
    def handler(signum, frame):
        if not request_stop(signal.Signals(signum).name):
            raise KeyboardInterrupt

    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
