"""TEST ONLY: make a trial's process die natively, as XLA's rendezvous timeout did, or be SIGKILLed.

The hooks are observers at two :mod:`dptune.seams` points of the trial objective,
``trial.training`` (a trial about to train) and ``trial.reported`` (a trial that
reported its evaluation at a step). A test that starts ``dptune`` in a
subprocess passes :func:`env`: it puts ``tests/site`` first on ``PYTHONPATH``, so
that Python's start-up imports ``tests/site/sitecustomize.py``, which calls
:func:`install` in that process and in every worker it starts. The hooks stay
inert unless pytest runs the test that started the process (``PYTEST_CURRENT_TEST``
is inherited) and the variable names this trial.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ABORT_ENV = "DPTUNE_TEST_ONLY_ABORT_TRIAL"  # "<trial>": SIGABRT just before it trains
KILL_ENV = "DPTUNE_TEST_ONLY_KILL_TRIAL_AT_STEP"  # "<trial>:<step>": SIGKILL right after it reports that step
SITE = str(Path(__file__).resolve().parent / "site")


def env(*, abort: int | None = None, kill: str | None = None) -> dict[str, str]:
    """The variables of a subprocess whose trial ``abort`` aborts, or which ``kill`` ("trial:step") kills."""
    out = {"PYTHONPATH": os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p)}
    if abort is not None:
        out[ABORT_ENV] = str(abort)
    if kill is not None:
        out[KILL_ENV] = kill
    return out


def _under_pytest() -> bool:
    return "PYTEST_CURRENT_TEST" in os.environ


def abort_if_requested(trial_number: int) -> None:
    wanted = os.environ.get(ABORT_ENV)
    if wanted is not None and _under_pytest() and wanted.strip() == str(trial_number):
        os.abort()


def kill_if_requested(trial_number: int, step: int) -> None:
    wanted = os.environ.get(KILL_ENV)
    if wanted is not None and _under_pytest() and wanted.strip() == f"{trial_number}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    """Install the hooks in this process, where a test asked for them."""
    if not _under_pytest() or not ({ABORT_ENV, KILL_ENV} & set(os.environ)):
        return
    from dptune import seams

    seams.install("trial.training", abort_if_requested)
    seams.install("trial.reported", kill_if_requested)
