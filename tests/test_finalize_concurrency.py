"""The final run of a search mode happens once: two finalize calls at once train one final run on every storage,
the loser is refused before it reads anything, and the final run waits for the proxies that started before it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

import dptune
from dptune.privacy import accounting as privacy
from dptune.search import modes, proxy, results
from dptune.search.space import Infeasible
from dptune.search.study import load
from dptune.trainer.run import dataset_of
from dptune.trainer.train import PrivacyBudget
from tests.test_tuning_modes import EPS, _config
from tests.test_workers import postgres  # noqa: F401  (the throw-away PostgreSQL server, by name)


class Stopped(Exception):
    """What the stand-in for training raises once it has been reached."""


def _proxy_attrs(n: int, delta: float) -> dict:
    """A scaled (k = 4) proxy's attributes, as ModeRunner.setup and the objective record them."""
    steps = math.ceil(n / 256)  # one epoch at q = 256/N
    sigma = privacy.noise_for_epsilon(256 / n, steps, EPS, delta, "pld")
    full = {"batch_size": 256, "sampling_rate": 256 / n, "noise_multiplier": sigma, "steps": steps, "epochs": 1}
    return {modes.PROXY_ATTR: True, modes.FULL_SCALE_ATTR: full, "learning_rate": 1.0, "clip_norm": 1.0,
            "optimizer": "momentum", "momentum": 0.9, "ema_decay": 0.0, "trainable": "all", "touched_data": True,
            "batch_size": 64, "sampling_rate": 64 / n, "noise_multiplier": sigma / 4, "steps": steps,
            "planned_steps": steps}


def _study(storage: str, tmp_path) -> optuna.Study:
    """A scaled study on digits with two finished proxies (recorded, not trained: only the final run matters)."""
    config = _config("race", {"mode": "scaled", "factor": 4}, artifacts={"path": str(tmp_path / "art")},
                     private_seed=None)
    study = dptune.create_study(config, storage=storage)
    n, delta = study.user_attrs["split"]["train"], study.user_attrs["delta"]
    for value in (0.5, 0.6):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs=_proxy_attrs(n, delta)))
    return study


def _storage(kind: str, tmp_path, request) -> str:
    if kind == "postgresql":
        return request.getfixturevalue("postgres")
    return {"sqlite": f"sqlite:///{tmp_path}/s.db", "journal": f"journal:///{tmp_path}/s.journal"}[kind]


@pytest.fixture
def training(monkeypatch):
    """Training replaced by a stand-in that counts who reached the data, lets a rival run meanwhile, and stops."""
    calls: list[int] = []
    lock = threading.Lock()

    def reached(*_args, **_kwargs):
        with lock:
            calls.append(threading.get_ident())
        time.sleep(1.0)
        raise Stopped("the test stops the final run here")

    monkeypatch.setattr("dptune.search.objective.train_and_evaluate", reached)
    return calls


def _runner(storage: str, folder: str) -> proxy.ModeRunner:
    """A worker's ModeRunner, as dptune optimize builds it."""
    loaded, resolved = load("race", storage)
    return proxy.ModeRunner(resolved, dataset_of(resolved.study), PrivacyBudget(EPS, loaded.user_attrs["delta"]),
                            loaded.user_attrs[modes.MODE_ATTR], "race", folder)


def _together(monkeypatch, parties: int) -> threading.local:
    """Hold every finalize call after it checked that the study is not finalized, until all have: the worst case."""
    barrier = threading.Barrier(parties)
    mine = threading.local()
    original = modes.best_proxy

    def best_proxy(trials):
        if getattr(mine, "finalizing", False):
            mine.finalizing = False
            barrier.wait(timeout=120)
        return original(trials)

    monkeypatch.setattr(modes, "best_proxy", best_proxy)
    return mine


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_two_finalize_calls_at_once_train_one_final_run(kind, tmp_path, request, monkeypatch, training):
    storage = _storage(kind, tmp_path, request)
    _study(storage, tmp_path)
    mine = _together(monkeypatch, 2)
    outcomes: list[BaseException | None] = []

    def call() -> None:
        mine.finalizing = True
        try:
            dptune.finalize("race", storage)
            outcomes.append(None)
        except BaseException as e:  # noqa: BLE001 (each outcome is checked below)
            outcomes.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(training) == 1, outcomes  # exactly one call reached the data
    assert sorted(type(e).__name__ for e in outcomes) == ["FinalizeRefused", "Stopped"]
    refused = next(e for e in outcomes if isinstance(e, dptune.StudyError))
    assert "another finalize claimed the final run first" in str(refused) and "\n" not in str(refused)
    study = dptune.load_study("race", storage)
    finals = [t for t in study.trials if modes.is_final(t)]
    touched = [t for t in finals if results.touched_data(t)]
    assert len(finals) == 2 and len(touched) == 1
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    loser = next(t for t in finals if t is not touched[0])
    assert loser.state == TrialState.PRUNED and loser.user_attrs["touched_data"] is False
    # The one that trained is counted (it failed, at its planned steps); the refused one costs nothing.
    g = results.search_guarantee(study)
    assert g["trials_touching_data"] == 3
    # A third call finds the study's final run place free again only because the winner failed: it may claim it.
    assert modes.holding_final(study.trials) is None


