"""SIGINT and SIGTERM as one orderly stop that leaves no trial RUNNING.

Python raises KeyboardInterrupt for SIGINT wherever the main thread happens to
be, and SIGTERM kills the process outright. Neither is safe during a study: a
KeyboardInterrupt in the middle of a storage write skips Optuna's rollback and
the trial's final state is never written; a killed process writes nothing.

While :func:`handled` is active, both signals become :class:`Interrupted`.
Inside a :func:`deferred` section (a study's trials: storage writes, Optuna's
bookkeeping) the signal is only recorded, and raised at the next check point:
:func:`raise_if_pending`, which the trainer calls before each step and the
study driver before a trial touches the data and after each finished trial,
or the end of the section. Elsewhere it is raised at once. A second signal
while stopping is ignored, so it cannot break the cleanup.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None
_deferred = 0
_in_gc = False


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the study can stop cleanly."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def exit_code(e: BaseException) -> int:
    """The exit code for an interruption (a plain KeyboardInterrupt is SIGINT's)."""
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def signal_name(e: BaseException) -> str:
    return e.name if isinstance(e, Interrupted) else "SIGINT"


def _handler(signum: int, _frame: object) -> None:
    global _pending
    if _pending is not None:
        return
    _pending = signum
    # An exception raised inside a garbage-collector callback (JAX registers one) is
    # printed and dropped; the check points raise it later instead.
    if _deferred == 0 and not _in_gc:
        raise Interrupted(signum)


def _gc_enter(phase: str, _info: dict) -> None:
    global _in_gc
    if phase == "start":
        _in_gc = True


def _gc_leave(phase: str, _info: dict) -> None:
    global _in_gc
    if phase == "stop":
        _in_gc = False


class _QuietWhileStopping(logging.Filter):
    """Optuna logs the interrupted trial's failure with a traceback; dptune says it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _pending is None


_OPTUNA_LOGGER = "optuna.study._optimize"


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` for the duration (main thread only)."""
    global _pending
    _pending = None
    quiet = _QuietWhileStopping()
    logging.getLogger(_OPTUNA_LOGGER).addFilter(quiet)
    # First and last, so that the flag covers every other callback of a collection.
    gc.callbacks.insert(0, _gc_enter)
    gc.callbacks.append(_gc_leave)
    # A signal ignored on purpose (a background job of a script ignores SIGINT) stays ignored.
    previous = {s: signal.signal(s, _handler) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        gc.callbacks.remove(_gc_enter)
        gc.callbacks.remove(_gc_leave)
        logging.getLogger(_OPTUNA_LOGGER).removeFilter(quiet)
        _pending = None


def raise_if_pending() -> None:
    """A check point: raise a signal received meanwhile. Call only where stopping is clean."""
    if _pending is not None:
        raise Interrupted(_pending)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section that a signal must not cut short: it waits for a check point or the section's end."""
    global _deferred
    if _deferred == 0:
        raise_if_pending()  # one that arrived where it could not be raised (during garbage collection)
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
    if _deferred == 0:
        raise_if_pending()
