"""Signals: the main process alone decides how a run stops.

- Training: SIGINT/SIGTERM are a request to stop cleanly: the trainer finishes the current
  optimizer step, saves `last` and returns. A second signal interrupts at once.
- Everything else the CLI runs (prepare, synth, bench): a signal raises `Interrupted`, which
  the CLI prints as one line; finished work (probed clips, cached files) is kept.
- Worker processes (DataLoader workers, prepare's pool) ignore SIGINT/SIGTERM: a cluster's
  preemption (SIGTERM to the whole process group) or Ctrl-C in a terminal (SIGINT to the
  foreground group) reaches them too, and a worker that died of it would turn a clean stop
  into a traceback. They die with their parent instead (PR_SET_PDEATHSIG), so a SIGKILLed
  `prepare` leaves no orphan behind.
- Ranks under torchrun: torchrun starts each rank in a session of its own, so a signal to
  the launcher's process group never reaches them. Each rank gets a signal of its own
  (LAUNCHER_DIED) when the launcher dies, however it dies (`stop_with_launcher`): the group
  stop above, on every rank at once.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A rank learns of its launcher's death by a signal of its own, not SIGTERM: the kernel sends
# the parent-death signal again each time it hands the rank on to another thread of the dying
# launcher (kernel/exit.c, forget_original_parent: a live thread of the same process is tried
# first, and torchrun has several threads), so one death can arrive as several signals. As
# SIGTERM the second would read as "stop now" and abort the stop's own save (measured: in 2
# of 3 kills); as its own signal every copy is the same stop request. Its default action
# terminates, as SIGTERM's does, so a rank killed before its handlers exist still goes.
LAUNCHER_DIED = signal.SIGRTMIN + 1 if hasattr(signal, "SIGRTMIN") else signal.SIGTERM
LAUNCHER_DIED_NAME = "torchrun died"


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A signal stopped a command; its argument is the signal's name."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def _launcher_died(signum, frame):
    raise Interrupted(LAUNCHER_DIED_NAME)


def install_cli_handlers() -> None:
    """SIGINT/SIGTERM, and the launcher's death, raise Interrupted (the CLI reports it in one
    line)."""
    with contextlib.suppress(ValueError):  # not the main thread: leave them be
        for s in STOP_SIGNALS:
            signal.signal(s, _raise_interrupted)
        signal.signal(LAUNCHER_DIED, _launcher_died)


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], bool]):
    """`request_stop(name)` is called on the first signal; it returns False once a stop was
    already requested, and the next signal then raises Interrupted."""
    def handler(signum, frame):
        if not request_stop(signal.Signals(signum).name):
            raise Interrupted(signal.Signals(signum).name)

    def launcher_died(signum, frame):  # every copy of the one death: the same request
        request_stop(LAUNCHER_DIED_NAME)

    old = {}
    try:
        for s in STOP_SIGNALS:
            old[s] = signal.signal(s, handler)
        old[LAUNCHER_DIED] = signal.signal(LAUNCHER_DIED, launcher_died)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@functools.cache
def kill_workers_at_exit() -> None:
    """At interpreter exit, multiprocessing stops daemon children (DataLoader workers) with
    SIGTERM and waits for them: workers that ignore SIGTERM would hang the exit. Registered
    after multiprocessing's own hook, this one runs first (atexit runs the latest first) and
    stops them with SIGKILL, which is what SIGTERM would have done to them."""
    import multiprocessing

    def kill_daemons() -> None:
        daemons = [p for p in multiprocessing.active_children() if p.daemon]
        if daemons:
            # torch's SIGCHLD handler would report these deaths as a failed worker
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for p in daemons:
            p.kill()
        for p in daemons:
            p.join()

    atexit.register(kill_daemons)


def _death_signal(sig: int) -> bool:
    """Linux: `sig` to this process when its parent (the thread that started it) dies.
    Whether it was armed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def worker_init(*_args) -> None:
    """In a worker process: ignore SIGINT/SIGTERM (the parent decides), and die with the
    parent (Linux: SIGKILL when it goes, however it goes)."""
    parent = os.getppid()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    _death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def under_torchrun() -> bool:
    """This process is a rank torchrun's agent started (its parent is that agent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


@functools.cache
def stop_with_launcher() -> bool:
    """A rank under torchrun: LAUNCHER_DIED when the launcher dies (SIGKILL to its group, the
    OOM killer), handled as the stop every rank already handles (finish the step, agree,
    save, exit), on every rank together. Without it the ranks would train on, orphaned,
    holding the run folder. A launcher gone before this was armed (this process already
    reparented): the signal is sent at once. Call it first thing in the process; whether it
    was armed."""
    if not under_torchrun():
        return False
    launcher = os.getppid()  # before arming: after it, a change means the launcher is gone
    if not _death_signal(LAUNCHER_DIED):
        return False
    if os.getppid() != launcher:
        os.kill(os.getpid(), LAUNCHER_DIED)
    return True
