"""A cheaper-tuning study's final run (``dptune study finalize``), beside the study driver.

The final run is claimed in the storage before any data is read
(:func:`dptune.search.proxy.claim_final`), waits for the trials numbered
before it, then trains as one more trial of the study with the best proxy's
hyperparameters, transferred by the mode's rule (:func:`dptune.search.modes.final_plan`).
It imports the driver and the proxies; neither imports it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, cast

import optuna
from optuna.trial import TrialState

from dptune import interrupt
from dptune.config.schema import ResolvedStudy, default_storage
from dptune.errors import StudyError
from dptune.progress import Event, Reporter
from dptune.search import modes, proxy, record, release
from dptune.search import storage as storage_lib
from dptune.search import study as driver
from dptune.search.objective import Objective
from dptune.search.orphans import reap_dead_workers
from dptune.search.record import StudyRecord
from dptune.trainer.run import dataset_of

FINAL_WAIT_SECONDS = 3600.0  # how long finalize waits for trials numbered before its final run to finish
POLL_SECONDS = 1.0


def finalize(study: optuna.Study | str, storage: str | None = None, *,
             wait_seconds: float = FINAL_WAIT_SECONDS, progress: Reporter | None = None) -> optuna.Study:
    r"""Run the final run of a cheaper-tuning study: the best proxy's hyperparameters, transferred, on the private data.

    The final run is a trial of the same study (user attribute ``final_run``),
    so that its spend is recorded and composed like every other trial's; its
    model is the one the study keeps and releases. It is claimed in the storage
    (:func:`dptune.search.proxy.claim_final`) before any data is read: of two calls at once exactly
    one trains, the other is refused. The claim closes the study to proxies;
    the final run then waits for the trials numbered before it, which may have
    passed that gate, to finish, so that the released model's lineage holds
    them. Subset tuning's secret is deleted once the final run is recorded.

    Args:
      study: the study or its name.
      storage: its storage URL (default: where it was opened).
      wait_seconds: how long to wait for earlier trials still running before giving the claim up.
      progress: receives the final run's :class:`dptune.progress.Event`\ s (waiting, steps, validations).

    Returns:
      The study, with the final run finished.

    Raises:
      StudyError: no mode, or no completed proxy yet.
      FinalizeRefused: a final run is recorded or running, or earlier trials did not finish in time
        (nothing read the data).

    Guarantee: the search's ε (:func:`dptune.search.results.search_guarantee`) is then the RDP
    composition of every proxy that read the private training split and of every final run that did.
    """
    name = study.study_name if isinstance(study, optuna.Study) else study
    url = (driver.storage_url(study, storage) if isinstance(study, optuna.Study) else storage) or \
        default_storage(name)
    loaded, resolved = driver.load(name, url, heartbeat=True)
    with interrupt.deferred(), storage_lib.writing(url):
        reap_dead_workers(loaded)  # a final run whose process died here no longer holds the study
    plan, source = _transferred(loaded, resolved)
    objective = _final_objective(loaded, resolved, url)  # the data and model are checked before any write
    objective.progress = progress
    # As optimize runs its trials: a signal waits for a check point, so that it never cuts a storage write short.
    with interrupt.deferred(), storage_lib.writing(url):
        claimed = proxy.claim_final(loaded, plan, source)
        _planned_once(loaded, claimed.number)
        if progress is not None:
            progress(Event("phase", {"phase": "waiting for trials that started before this final run",
                                     "trial": claimed.number}))
        with _heartbeat(loaded, claimed.number):
            _train_claimed(loaded, objective, claimed.number, url, wait_seconds)
    return driver.load_study(name, url)


def _transferred(study: optuna.Study, resolved: ResolvedStudy) -> tuple[dict[str, Any], int]:
    """The final run's plan and the proxy it comes from, or why there is none (nothing is written)."""
    name = study.study_name
    rec = StudyRecord.of(study)
    mode = rec.search_mode
    if mode is None:
        raise StudyError(f"study_name: {name!r} has no search mode (search: {{mode: …}}); its best trial is its "
                         "result")
    trials = study.get_trials(deepcopy=False)
    held = modes.holding_final(trials)
    if held is not None:
        raise proxy.FinalizeRefused(f"study_name: {name!r} is finalized already: trial {held.number} is its final run "
                              f"({held.state.name.lower()})")
    winner = modes.best_proxy(trials)
    if winner is None:
        raise StudyError(f"study_name: {name!r} has no completed proxy trial yet; run dptune optimize first")
    cfg = resolved.study
    assert cfg.privacy is not None  # a mode needs one (checked at create)
    # A total budget's final run is planned (its σ is the plan's); the budget here is a per-trial ε's.
    epsilon = cfg.privacy.epsilon if cfg.privacy.epsilon is not None else float(rec.epsilon_target or math.nan)
    plan = modes.final_plan(mode, winner, epsilon, float(cast(float, rec.delta)), cfg.privacy.accountant)
    if not math.isfinite(plan["hparams"]["noise_multiplier"]):
        raise StudyError("final_plan: the transferred run cannot meet the budget")
    return plan, winner.number


