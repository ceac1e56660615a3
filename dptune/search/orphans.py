"""Trials left RUNNING by a worker process that died.

A process can die without running any Python cleanup: SIGKILL, the OOM
killer, or a native abort (XLA's rendezvous timeout on multi-device CPU runs
ended the process with SIGABRT). Its trial then stays RUNNING in the storage, and
Optuna's heartbeats, which only RDB storages have, would notice only after
their grace period, and only inside a later ``optimize``. So every trial
records the process running it (host, pid and the pid's start time, so that
a recycled pid is not mistaken for the dead worker), and
:func:`reap_dead_workers` fails the trials whose process on this host is gone
and re-queues their parameters. It runs where a death is seen first:
``dptune optimize`` before and after each trial, the pool launcher as soon as
a worker exits, and ``dptune study show``.

Several processes may reap the same trial at once (two workers, or a worker
and the launcher). Each reaper writes its own token before failing the trial;
both storages accept writes to a trial only while it is unfinished, so one
token stays, and only the reaper that reads back its own token re-queues.

Private search: the K trials drawn for the study include every trial that
ran, and a trial that died ran (it may have trained on the data up to then).
A retry would be one trial more than K, so a private-search study gets no
retry: the failed trial keeps its place among the K.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from dptune.search import modes, record
from dptune.search.storage import MAX_RETRY, backend

WORKER_ATTR = record.WORKER


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (None where there is no /proc entry)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; it ends at the last ')'.
    return text.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: start time in clock ticks


def worker_identity() -> dict[str, Any]:
    """What a trial records about the process that runs it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}


def _alive(worker: dict[str, Any]) -> bool:
    pid = int(worker.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process holds the pid: decided by its start time below
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc here: the pid is all there is to go by
    if fields[0] == "Z":
        return False  # dead, not yet waited for by its parent
    started = worker.get("started")
    return started is None or int(fields[19]) == int(started)


def _retry(study: optuna.Study, t: FrozenTrial) -> None:
    if study.user_attrs.get(record.PRIVATE_SEARCH) is not None:
        return  # see the module docstring: a retry would exceed the K drawn trials
    if modes.is_final(t) or record.AUDIT_OF in t.user_attrs:
        return  # one finalize or audit command runs it; a queued copy would be a run nobody asked for
    origin = t.user_attrs.get(record.RETRY_OF, t.number)
    retries = int(t.user_attrs.get(record.RETRIES, 0))
    if retries < MAX_RETRY:
        study.enqueue_trial(dict(t.params), user_attrs={record.RETRY_OF: origin, record.RETRIES: retries + 1},
                            skip_if_exists=False)


def reap_dead_workers(study: optuna.Study, storage_url: str | None = None) -> list[int]:
    """Fail the RUNNING trials whose worker process on this host has died, and re-queue them.

    A re-queued trial runs again with the same parameters, at most
    ``MAX_RETRY`` times per original (never in a private search). Trials run
    by other hosts are left to Optuna's heartbeats (RDB storages). Returns the
    numbers of the trials this call failed.
    """
    host = socket.gethostname()
    b = backend(study, storage_url)
    storage = b.storage
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR) or {}
        if worker.get("host") != host or _alive(worker):
            continue
        token = uuid.uuid4().hex
        trial_id = b.trial_id(t.number)
        try:
            storage.set_trial_user_attr(trial_id, record.FAILED_REASON, f"worker process {worker.get('pid')} died")
            storage.set_trial_user_attr(trial_id, record.REAPED_BY, token)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass  # another reaper finished it first; the token read back says which one re-queues
        now = storage.get_trial(trial_id)
        if now.state == TrialState.FAIL and now.user_attrs.get(record.REAPED_BY) == token:
            failed.append(t.number)
            _retry(study, t)
    return failed


class StaleTrialRetry:
    """Optuna's heartbeat retry for RDB storages, except in a private search (no trial beyond K) and for a
    mode's final run (claimed once, by one finalize call)."""

    def __init__(self, max_retry: int = MAX_RETRY):
        self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if study.user_attrs.get(record.PRIVATE_SEARCH) is None and not modes.is_final(trial):
            self._retry(study, trial)
