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
from typing import Any, cast

import jax
import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune import interrupt
from dptune.config.schema import ResolvedStudy, default_storage
from dptune.data.datasets import Dataset
from dptune.errors import StudyError
from dptune.models import checkpoint
from dptune.privacy.mechanism import Mechanism, mechanisms
from dptune.privacy.search_totals import RenyiFilter
from dptune.progress import Reporter
from dptune.randomness import SecretSeed
from dptune.search import orphans, record, release
from dptune.search.record import ResumeLink
from dptune.search.space import Infeasible, plan_trial, smallest_batch
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


class Objective:
    """The per-trial function handed to ``study.optimize``."""

    def __init__(self, resolved: ResolvedStudy, dataset: Dataset, delta: float | None,
                 private_search: dict[str, Any] | None = None, search_budget: dict[str, float] | None = None,
                 prior: Sequence[Sequence[float]] = ()):
        self.resolved = resolved
        self.dataset = dataset
        cfg = resolved.study
        self.fixed = None
        self.budget: PrivacyBudget | None = None
        self.private_search = private_search
        self.filter = (None if search_budget is None
                       else RenyiFilter(search_budget["epsilon"], cast(float, delta), search_budget["order"]))
        self.prior = list(mechanisms(prior))
        self.resolved_checkpoint: str | None = None
        self.storage_url: str | None = None  # set by optimize: where the study's private folder is
        # Set by optimize: the study's random id, so that a fixed private_seed gives a study created again under
        # the same name other streams (two studies on one noise could cancel it between their releases).
        self.study_id = ""
        self.progress: Reporter | None = None  # set by optimize: where a trial's progress events go
        self.mode: Any = None  # a dptune.search.proxy.ModeRunner for a study with search: {mode: …}
        if private_search is not None:
            # Every trial runs the calibrated mechanism; its own ε (RDP) is the trainer's cap.
            self.fixed = (private_search["noise_multiplier"], private_search["steps"])
            self.budget = PrivacyBudget(private_search["per_trial_epsilon"], cast(float, delta), "rdp")
        elif not cfg.non_private:
            assert cfg.privacy is not None and delta is not None  # the schema requires a budget
            self.budget = PrivacyBudget(cfg.privacy.epsilon, delta, cfg.privacy.accountant)
        self._microbatch: int | None = None if cfg.microbatch_size == "auto" else cfg.microbatch_size
        # A user's model is checked in every worker: its code may have changed since the study was created.
        check_model(cfg, dataset)

    def _progress_of(self, trial: optuna.Trial) -> Reporter | None:
        """The trial's progress events, tagged with its number; none in a private search (they would tell K)."""
        report = self.progress
        if report is None or self.private_search is not None:
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
        cfg = self.resolved.study
        n = len(self.dataset.train)
        trial.set_user_attr(record.WORKER, orphans.worker_identity())
        # False until the data is read (a re-queued retry also starts with its failed parent's attributes).
        trial.set_user_attr(record.TOUCHED_DATA, False)
        if record.get(trial, record.FILTER_ADMITTED) is not None:
            trial.set_user_attr(record.FILTER_ADMITTED, None)
        for key in record.RESUME_ATTRS:  # a heartbeat retry inherits its parent's; this attempt has done nothing yet
            if record.get(trial, key) is not None:
                trial.set_user_attr(key, None)
        if self.private_search is not None and trial.number >= self.private_search["n_trials"]:
            # K is enforced in the storage, not per process: Optuna numbers trials
            # atomically there, so however many workers or machines share the
            # study, only trials 0 … K−1 ever reach the data.
            trial.set_user_attr(record.SKIPPED_REASON, "every trial of the private search has started")
            trial.study.stop()
            raise optuna.TrialPruned("private search: no trials left")
        if self.budget is not None:
            record.set_all(trial, record.budget_attrs(self.budget.epsilon, self.budget.delta, self.budget.accountant))
        # A mode's proxy or final run plans its own data and budget.
        setup = None
        dataset, budget = self.dataset, self.budget
        try:
            if self.mode is not None:
                setup = self.mode.setup(trial)
                plan, dataset, budget = setup.plan, setup.dataset, setup.budget
                n = len(dataset.train)
                trial.set_user_attr(record.EPSILON_TARGET, budget.epsilon)
                record.set_all(trial, setup.attrs)
            else:
                plan = plan_trial(trial, self.resolved.space, n, self.budget, cfg.budget, self.fixed)
        except Infeasible as e:
            record.set_all(trial, record.rejected_attrs(str(e)))
            raise optuna.TrialPruned(str(e)) from None
        record.set_all(trial, plan.as_attrs())
        # A subset's size is secret: a mode's plan was checked against the data it was planned on.
        plan.hparams.validate(n if setup is None or setup.sampling_rate is None else max(n, plan.hparams.batch_size),
                              not cfg.non_private)
        if self.filter is not None and (refusal := self._admit(trial, plan)) is not None:
            trial.study.stop()
            raise optuna.TrialPruned(refusal)

        reports = []
        digests: dict[str, str] = {}
        checkpointer: Checkpointer | None = None

        final = setup is not None and setup.final

        def report(step: int, metrics: dict[str, float]) -> bool:
            if checkpointer is not None and checkpointer.last_digest is not None:
                # Written before the report: a resumed attempt checks its replay against what was released.
                digests[str(step)] = checkpointer.last_digest[1]
                trial.set_user_attr(record.REPLAY_DIGESTS, dict(digests))
                trial.set_user_attr(record.PROGRESS_STEPS, step)
            # With averaging on, the better of raw and EMA parameters is what the trial would release.
            reports.append(metrics["best_val_accuracy"])
            # A final run is never pruned, and its curve (of a model trained on all of the data) is not
            # reported where the pruner and the sampler of proxies could read it.
            if not final:
                trial.report(metrics["best_val_accuracy"], len(reports))
            orphans.kill_if_test_requests(trial.number, step)
            return not final and trial.should_prune()

        config = run_config(
            cfg,
            microbatch_size=self.microbatch_size(),
            eval_every=max(1, round(cfg.eval_every_epochs / plan.sampling_rate)),
            # In a private search every trial starts from the same public initialisation:
            # a seed that varied with the trial number would reveal the released trial's index.
            # A retry keeps its first attempt's (public) initialisation: it resumes that run.
            seed=cfg.seed if self.private_search is not None else cfg.seed + attempt_origin(trial),
            # A fixed private seed gives each trial of each study its own stream (never seed + number,
            # which another study or a `dptune train --private-seed` would reuse), keyed on the study's id.
            private_seed=None,
            secret=None if cfg.private_seed is None else SecretSeed.from_int(cfg.private_seed).child(
                f"study {trial.study.study_name} {self.study_id} trial {trial.number}"),
            sampling_rate=None if setup is None else setup.sampling_rate,
        )
        if cfg.init_checkpoint:
            # The prior spend was read at create; a checkpoint replaced since would
            # bring in training the search's total does not compose.
            stored = self.resolved_checkpoint
            now = checkpoint.fingerprint(cfg.init_checkpoint)
            if stored is not None and now != stored:
                raise StudyError(f"init_checkpoint: {cfg.init_checkpoint} changed since the study was created "
                                 "(its recorded privacy spend may differ); create a new study for it")
        folder = release.folder_of(trial.study, self.storage_url or default_storage(trial.study.study_name))
        # The selected parameters wait, owner-only, until the trial's value is stored (release.keep_best).
        pending = release.pending_path(folder, trial.number)
        # A mode's proxies keep no model: only its final run is released.
        config = dataclasses.replace(config, save_checkpoint=None if setup is not None and not setup.final
                                     else pending, search=trial.study.study_name)
        checkpointer = self._checkpointer(trial, plan, config, folder)
        point = None
        if checkpointer is not None:
            config = dataclasses.replace(config, resume=checkpointer)
            point = checkpointer.latest()
            if point is not None:
                link = ResumeLink(point.header.get("trial"), point.step, replayed=True)
                trial.set_user_attr(record.RESUMED_FROM, link.as_attr())
                for m in point.history:  # the same outputs of the same run: the trial's curve stays whole
                    reports.append(m["best_val_accuracy"])
                    if not final:
                        trial.report(m["best_val_accuracy"], len(reports))
        orphans.abort_if_test_requests(trial.number)
        interrupt.raise_if_pending()  # before the trial is marked as having touched the data
        trial.set_user_attr(record.TOUCHED_DATA, True if setup is None else setup.touched)
        try:
            try:
                result = train_and_evaluate(dataset, plan.hparams, plan.steps, config=config,
                                            budget=budget, callback=report, progress=self._progress_of(trial))
            except ReplayDiverged as e:
                # The replay computed other parameters from the same noise: nothing of it was released. Start
                # again from the checkpoint with fresh randomness; the dead attempt's steps then count apart.
                assert checkpointer is not None
                replayed = checkpointer.started_from
                point = checkpointer.restart_fresh(str(e))  # the very point replayed, held in memory
                dead = None if replayed is None else replayed.header.get("trial")
                # Without a start point the fresh run starts at step 0 and the dead attempt counts whole.
                link = ResumeLink(dead, 0 if point is None else point.step, replayed=False, diverged_at=e.step)
                trial.set_user_attr(record.RESUMED_FROM, link.as_attr())
                del reports[0 if point is None else len(point.history):]
                digests.clear()
                result = train_and_evaluate(dataset, plan.hparams, plan.steps, config=config,
                                            budget=budget, callback=report, progress=self._progress_of(trial))
        finally:
            if checkpointer is not None:
                checkpointer.clear()  # finished (or stopped for good): the secret state is of no more use
        for path in (pending, pending + ".json"):
            if os.path.exists(path):
                os.chmod(path, 0o600)
        # The steps this attempt ran itself: [the step it really started from (0: none), the last step].
        started = None if checkpointer is None else checkpointer.started_from
        trial.set_user_attr(record.RAN_STEPS, [0 if started is None else started.step, result.steps])
        attrs = record.result_attrs(result, config.seed, cfg.augmentation.multiplicity)
        if result.warnings:  # a trial at chance because its loss is NaN must not read as a poor setting
            who = "a trial" if self.private_search is not None else f"trial {trial.number}"  # numbers tell K
            logging.getLogger(__name__).warning("%s: %s", who, "; ".join(result.warnings))
        record.set_all(trial, attrs)
        if result.stopped_early:
            raise optuna.TrialPruned(f"pruned after {result.steps} steps")
        return result.selected_val_accuracy

    def _checkpointer(self, trial: optuna.Trial, plan: Any, config: RunConfig, folder: str) -> Checkpointer | None:
        """The trial's in-trial checkpoints (None unless the study file sets ``checkpoints``).

        All attempts of one trial (the first and its retries) share one folder, so
        that a retry finds the checkpoint of the attempt that died; a checkpoint
        is resumed only by a run of the same configuration (``identity``).
        """
        ck = self.resolved.study.checkpoints
        if not ck.active or self.private_search is not None:
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
        """The privacy filter: None if this trial may start within ``search_budget``, else why not."""
        assert self.filter is not None
        request = Mechanism(plan.sampling_rate, plan.hparams.noise_multiplier, int(plan.steps))
        return admit(trial, request, self.filter, self.prior)


