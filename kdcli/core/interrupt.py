"""Ctrl-C and SIGTERM: a first signal during training asks the loop to finish its step, save a
training state and stop; outside training, or at the second signal, the run stops at once.

Stopping raises `Interrupted` (a KeyboardInterrupt), which the app turns into metrics.json
`status: interrupted`, a hint on how to resume, and exit code 128 + signal number (130 for
SIGINT, 143 for SIGTERM). Files are only ever replaced by renames, so stopping at once never
leaves a half-written one.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from kdcli.core import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    requested: int | None = None  # the first signal received while training
    training = False  # inside a training loop that checks `requested` after each step
    stopping = False  # the run is ending because of a signal
    raised: int | None = None  # the signal whose Interrupted was raised (a library may wrap it in its own error)


def requested() -> int | None:
    return _State.requested


def _handler(signum, frame) -> None:
    if _State.training and _State.requested is None:
        _State.requested = signum
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: finishing the current step and saving the training state (again to stop now)\n")
        return
    _State.raised = signum
    raise Interrupted(signum)


def raised() -> int | None:
    """The signal that stopped this run, even where a library caught its Interrupted and raised an
    error of its own instead (torch.export does: "Failed to export the model")."""
    return _State.raised


@contextlib.contextmanager
def handled():
    """Install the handlers for the duration of a run (main thread only; elsewhere, e.g. in a
    launcher's worker thread, signals keep their default behaviour)."""
    try:
        previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    _State.requested, _State.training, _State.stopping, _State.raised = None, False, False, None
    try:
        yield
    finally:
        if not _State.stopping:  # a stopping process keeps ignoring signals until it has exited
            for s, h in previous.items():
                signal.signal(s, h)
        _State.requested, _State.training, _State.raised = None, False, None


def stopping() -> None:
    """The run is ending on a signal: further signals must not cut its last writes short, nor
    turn its exit into a traceback."""
    _State.stopping = True
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def training():
    """Mark a training loop: a first signal in it only sets `requested()`."""
    _State.training = True
    try:
        yield
    finally:
        _State.training = False


def requested_anywhere() -> int | None:
    """The signal received by this process or, under several processes, by any of them: they all
    stop at the same step (every rank calls this at the same points)."""
    if not distributed.active():
        return _State.requested
    # The decision is the reduced value alone: a signal landing after the reduction waits for the next
    signum = distributed.most(_State.requested or 0)
    if signum and _State.requested is None:
        _State.requested = signum
    return signum or None


def check() -> None:
    """Raise Interrupted if a signal was received, here or by another rank (the loop calls this at
    a safe point)."""
    signum = requested_anywhere()
    if signum is not None:
        raise Interrupted(signum)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: loader processes leave Ctrl-C and SIGTERM to the training
    process, which stops them when it is done (a terminal sends Ctrl-C to the whole group)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
