"""Optuna storages by URL, and which of them several workers may share.

* ``sqlite:///path.db`` — the default; one writer process at a time. Optuna's
  docs advise against SQLite for parallel workers ("database is locked"), so
  dptune refuses ``--workers`` > 1 on it.
* ``journal:///abs/path.journal`` (or ``journal:relative.journal``) — Optuna's
  ``JournalStorage`` over an append-only file: the default for several worker
  processes on one machine.
* ``postgresql://…`` / ``mysql://…`` — Optuna's own distributed mode: every
  machine runs ``dptune optimize`` against the same database.

RDB storages (SQLite, PostgreSQL, MySQL) get Optuna's heartbeats when a
worker runs trials: a trial whose worker stops beating for ``GRACE_SECONDS``
is failed and re-queued with the same parameters (up to ``MAX_RETRY`` times;
never in a private search). Whatever the storage, :mod:`dptune.orphans` fails
and re-queues the trials whose worker process on this host has died, without
waiting for a grace period.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from dptune.errors import DptuneError

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
MAX_RETRY = 2
CONNECT_TIMEOUT_SECONDS = 5
JOURNAL_PREFIX = "journal:"


class StorageError(DptuneError):
    """A storage URL is unusable, or unreachable."""


def kind(url: str) -> str:
    """'journal', 'sqlite', 'postgresql', 'mysql' or the URL's scheme."""
    if url.startswith(JOURNAL_PREFIX):
        return "journal"
    return url.split(":", 1)[0].split("+", 1)[0]


def _journal_path(url: str) -> str:
    rest = url[len(JOURNAL_PREFIX):]
    path = rest[2:] if rest.startswith("//") else rest
    if not path:
        raise StorageError(f"storage: {url!r} names no file; use journal:///abs/path/study.journal")
    return path


def open_storage(url: str, *, heartbeat: bool = False) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; with ``heartbeat``, RDB storages detect dead workers.

    Unreachable databases fail within ``CONNECT_TIMEOUT_SECONDS`` with a
    :class:`StorageError` rather than hanging.
    """
    k = kind(url)
    if k == "journal":
        path = _journal_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if k not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(f"storage: unsupported {url!r}; allowed: sqlite:///FILE, journal:///FILE, "
                           "postgresql://USER@HOST/DB, mysql://USER@HOST/DB")
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if k == "sqlite":
        path = url.split("sqlite:///", 1)[-1]
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if k == "postgresql":
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    if k == "mysql":
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    try:
        with warnings.catch_warnings():
            # Heartbeats are marked experimental in Optuna; the warning is not actionable for users.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            beat: dict[str, Any] = {}
            if heartbeat:
                from dptune.orphans import StaleTrialRetry  # imports this module

                beat = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS,
                        "heartbeat_stale_trial_callback": StaleTrialRetry(max_retry=MAX_RETRY)}
            return RDBStorage(url, engine_kwargs=engine, **beat)
    except Exception as e:  # SQLAlchemy's OperationalError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"storage: cannot open {url!r}: {first}") from None


def check_workers(url: str, workers: int) -> None:
    """Refuse a storage that would lose or fail writes under ``workers`` parallel processes."""
    if workers > 1 and kind(url) == "sqlite":
        raise StorageError(
            f"storage: SQLite is not safe for {workers} parallel workers (Optuna's own advice: 'database is "
            "locked' errors); use journal:///PATH/study.journal on one machine, or postgresql://... across machines"
        )
