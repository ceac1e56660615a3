"""The objective: one trial, from sampled hyperparameters to a trained, recorded, released run.

Each trial samples hyperparameters and derives steps or σ from the budget
(:func:`dptune.search.space.plan_trial`; an infeasible sample is PRUNED with
``rejected_reason`` and ε spent 0 — it never touched data), sets
``touched_data`` just before it reads the training data (the search's privacy
counts exactly those trials), trains with
:func:`dptune.trainer.train.train_and_evaluate` reporting validation accuracy
at each evaluation, and records what ran as user attributes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import jax
import optuna
from optuna.trial import FrozenTrial

from dptune import interrupt, seams
from dptune.config.schema import ResolvedStudy, default_storage
from dptune.data.datasets import Dataset
from dptune.errors import StudyError
from dptune.models import checkpoint
from dptune.privacy.mechanism import Mechanism, mechanisms
from dptune.privacy.search_totals import RenyiFilter
from dptune.progress import Reporter
from dptune.randomness import SecretSeed
from dptune.search import orphans, record, regimes, release
from dptune.search.record import ResumeLink, StudyRecord
from dptune.search.regimes import Regime, Skip, regime_of
from dptune.search.space import Infeasible, TrialPlan, plan_trial, smallest_batch
from dptune.search.spends import attempt_origin, linked
from dptune.trainer import microbatch
from dptune.trainer.resume import Checkpointer, ReplayDiverged
from dptune.trainer.run import check_model, run_config
from dptune.trainer.train import PrivacyBudget, RunConfig, train_and_evaluate


def replay_expectations(trials: Sequence[FrozenTrial], number: int, origin: int, writer: int | None,
                        step: int) -> dict[int, str]:
    """{step: parameter digest} that a retry resuming a checkpoint must reproduce before it reports anything.

    The checkpoint (after ``step`` steps, written by attempt ``writer``) holds
    one run's state and secret. Outputs of that run after ``step`` were
    released by the writer, by every later attempt of the same trial, and by
    every attempt the writer itself continued by replaying (its ``resumed_from``
    links marked "replayed", followed back to the first "fresh" link or the
    first attempt): all their reported digests after ``step`` are expected.

    Args:
      trials: the study's trials.
      number: the resuming trial's number (left out).
      origin: its first attempt's number.
      writer: the trial that wrote the checkpoint (None: unknown, every attempt of the trial).
      step: the checkpoint's step.

    Returns:
      The expected digests; a conflict between two attempts keeps one of them,
      which can only make the replay diverge (and count apart), never hide a release.
    """
    by_number = {t.number: t for t in trials}
    sources = {t.number for t in trials if t.number != number and attempt_origin(t) == origin
               and (writer is None or t.number >= int(writer))}
    current = by_number.get(int(writer)) if writer is not None else None
    while current is not None and (hop := linked(current, by_number)) is not None:
        dead, link = hop
        if not link.replayed or dead.number in sources:
            break  # a fresh restart began another run: what came before it is not this run's output
        sources.add(dead.number)
        current = dead
    expected: dict[int, str] = {}
    for n in sorted(sources):
        for k, v in (record.get(by_number[n], record.REPLAY_DIGESTS) or {}).items():
            if int(k) > step:
                expected[int(k)] = v
    return expected


@dataclass
class _Trial:
    """One trial's plan and where it trains: the data, the budget, a mode's setup (None outside a mode)."""

    plan: TrialPlan
    dataset: Dataset
    budget: PrivacyBudget | None
    setup: Any = None

    @property
    def final(self) -> bool:
        return self.setup is not None and self.setup.final


class _Reports:
    """What a trial reports while it trains: validation readings, and the digests a resumed attempt must match."""

    def __init__(self, trial: optuna.Trial, final: bool):
        self.trial, self.final = trial, final
        self.readings: list[float] = []
        self.digests: dict[str, str] = {}
        self.checkpointer: Checkpointer | None = None

    def reading(self, value: float) -> None:
        self.readings.append(value)
        # A final run is never pruned, and its curve (of a model trained on all of the data) is not
        # reported where the pruner and the sampler of proxies could read it.
        if not self.final:
            self.trial.report(value, len(self.readings))

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        c = self.checkpointer
        if c is not None and c.last_digest is not None:
            # Written before the report: a resumed attempt checks its replay against what was released.
            self.digests[str(step)] = c.last_digest[1]
            self.trial.set_user_attr(record.REPLAY_DIGESTS, dict(self.digests))
            self.trial.set_user_attr(record.PROGRESS_STEPS, step)
        # With averaging on, the better of raw and EMA parameters is what the trial would release.
        self.reading(metrics["best_val_accuracy"])
        seams.reached("trial.reported", self.trial.number, step)
        return not self.final and self.trial.should_prune()


class Objective:
    """The per-trial function handed to ``study.optimize``: plan the trial under the regime, train, record."""

    def __init__(self, resolved: ResolvedStudy, dataset: Dataset, delta: float | None,
                 private_search: dict[str, Any] | None = None, search_budget: dict[str, float] | None = None,
                 prior: Sequence[Sequence[float]] = (), total_budget: dict[str, Any] | None = None):
        self.resolved = resolved
        self.dataset = dataset
        cfg = resolved.study
        self.prior = list(mechanisms(prior))
        self.regime: Regime = regime_of(StudyRecord.read({
            record.DELTA: delta, record.PRIOR_EVENTS: [list(m) for m in self.prior],
            **record.regime_attrs(private_search=private_search, non_private=cfg.non_private,
                                  epsilon_target=None if cfg.privacy is None else cfg.privacy.epsilon,
                                  accountant=None if cfg.privacy is None else cfg.privacy.accountant,
                                  search_budget=search_budget, total_budget=total_budget)}))
        terms = self.regime.terms
        self.fixed = terms.fixed
        self.budget = None if terms.budget is None else PrivacyBudget(*terms.budget)
        self.resolved_checkpoint: str | None = None
        self.storage_url: str | None = None  # set by optimize: where the study's private folder is
        # Set by optimize: the study's random id, so that a fixed private_seed gives a study created again under
        # the same name other streams (two studies on one noise could cancel it between their releases).
        self.study_id = ""
        self.progress: Reporter | None = None  # set by optimize: where a trial's progress events go
        self.mode: Any = None  # a dptune.search.proxy.ModeRunner for a study with search: {mode: …}
        self._microbatch: int | None = None if cfg.microbatch_size == "auto" else cfg.microbatch_size
        # A user's model is checked in every worker: its code may have changed since the study was created.
        check_model(cfg, dataset)

    @property
    def secret_count(self) -> bool:
        """Whether the number of trials is secret: nothing may then differ from trial to trial by its number."""
        return self.regime.secret_count

    def _progress_of(self, trial: optuna.Trial) -> Reporter | None:
        """The trial's progress events, tagged with its number; none when the trial count is secret."""
        report = self.progress
        if report is None or self.secret_count:
            return None
        return lambda event: report(event.tagged(trial=trial.number))

    def microbatch_size(self) -> int:
        """The study's microbatch, measured once per worker (and cached on disk) when set to ``auto``."""
        if self._microbatch is None:
            cfg = self.resolved.study
            upper = smallest_batch(self.resolved.space, len(self.dataset.train))
            self._microbatch = microbatch.choose(
                cfg.model, self.dataset.image_shape, self.dataset.num_classes, jax.local_devices(),
                weight_standardization=cfg.weight_standardization, clipping=cfg.clipping, upper=upper,
                model_args=cfg.model_args, input_dtype=self.dataset.input_dtype, loss=cfg.loss,
            ).microbatch_size
            check_model(cfg, self.dataset, self._microbatch)  # a user's model, at the size it will run
        return self._microbatch

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except KeyboardInterrupt as e:
            # Optuna marks the trial FAIL; the reason says it was stopped, not broken.
            trial.set_user_attr(record.FAILED_REASON, f"interrupted by {interrupt.signal_name(e)}")
            raise

    def _run(self, trial: optuna.Trial) -> float:
        """Plan the trial under the study's regime, admit it, train it, record what ran."""
        self._start(trial)
        planned = self._plan(trial)
        refusal = self._admit(trial, planned.plan)
        if refusal is not None:
            trial.study.stop()
            raise optuna.TrialPruned(refusal)
        return self._train(trial, planned)

    def _start(self, trial: optuna.Trial) -> None:
        """Reset what a retry inherited, and stop here if the regime runs no such trial."""
        trial.set_user_attr(record.WORKER, orphans.worker_identity())
        # False until the data is read (a re-queued retry also starts with its failed parent's attributes).
        trial.set_user_attr(record.TOUCHED_DATA, False)
        if record.get(trial, record.FILTER_ADMITTED) is not None:
            trial.set_user_attr(record.FILTER_ADMITTED, None)
        for key in record.RESUME_ATTRS:  # a heartbeat retry inherits its parent's; this attempt has done nothing yet
            if record.get(trial, key) is not None:
                trial.set_user_attr(key, None)
        try:
            if not record.is_final(trial):  # a final run is claimed in the storage (dptune.search.proxy.claim_final)
                self.regime.plan(trial.number)
        except Skip as e:
            trial.set_user_attr(record.SKIPPED_REASON, str(e))
            trial.study.stop()
            raise optuna.TrialPruned(f"{e}: no trials left") from None
        if self.budget is not None:
            record.set_all(trial, record.budget_attrs(self.budget.epsilon, self.budget.delta, self.budget.accountant))

    def _plan(self, trial: optuna.Trial) -> _Trial:
        """The trial's hyperparameters and length, or PRUNED with the reason it cannot train (no data read)."""
        cfg = self.resolved.study
        try:
            if self.mode is not None:  # a mode's proxy or final run plans its own data and budget
                setup = self.mode.setup(trial)
                planned = _Trial(setup.plan, setup.dataset, setup.budget, setup)
                trial.set_user_attr(record.EPSILON_TARGET, setup.budget.epsilon)
                record.set_all(trial, setup.attrs)
            else:
                plan = plan_trial(trial, self.resolved.space, len(self.dataset.train), self.budget, cfg.budget,
                                  self.fixed)
                planned = _Trial(plan, self.dataset, self.budget)
        except Infeasible as e:
            record.set_all(trial, record.rejected_attrs(str(e)))
            raise optuna.TrialPruned(str(e)) from None
        record.set_all(trial, planned.plan.as_attrs())
        n, hp = len(planned.dataset.train), planned.plan.hparams
        # A subset's size is secret: a mode's plan was checked against the data it was planned on.
        subset = planned.setup is not None and planned.setup.sampling_rate is not None
        hp.validate(max(n, hp.batch_size) if subset else n, not cfg.non_private)
        return planned

    def _config(self, trial: optuna.Trial, planned: _Trial) -> tuple[RunConfig, str, str]:
        """The run's configuration, the study's private folder, and where the selected parameters wait."""
        cfg = self.resolved.study
        config = run_config(
            cfg,
            microbatch_size=self.microbatch_size(),
            eval_every=max(1, round(cfg.eval_every_epochs / planned.plan.sampling_rate)),
            # With a secret trial count every trial starts from the same public initialisation: a seed that
            # varied with the trial number would reveal the released trial's index. A retry keeps its first
            # attempt's (public) initialisation: it resumes that run.
            seed=cfg.seed if self.secret_count else cfg.seed + attempt_origin(trial),
            # A fixed private seed gives each trial of each study its own stream (never seed + number,
            # which another study or a `dptune train --private-seed` would reuse), keyed on the study's id.
            private_seed=None,
            secret=None if cfg.private_seed is None else SecretSeed.from_int(cfg.private_seed).child(
                f"study {trial.study.study_name} {self.study_id} trial {trial.number}"),
            sampling_rate=None if planned.setup is None else planned.setup.sampling_rate,
        )
        if cfg.init_checkpoint:
            # The prior spend was read at create; a checkpoint replaced since would
            # bring in training the search's total does not compose.
            stored = self.resolved_checkpoint
            if stored is not None and checkpoint.fingerprint(cfg.init_checkpoint) != stored:
                raise StudyError(f"init_checkpoint: {cfg.init_checkpoint} changed since the study was created "
                                 "(its recorded privacy spend may differ); create a new study for it")
        folder = release.folder_of(trial.study, self.storage_url or default_storage(trial.study.study_name))
        # The selected parameters wait, owner-only, until the trial's value is stored (release.keep_best).
        pending = release.pending_path(folder, trial.number)
        # A mode's proxies keep no model: only its final run is released.
        keeps = planned.setup is None or planned.final
        config = dataclasses.replace(config, save_checkpoint=pending if keeps else None,
                                     search=trial.study.study_name)
        return config, folder, pending

    def _train(self, trial: optuna.Trial, planned: _Trial) -> float:
        """Train the planned run (resuming a dead attempt's checkpoint if there is one) and record what ran."""
        config, folder, pending = self._config(trial, planned)
        reports = _Reports(trial, planned.final)
        checkpointer = reports.checkpointer = self._checkpointer(trial, planned.plan, config, folder)
        if checkpointer is not None:
            config = dataclasses.replace(config, resume=checkpointer)
            point = checkpointer.latest()
            if point is not None:
                link = ResumeLink(point.header.get("trial"), point.step, replayed=True)
                trial.set_user_attr(record.RESUMED_FROM, link.as_attr())
                for m in point.history:  # the same outputs of the same run: the trial's curve stays whole
                    reports.reading(m["best_val_accuracy"])
        seams.reached("trial.training", trial.number)
        interrupt.raise_if_pending()  # before the trial is marked as having touched the data
        trial.set_user_attr(record.TOUCHED_DATA, True if planned.setup is None else planned.setup.touched)
        try:
            result = self._train_once(trial, planned, config, reports)
        finally:
            if checkpointer is not None:
                checkpointer.clear()  # finished (or stopped for good): the secret state is of no more use
        for path in (pending, pending + ".json"):
            if os.path.exists(path):
                os.chmod(path, 0o600)
        return self._record(trial, result, config, checkpointer)

    def _train_once(self, trial: optuna.Trial, planned: _Trial, config: RunConfig, reports: _Reports) -> Any:
        """Train; a replay that diverged from what a dead attempt released restarts with fresh randomness."""
        def run() -> Any:
            return train_and_evaluate(planned.dataset, planned.plan.hparams, planned.plan.steps, config=config,
                                      budget=planned.budget, callback=reports, progress=self._progress_of(trial))

        try:
            return run()
        except ReplayDiverged as e:
            # The replay computed other parameters from the same noise: nothing of it was released. Start
            # again from the checkpoint with fresh randomness; the dead attempt's steps then count apart.
            checkpointer = reports.checkpointer
            assert checkpointer is not None
            replayed = checkpointer.started_from
            point = checkpointer.restart_fresh(str(e))  # the very point replayed, held in memory
            dead = None if replayed is None else replayed.header.get("trial")
            # Without a start point the fresh run starts at step 0 and the dead attempt counts whole.
            link = ResumeLink(dead, 0 if point is None else point.step, replayed=False, diverged_at=e.step)
            trial.set_user_attr(record.RESUMED_FROM, link.as_attr())
            del reports.readings[0 if point is None else len(point.history):]
            reports.digests.clear()
            return run()

    def _record(self, trial: optuna.Trial, result: Any, config: RunConfig,
                checkpointer: Checkpointer | None) -> float:
        """Write what ran to the trial; PRUNED if it stopped early."""
        # The steps this attempt ran itself: [the step it really started from (0: none), the last step].
        started = None if checkpointer is None else checkpointer.started_from
        trial.set_user_attr(record.RAN_STEPS, [0 if started is None else started.step, result.steps])
        attrs = record.result_attrs(result, config.seed, self.resolved.study.augmentation.multiplicity)
        if result.warnings:  # a trial at chance because its loss is NaN must not read as a poor setting
            who = "a trial" if self.secret_count else f"trial {trial.number}"  # numbers tell K
            logging.getLogger(__name__).warning("%s: %s", who, "; ".join(result.warnings))
        record.set_all(trial, attrs)
        if result.stopped_early:
            raise optuna.TrialPruned(f"pruned after {result.steps} steps")
        return cast(float, result.selected_val_accuracy)

    def _checkpointer(self, trial: optuna.Trial, plan: Any, config: RunConfig, folder: str) -> Checkpointer | None:
        """The trial's in-trial checkpoints (None unless the study file sets ``checkpoints``).

        All attempts of one trial (the first and its retries) share one folder, so
        that a retry finds the checkpoint of the attempt that died; a checkpoint
        is resumed only by a run of the same configuration (``identity``).
        """
        ck = self.resolved.study.checkpoints
        if not ck.active or self.secret_count:
            return None
        origin = attempt_origin(trial)
        identity = {"hparams": dataclasses.asdict(plan.hparams), "steps": plan.steps, "q": plan.sampling_rate,
                    "model": config.model, "weight_standardization": config.weight_standardization,
                    "microbatch_size": config.microbatch_size, "clipping": config.clipping,
                    "private": config.private, "seed": config.seed, "dataset": self.dataset.name,
                    "split": self.dataset.split.as_dict(), "init_checkpoint": config.init_checkpoint,
                    "augmentation": dataclasses.asdict(config.augmentation), "eval_every": config.eval_every,
                    # A checkpoint left by another study of this name (deleted and created again, or on
                    # another server sharing the folder) is never resumed.
                    "study": release.study_id(trial.study)}
        c = Checkpointer(release.checkpoint_folder(folder, origin), identity, every_steps=ck.every_steps,
                         every_seconds=None if ck.every_minutes is None else 60.0 * ck.every_minutes)
        c.writer = trial.number
        point = c.latest()
        if point is not None:
            # What earlier attempts released after the checkpoint must be what the replay computes.
            c.expected_digests.update(replay_expectations(trial.study.get_trials(deepcopy=False), trial.number,
                                                          origin, point.header.get("trial"), point.step))

        def saved(step: int) -> None:
            trial.set_user_attr(record.CHECKPOINT_STEP, step)

        c.on_save = saved
        return c

    def _admit(self, trial: optuna.Trial, plan: Any) -> str | None:
        """The regime's admission of the planned run: None if it may start, else why not."""
        return self.regime.admit(trial, Mechanism(plan.sampling_rate, plan.hparams.noise_multiplier, int(plan.steps)))


def admit(trial: optuna.Trial, request: Mechanism, filt: RenyiFilter, prior: Sequence[Mechanism] = ()) -> str | None:
    """The privacy filter's decision (:func:`dptune.search.regimes.admit`), under the name callers know."""
    return regimes.admit(trial, request, filt, prior)
