"""A trial whose process dies natively (SIGABRT, as XLA's rendezvous timeout did) never stays RUNNING.

The dying trial is made by the tests' hook (tests/trial_deaths.py, installed at the objective's
``trial.training`` seam): ``os.abort()`` in the trial objective, just before training.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from dptune.config import schema as config
from dptune.search import orphans
from dptune.search.storage import backend as backend_of
from dptune.search.storage import open_storage, remember
from dptune.search.study import create_study
from tests import trial_deaths
from tests.conftest import run_cli
from tests.test_workers import make_config, trials_of

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def aborting(trial_number):
    return dict(os.environ, JAX_PLATFORMS="cpu", **trial_deaths.env(abort=trial_number))


def run(*args, env, timeout=600):
    return run_cli(*args, env=env, timeout=timeout)


def assert_failed_and_requeued(trials, number):
    dead = trials[number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["failed_reason"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
    # A WAITING trial holds its parameters as the fixed ones it will run with.
    assert len(retries) == 1 and (retries[0].params or retries[0].system_attrs["fixed_params"]) == dead.params
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    return retries[0]


@pytest.mark.parametrize("kind,reaper", [("sqlite", "show"), ("journal", "optimize")])
def test_aborted_in_process_trial_is_failed_and_requeued(tmp_path, kind, reaper):
    storage = f"sqlite:///{tmp_path / 's.db'}" if kind == "sqlite" else f"journal:///{tmp_path / 's.journal'}"
    create_study(config.load_study(make_config(tmp_path, max_epochs=1)), storage)
    p = run("optimize", "--study-name", "pool", "--storage", storage, "--n-trials", "2", env=aborting(0))
    assert p.returncode == -signal.SIGABRT, p.stderr[-2000:]
    assert [t.state for t in trials_of("pool", storage)] == [TrialState.RUNNING]  # the orphan

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if reaper == "show":
        p = run("study", "show", "--study-name", "pool", "--storage", storage, "--json", env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        summary = json.loads(p.stdout)
        assert summary["failed"] == 1 and summary["running"] == 0
        retry = assert_failed_and_requeued(trials_of("pool", storage), 0)
        assert retry.state == TrialState.WAITING
    else:
        p = run("optimize", "--study-name", "pool", "--storage", storage, "--n-trials", "1", env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        retry = assert_failed_and_requeued(trials_of("pool", storage), 0)
        assert retry.state in FINISHED  # the next optimize ran the re-queued parameters first


@pytest.mark.slow
def test_aborted_pool_worker_trial_is_failed_and_requeued_while_the_other_goes_on(tmp_path):
    storage = f"journal:///{tmp_path / 's.journal'}"
    create_study(config.load_study(make_config(tmp_path, max_epochs=1)), storage)
    p = run("optimize", "--study-name", "pool", "--storage", storage, "--workers", "2", "--n-trials", "2",
            env=aborting(1))
    assert p.returncode == 128 + signal.SIGABRT, p.stderr[-3000:]
    assert "exited with code 134" in p.stderr
    trials = trials_of("pool", storage)
    retry = assert_failed_and_requeued(trials, 1)
    assert retry.state in FINISHED and retry.user_attrs["worker"]["pid"] != trials[1].user_attrs["worker"]["pid"]
    assert len([t for t in trials if t.state in FINISHED]) >= 2


# -- the reaper itself, on both storages, without training -------------------------------------------------

def storages(tmp_path):
    return {"sqlite": f"sqlite:///{tmp_path / 'r.db'}", "journal": f"journal:///{tmp_path / 'r.journal'}"}


def orphan(storage, worker, *, private_search=False, final=False):
    """A study with one RUNNING trial that claims to run in ``worker`` (a mode's final run if ``final``)."""
    backend = open_storage(storage)
    study = remember(optuna.create_study(study_name="r", storage=backend), backend, storage)
    if private_search:
        study.set_user_attr("private_search", {"n_trials": 3})
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    trial.set_user_attr("worker", worker)
    if final:
        from dptune.search import modes

        trial.set_user_attr(modes.FINAL_ATTR, True)
    return study, trial.number


def dead_worker():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return {"host": socket.gethostname(), "pid": child.pid, "started": None}


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_reapers_racing_for_one_trial_requeue_it_once(tmp_path, kind):
    url = storages(tmp_path)[kind]
    a, number = orphan(url, dead_worker())
    b, c = (remember(optuna.load_study(study_name="r", storage=s), s, url)
            for s in (open_storage(url), open_storage(url)))
    seen_by_c = c.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    # B claims the trial between A's claim and A's FAIL: B's claim is the one that stays, so B re-queues.
    a_storage = backend_of(a).storage  # what A's reaper writes through
    fail = a_storage.set_trial_state_values

    def b_first(*args, **kwargs):
        assert orphans.reap_dead_workers(b) == [number]
        return fail(*args, **kwargs)

    a_storage.set_trial_state_values = b_first
    assert orphans.reap_dead_workers(a) == []
    # C still sees the trial RUNNING (read before either reaped): its writes are refused, it re-queues nothing.
    c.get_trials = lambda **_: seen_by_c
    assert orphans.reap_dead_workers(c) == []
    trials = optuna.load_study(study_name="r", storage=open_storage(url)).get_trials()
    assert assert_failed_and_requeued(trials, number).state == TrialState.WAITING


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_private_search_gets_no_retry(tmp_path, kind):
    url = storages(tmp_path)[kind]
    study, number = orphan(url, dead_worker(), private_search=True)
    assert orphans.reap_dead_workers(study) == [number]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL]  # counts among the K drawn trials; no extra one


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_final_run_is_failed_but_never_requeued(tmp_path, kind):
    """One finalize call claims the final run; a queued copy would be a second one no call may train."""
    url = storages(tmp_path)[kind]
    study, number = orphan(url, dead_worker(), final=True)
    assert orphans.reap_dead_workers(study) == [number]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]


def test_live_recycled_and_zombie_workers(tmp_path):
    me = orphans.worker_identity()
    assert me["started"] is not None
    study, _ = orphan(storages(tmp_path)["journal"], me)
    assert orphans.reap_dead_workers(study) == []  # alive: left alone
    for t in study.get_trials(states=(TrialState.RUNNING,)):
        # The same pid with another start time is another process: the worker is gone.
        study._storage.set_trial_user_attr(t._trial_id, "worker", dict(me, started=me["started"] - 1))
    assert len(orphans.reap_dead_workers(study)) == 1

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(600):  # until it has exited, not yet waited for
        if orphans._proc_stat(zombie.pid)[0] == "Z":
            break
        time.sleep(0.05)
    assert not orphans._alive({"pid": zombie.pid, "started": orphans._start_time(zombie.pid)})
    zombie.wait()
    assert not orphans._alive({"pid": zombie.pid})


def test_abort_hook_is_inert_outside_tests(monkeypatch):
    monkeypatch.setenv(trial_deaths.ABORT_ENV, "7")
    trial_deaths.abort_if_requested(6)  # another trial: nothing happens
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    trial_deaths.abort_if_requested(7)  # the right trial, but not under pytest: nothing happens