def admit(trial: optuna.Trial, request: Mechanism, filt: RenyiFilter, prior: Sequence[Mechanism] = ()) -> str | None:
    """The privacy filter: None if a run of ``request`` may start within the cap, else why not.

    Each trial writes its request before reading the others', so of two
    trials deciding at the same time at least the later reader counts the
    other: concurrent workers cannot both squeeze under the cap. Requests of
    trials still running are counted whether or not they were admitted yet
    (conservative); every admitted trial counts at its planned steps, which
    also covers pruning. Used for the search's trials and for audit runs
    (:mod:`dptune.search.audit`), which train on the same data.
    """
    trial.set_user_attr(record.FILTER_REQUEST, list(request))
    others = []
    for t in trial.study.get_trials(deepcopy=False):
        asked, admitted = record.filter_request(t), record.get(t, record.FILTER_ADMITTED)
        if t.number == trial.number or t.state == TrialState.WAITING or asked is None or admitted is False:
            continue
        if t.state == TrialState.RUNNING or admitted or record.get(t, record.TOUCHED_DATA):
            others.append(asked)
    trials = [*prior, *others, Mechanism(*request)]
    if not filt.admits(trials):
        reason = (f"search_budget: starting this trial would take the search to ε = "
                  f"{filt.spent(trials):.4g} > {filt.epsilon:g} (privacy filter at Rényi order "
                  f"{filt.order:.3g}); the search stops here")
        record.set_all(trial, {record.FILTER_ADMITTED: False, **record.rejected_attrs(reason)})
        return reason
    trial.set_user_attr(record.FILTER_ADMITTED, True)
    return None