def test_a_proxy_running_when_finalize_claims_is_waited_for_and_later_ones_are_refused(tmp_path, monkeypatch,
                                                                                      training):
    storage = f"sqlite:///{tmp_path}/s.db"
    study = _study(storage, tmp_path)
    # A proxy that passed the gate (no final run yet) and has not read the data yet.
    late = study.ask()
    late.set_user_attr(modes.PROXY_ATTR, True)
    late.set_user_attr("touched_data", False)
    seen: dict[str, object] = {}

    def when_training(*_args, **_kwargs):
        seen["late"] = dptune.load_study("race", storage).trials[late.number].state
        raise Stopped("the test stops the final run here")

    monkeypatch.setattr("dptune.search.objective.train_and_evaluate", when_training)
    done = threading.Event()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            dptune.finalize("race", storage)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)
        done.set()

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not done.is_set() and not any(
            modes.is_final(t) for t in dptune.load_study("race", storage).trials):
        time.sleep(0.2)
    time.sleep(3)  # time enough to start training, were it not waiting for the proxy
    if not done.is_set():  # the claim closed the gate: a proxy numbered after the final run reads nothing
        runner = _runner(storage, str(tmp_path))
        with pytest.raises(Infeasible, match="finalized"):
            runner.setup(load("race", storage)[0].ask())
    # The late proxy reads the data and finishes; only then may the final run train.
    n, delta = study.user_attrs["split"]["train"], study.user_attrs["delta"]
    for key, value in _proxy_attrs(n, delta).items():
        late.set_user_attr(key, value)
    study.tell(late, 0.4)
    thread.join(timeout=120)
    assert seen.get("late") == TrialState.COMPLETE
    assert [type(e).__name__ for e in outcome] == ["Stopped"]


def test_the_claim_is_one_storage_write_and_a_queued_final_run_never_trains(tmp_path):
    storage = f"journal:///{tmp_path}/s.journal"
    study = _study(storage, tmp_path)
    plan = {"hparams": {"batch_size": 256, "learning_rate": 1.0}, "steps": 6, "sampling_rate": 0.2}
    first = proxy.claim_final(study, plan, 1)
    assert first.state == TrialState.RUNNING and modes.is_final(first)
    with pytest.raises(proxy.FinalizeRefused, match=f"trial {first.number}"):
        proxy.claim_final(study, plan, 1)
    # A copy queued by Optuna's heartbeat retry carries the final run's attributes: it is refused when taken.
    loaded = load("race", storage)[0]
    loaded.enqueue_trial({}, user_attrs=dict(first.user_attrs))
    with pytest.raises(Infeasible, match="finalize call that claimed it"):
        _runner(storage, str(tmp_path)).setup(loaded.ask())


@pytest.mark.slow  # two CLI processes train
def test_two_finalize_commands_at_once_one_trains_the_other_exits_2_in_one_line(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    _study(storage, tmp_path)
    command = [sys.executable, "-m", "dptune.cli", "study", "finalize", "race", "--storage", storage, "--json"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(o[1] for p, o in zip(procs, outs, strict=True) if p.returncode == 2).strip()
    assert err.count("\n") == 0 and ("claimed the final run first" in err or "finalized already" in err)
    study = dptune.load_study("race", storage)
    touched = [t for t in study.trials if modes.is_final(t) and results.touched_data(t)]
    assert len(touched) == 1 and touched[0].state == TrialState.COMPLETE
    # The released model is that final run's, and its lineage carries every run that read the data.
    summary = results.summarize(study)
    assert summary.best is not None and summary.best["number"] == touched[0].number
    assert summary.search["trials_touching_data"] == 3
    shown = json.loads(next(o[0] for p, o in zip(procs, outs, strict=True) if p.returncode == 0))
    assert shown["search"]["final"]["trial"] == touched[0].number


def test_finalize_gives_its_claim_up_when_earlier_trials_run_too_long(tmp_path, training):
    storage = f"journal:///{tmp_path}/s.journal"
    study = _study(storage, tmp_path)
    running = study.ask()  # a proxy still running (its worker is elsewhere)
    with pytest.raises(proxy.FinalizeRefused, match=rf"trials \[{running.number}\] were still running"):
        dptune.finalize("race", storage, wait_seconds=0)
    assert training == []
    (given_up,) = [t for t in dptune.load_study("race", storage).trials if modes.is_final(t)]
    assert given_up.state == TrialState.PRUNED and given_up.user_attrs["touched_data"] is False
    assert modes.holding_final([given_up]) is None  # a later finalize may claim the final run