def _planned_once(study: optuna.Study, number: int) -> None:
    """Under a total budget the plan holds one final run: refuse (and release) the claim ``number`` if an earlier
    final run already read the data (one that failed after reading counts, and no second one is planned).

    Raises:
      FinalizeRefused: an earlier final run read the data.
    """
    if StudyRecord.of(study).total_budget is None:
        return
    ran = [t.number for t in study.get_trials(deepcopy=False)
           if modes.is_final(t) and t.number < number and record.touched_data(t)]
    if ran:
        proxy._refuse(study, number, f"the total budget's plan holds one final run, and trial {ran[0]} read the data")
        raise proxy.FinalizeRefused(f"study_name: {study.study_name!r}: its planned final run (trial {ran[0]}) "
                                    "already read the data; the total budget holds no second one")


def _final_objective(study: optuna.Study, resolved: ResolvedStudy, url: str) -> Any:
    """The objective that trains the final run, set up as :func:`dptune.search.study.optimize` sets up its own."""
    dataset = dataset_of(resolved.study)
    rec = StudyRecord.of(study)
    if rec.split != dataset.split.as_dict():
        raise StudyError(f"dataset: {resolved.study.dataset!r} is not what it was when the study was created; "
                         "create a new study")
    objective = Objective(resolved, dataset, rec.delta, prior=rec.prior, total_budget=rec.total_budget)
    objective.resolved_checkpoint = rec.init_checkpoint_sha
    objective.storage_url = url
    objective.study_id = release.study_id(study, url)
    objective.mode = driver.mode_runner(objective, study, url)
    return objective


def _train_claimed(study: optuna.Study, objective: Any, number: int, url: str, wait_seconds: float) -> None:
    """Train the claimed final run ``number`` once no earlier trial runs; give the claim up if that never comes."""
    try:
        _wait_for_earlier(study, number, wait_seconds)
    except BaseException as e:
        proxy._refuse(study, number, f"given up before training: {e}")
        raise
    objective.mode.claimed = number
    try:
        _run_final(study, objective, number, url)
    finally:
        objective.mode.kind.after_final(release.folder_of(study, url))


def _wait_for_earlier(study: optuna.Study, number: int, seconds: float) -> None:
    """Wait until no trial numbered before ``number`` runs: each may have passed the gate before the claim.

    Raises:
      FinalizeRefused: some still run after ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while True:
        with interrupt.deferred(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            reap_dead_workers(study)
            optuna.storages.fail_stale_trials(study)  # RDB heartbeats: a worker gone on another machine
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number < number]
        if not running:
            return
        if time.monotonic() >= deadline:
            raise proxy.FinalizeRefused(f"trials {running} were still running after {seconds:g} s; no proxy starts any "
                                  "more: finalize again once they have finished")
        interrupt.raise_if_pending()
        time.sleep(POLL_SECONDS)


def _run_final(study: optuna.Study, objective: Any, number: int, url: str) -> None:
    """Train the claimed trial ``number`` with ``objective``, record its outcome, keep its model.

    Optuna's own trial loop cannot be handed a given trial, and its queue is what two processes can both take a
    trial from; this is that loop for one trial (its failure is recorded, then raised).
    """
    b = storage_lib.backend(study)
    trial_id = b.trial_id(number)
    trial = optuna.Trial(study, trial_id)
    value, state = None, TrialState.FAIL
    try:
        value, state = objective(trial), TrialState.COMPLETE
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except BaseException as e:
        trial.set_user_attr(record.FAILED_REASON, f"{type(e).__name__}: {e}".strip())
        raise
    finally:
        study.tell(trial, value, state=state, skip_if_finished=True)
        release.keep_best(study, b.storage.get_trial(trial_id), url)


@contextlib.contextmanager
def _heartbeat(study: optuna.Study, number: int) -> Iterator[None]:
    """Beat for trial ``number`` as Optuna beats for the trials it runs (RDB storages with heartbeats only)."""
    b = storage_lib.backend(study)
    storage = b.storage
    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.get_heartbeat_interval():
        yield
        return
    interval = storage.get_heartbeat_interval()
    trial_id = b.trial_id(number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"dptune-heartbeat-{number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
