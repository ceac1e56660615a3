"""The study driver: Optuna studies of DP-SGD hyperparameters under a fixed ε.

A study's whole configuration (study file + search space, resolved) is stored
in the study's user attributes, so a worker anywhere needs only the storage URL
and the study name. Each trial

1. samples hyperparameters and derives steps or σ from the budget
   (:func:`dptune.search.space.plan_trial`); an infeasible sample is recorded
   as PRUNED with ``rejected_reason`` and ε spent 0 — it never touched data;
2. trains with :func:`dptune.trainer.train.train_and_evaluate`, reporting validation
   accuracy at each evaluation (``trial.report``) and stopping when the pruner
   says so;
3. records what ran as user attributes: ε target and spent, δ, accountant,
   q, σ, C, steps, epochs, examples/s, compile and wall time, seeds, devices.

Pruned trials are PRUNED, not FAILED, so TPE learns from them; their recorded ε
is what they really spent. ``touched_data`` is set on a trial just before it
reads the training data: the search's privacy counts exactly those trials.

Counts and caps that protect the guarantee are enforced through the storage,
never per process: a private search's K by trial number (Optuna numbers trials
atomically in the storage), and a ``search_budget`` by a privacy filter whose
requests every trial writes before it reads the others'.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune import __version__, interrupt
from dptune.models import checkpoint
from dptune.trainer import microbatch
from dptune.search import orphans, release
from dptune.privacy import accounting as privacy, search_totals as search_privacy
from dptune.data.augment import Augmentation
from dptune.config.schema import ResolvedStudy, SearchSpace, StudyConfig, check_name, default_storage
from dptune.data.datasets import Dataset, load_dataset
from dptune.errors import ConfigError, DataError, DptuneError, PrivacyError
from dptune.search.orphans import reap_dead_workers
from dptune.randomness import SecretSeed
from dptune.trainer.resume import Checkpointer, ReplayDiverged
from dptune.privacy.search_totals import RenyiFilter, TrialCount
from dptune.search.space import Infeasible, check_space, plan_trial, smallest_batch
from dptune.privacy.statement import COVERAGE, Mechanism, Statement
from dptune.search import storage as storage_lib
from dptune.search.storage import open_storage
from dptune.trainer.train import PrivacyBudget, RunConfig, train_and_evaluate

CONFIG_ATTR = "dptune_config"
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyError(DptuneError):
    """A study cannot be created, found or continued."""


# -- samplers and pruners ---------------------------------------------------

def make_sampler(study: StudyConfig, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler a study file names."""
    name = study.sampler.name
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.sampler.n_startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=study.sampler.n_startup_trials)
    if name == "gp":
        if importlib.util.find_spec("torch") is None:
            raise ConfigError("sampler.name", "'gp' needs PyTorch installed (pip install torch); "
                              "allowed without it: tpe, random, cmaes, grid")
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=study.sampler.n_startup_trials)
    if name == "grid":
        grid: dict[str, list] = {}
        for pname, spec in space.params().items():
            values = getattr(spec, "grid", None) or getattr(spec, "choices", None)
            if values is None and hasattr(spec, "low"):
                raise ConfigError(f"search_space.{pname}", "the grid sampler needs 'grid: [values]' for every range")
            if values is not None:
                grid[pname] = list(values)
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ConfigError("sampler.name", f"unknown {name!r}")


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The Optuna pruner a study file names (steps are evaluation counts)."""
    p = study.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name in ("successive_halving", "asha"):
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                      reduction_factor=p.reduction_factor)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


# -- create / load ------------------------------------------------------------

def _dataset(cfg: StudyConfig) -> Dataset:
    """The study's data; with ``validation_dataset``, validation examples come from that (public) dataset."""
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, image_size=cfg.image_size,
                        test_split=cfg.test_split)
    if cfg.validation_dataset is None:
        return data
    if checkpoint.dataset_identity(cfg.validation_dataset) == checkpoint.dataset_identity(cfg.dataset):
        raise ConfigError("validation_dataset", f"must be another, public dataset, not the private {cfg.dataset!r}")
    try:
        public = load_dataset(cfg.validation_dataset, data_dir=cfg.data_dir, seed=cfg.seed, image_size=cfg.image_size)
    except DataError as e:
        raise ConfigError("validation_dataset", str(e).removeprefix("dataset: ")) from None
    if public.image_shape != data.image_shape or public.num_classes != data.num_classes:
        raise ConfigError("validation_dataset", f"{cfg.validation_dataset!r} has images {public.image_shape} and "
                          f"{public.num_classes} classes, the training data {data.image_shape} and "
                          f"{data.num_classes}; set image_size so that they match")
    return dataclasses.replace(data, validation=public.validation)


def _resolve_delta(resolved: ResolvedStudy, dataset: Dataset) -> float | None:
    n = len(dataset.train)
    cfg = resolved.study
    if cfg.non_private:
        return None
    section = "privacy" if cfg.privacy is not None else "search_privacy"
    given = getattr(cfg, section).delta
    delta = given if given is not None else privacy.default_delta(n)
    try:
        privacy.check_delta(delta, n)
    except PrivacyError as e:
        raise ConfigError(f"{section}.delta", str(e).removeprefix("delta: ")) from None
    return delta


def _trial_count(cfg: StudyConfig) -> TrialCount:
    t = cfg.search_privacy.trials
    try:
        return TrialCount(t.distribution, t.mean, t.eta)
    except PrivacyError as e:
        raise ConfigError("search_privacy.trials", str(e)) from None


def _plan_private_search(resolved: ResolvedStudy, dataset: Dataset, delta: float,
                         prior: Sequence[tuple[float, float, int]] = ()) -> dict[str, Any]:
    """Draw the number of trials and calibrate the one mechanism every trial runs.

    ``prior``: a private initial checkpoint's recorded runs on the same data,
    composed in, so that the whole release meets ``total_epsilon``.
    """
    cfg, space = resolved.study, resolved.space
    n = len(dataset.train)
    batch = int(space.batch_size)
    if not 1 <= batch <= n:
        raise ConfigError("search_space.batch_size", f"must be in [1, {n}], got {batch}")
    q = batch / n
    steps = max(1, math.ceil(float(space.epochs) / q))
    if cfg.budget.max_steps is not None:
        steps = min(steps, cfg.budget.max_steps)
    count = _trial_count(cfg)
    total = cfg.search_privacy.total_epsilon
    if prior and search_privacy.composed_epsilon(prior, delta)["rdp"] >= total:
        raise ConfigError("search_privacy.total_epsilon", f"{total:g} is already spent by the init_checkpoint's "
                          f"recorded training on {dataset.name!r}")
    sigma = search_privacy.noise_for_search(q, steps, total, delta, count, prior)
    # The bound holds over the randomness of K, so K is as secret as the noise:
    # drawn from the OS, or from private_seed (reproducible; keep it secret).
    secret = SecretSeed.resolve(cfg.private_seed).child("number of trials")
    return {
        "n_trials": count.sample(secret.sampler()),
        "n_trials_seed_fixed": cfg.private_seed is not None,
        "distribution": count.distribution,
        "mean_trials": count.mean,
        "eta": count.eta,
        "sampling_rate": q,
        "noise_multiplier": sigma,
        "steps": steps,
        "total_epsilon": search_privacy.search_epsilon(q, sigma, steps, delta, count, prior),
        "total_epsilon_target": total,
        "per_trial_epsilon": privacy.epsilon(q, sigma, steps, delta, "rdp"),
    }


def _prepare(resolved: ResolvedStudy) -> dict[str, Any]:
    """Validate everything and compute the study's user attributes, writing nothing."""
    study_cfg = resolved.study
    sp = study_cfg.search_privacy
    if sp is not None and study_cfg.validation_dataset is None:
        raise ConfigError("validation_dataset", "a private search chooses the best trial by validation accuracy, "
                          "which its theorem covers only on public examples: name a public dataset (e.g. digits), "
                          "not a split of the private one")
    dataset = _dataset(study_cfg)
    delta = _resolve_delta(resolved, dataset)
    check_space(resolved.space, len(dataset.train), private=not study_cfg.non_private)
    make_sampler(study_cfg, resolved.space, study_cfg.seed)
    from dptune.models.builtin import build_model

    model = build_model(study_cfg.model, dataset.num_classes, weight_standardization=study_cfg.weight_standardization)
    prior: list[tuple[float, float, int]] = []
    if study_cfg.init_checkpoint:
        # A checkpoint that does not fit, or that saw this data without privacy, is a
        # configuration error, found before anything is written.
        from dptune.models.builtin import init_params

        prior = checkpoint.prior_spend(study_cfg.init_checkpoint, dataset.name, private=not study_cfg.non_private,
                                       unsafe_ignore=study_cfg.unsafe_ignore_checkpoint_provenance)
        checkpoint.fit(init_params(model, dataset.image_shape, jax.random.key(0)),
                       checkpoint.load(study_cfg.init_checkpoint), study_cfg.reinitialize)
    attrs: dict[str, Any] = {CONFIG_ATTR: resolved.to_json(), "dptune_version": __version__, "delta": delta,
                             "split": dataset.split.as_dict(), "prior_privacy_events": [list(e) for e in prior]}
    if study_cfg.init_checkpoint:
        attrs["init_checkpoint_sha256"] = checkpoint.fingerprint(study_cfg.init_checkpoint)
    if study_cfg.private_search:
        plan = _plan_private_search(resolved, dataset, delta, prior)
        attrs.update(private_search=plan, epsilon_target=plan["per_trial_epsilon"], accountant="rdp")
    elif study_cfg.non_private:
        attrs.update(non_private=True)
    else:
        attrs.update(epsilon_target=study_cfg.privacy.epsilon, accountant=study_cfg.privacy.accountant)
        if study_cfg.search_budget is not None:
            cap = study_cfg.search_budget
            order = cap.order or search_privacy.default_filter_order(cap.epsilon, delta)
            filt = RenyiFilter(cap.epsilon, delta, order)
            if not filt.admits(prior):
                raise ConfigError("search_budget.epsilon", f"{cap.epsilon:g} is already spent by the init_checkpoint's "
                                  f"recorded training on {dataset.name!r} ({filt.spent(prior):.4g} at order {order:.3g})")
            attrs.update(search_budget={"epsilon": cap.epsilon, "order": order})
    return attrs


def _in_file(e: DptuneError, source: str, space_file: str | None) -> DptuneError:
    """``e`` naming the file the user must edit: the study file, or the search-space file for its fields."""
    if isinstance(e, ConfigError):
        message = str(e)[len(e.field) + 2:]
        if space_file is not None and e.field.startswith("search_space."):
            return ConfigError(f"{space_file}: {e.field.removeprefix('search_space.')}", message)
        return ConfigError(f"{source}: {e.field}", message)
    return type(e)(f"{source}: {e}")


def create_study(resolved: ResolvedStudy, storage: str | None = None, *, skip_if_exists: bool = False,
                 source: str | None = None) -> optuna.Study:
    """Create a study holding its full configuration.

    Everything is validated first (the dataset is opened, δ checked against
    1/N, every search-space value against N, the sampler built), so a bad
    configuration writes nothing; ``source``, the study file, is named in such
    errors. An existing study of the same name is an error unless
    ``skip_if_exists`` and its stored configuration is identical.
    """
    study_cfg = resolved.study
    storage = storage or study_cfg.storage or default_storage(study_cfg.name)
    storage_lib.check_url(storage)
    try:
        attrs = _prepare(resolved)
    except DptuneError as e:
        if source is None:
            raise
        from dptune.config.schema import search_space_path

        try:
            space_file = search_space_path(study_cfg.search_space, source)
        except ConfigError:
            space_file = None
        raise _in_file(e, source, space_file) from None
    stored = attrs[CONFIG_ATTR]

    storage_obj = open_storage(storage)
    with storage_lib.writing(storage):
        existing = _find(study_cfg.name, storage_obj)
        if existing is not None:
            if existing.user_attrs.get(CONFIG_ATTR) != stored:
                raise StudyError(f"study_name: a study {study_cfg.name!r} with a different configuration exists "
                                 f"in {storage}; choose another name or delete it")
            if not skip_if_exists:
                raise StudyError(f"study_name: {study_cfg.name!r} already exists in {storage} (use --skip-if-exists)")
            return optuna.load_study(study_name=study_cfg.name, storage=storage_obj)

        study = optuna.create_study(study_name=study_cfg.name, storage=storage_obj,
                                    direction=study_cfg.objective.direction)
        try:
            # A Ctrl-C here would leave a study without its configuration: finish or undo.
            with interrupt.deferred(), warnings.catch_warnings():
                # Metric names are "experimental" in Optuna; the dashboard shows the name instead of "Objective 0".
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([study_cfg.objective.metric])
                # Set before any worker can see the configuration: every worker reads the same id.
                study._storage.set_study_system_attr(study._study_id, release.STUDY_ID_ATTR, release.new_study_id())
                for key, value in attrs.items():
                    study.set_user_attr(key, value)
        except BaseException:
            optuna.delete_study(study_name=study_cfg.name, storage=storage_obj)
            raise
    return study


def _find(name: str, storage: Any) -> optuna.study.StudySummary | None:
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            return summary
    return None


def load(study_name: str, storage: str | None = None, *, heartbeat: bool = False
         ) -> tuple[optuna.Study, ResolvedStudy]:
    """Load a dptune study and its stored configuration (``heartbeat``: for a worker running trials)."""
    problem = check_name(study_name)
    if problem:
        raise StudyError(f"study_name: {problem}")
    url = storage or default_storage(study_name)
    if not storage_lib.exists(url):
        raise StudyError(f"study_name: no study {study_name!r}: {url} does not exist (dptune study create "
                         "--config FILE creates a study)")
    storage_obj = open_storage(url, heartbeat=heartbeat, create=False)
    if _find(study_name, storage_obj) is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage_obj, include_best_trial=False)]
        raise StudyError(f"study_name: no study {study_name!r} in {url}; "
                         f"available: {', '.join(names) if names else '(none)'}")
    study = optuna.load_study(study_name=study_name, storage=storage_obj)
    if CONFIG_ATTR not in study.user_attrs:
        raise StudyError(f"study_name: {study_name!r} was not created by dptune (no stored configuration)")
    return study, ResolvedStudy.from_json(study.user_attrs[CONFIG_ATTR])


# -- trials ---------------------------------------------------------------------

RESUME_ATTRS = ("resumed_from", "replay_digests", "progress_steps", "checkpoint_step", "ran_steps")


def attempt_origin(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of a trial's first attempt: its own, or that of the trial it retries.

    dptune's reaper marks a retry with the user attribute ``retry_of``; Optuna's
    heartbeat retry with the system attribute ``failed_trial``.
    """
    system = (trial.system_attrs if isinstance(trial, FrozenTrial)
              else trial.storage.get_trial_system_attrs(trial._trial_id))
    if system.get("failed_trial") is not None:
        return int(system["failed_trial"])
    return int(trial.user_attrs.get("retry_of", trial.number))


def _linked(trial: FrozenTrial, by_number: dict[int, FrozenTrial]) -> tuple[FrozenTrial, dict[str, Any]] | None:
    """The earlier attempt ``trial`` resumed from and the link, or None.

    A link counts only to a smaller-numbered trial with the same first attempt:
    a ``resumed_from`` naming anything else (a leftover of another study) never
    makes an unrelated trial's spend disappear.
    """
    link = trial.user_attrs.get("resumed_from")
    if not link or link.get("trial") is None:
        return None
    dead = by_number.get(int(link["trial"]))
    if dead is None or dead.number >= trial.number or attempt_origin(dead) != attempt_origin(trial):
        return None
    return dead, link


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
    while current is not None and (hop := _linked(current, by_number)) is not None:
        dead, link = hop
        if link.get("randomness") != "replayed" or dead.number in sources:
            break  # a fresh restart began another run: what came before it is not this run's output
        sources.add(dead.number)
        current = dead
    expected: dict[int, str] = {}
    for n in sorted(sources):
        for k, v in (by_number[n].user_attrs.get("replay_digests") or {}).items():
            if int(k) > step:
                expected[int(k)] = v
    return expected


class Objective:
    """The per-trial function handed to ``study.optimize``."""

    def __init__(self, resolved: ResolvedStudy, dataset: Dataset, delta: float,
                 private_search: dict[str, Any] | None = None, search_budget: dict[str, float] | None = None,
                 prior: Sequence[Sequence[float]] = ()):
        self.resolved = resolved
        self.dataset = dataset
        cfg = resolved.study
        self.fixed = None
        self.budget: PrivacyBudget | None = None
        self.private_search = private_search
        self.filter = (None if search_budget is None
                       else RenyiFilter(search_budget["epsilon"], delta, search_budget["order"]))
        self.prior = [(float(q), float(s), int(t)) for q, s, t in prior]
        self.resolved_checkpoint: str | None = None
        self.storage_url: str | None = None  # set by optimize: where the study's private folder is
        if private_search is not None:
            # Every trial runs the calibrated mechanism; its own ε (RDP) is the trainer's cap.
            self.fixed = (private_search["noise_multiplier"], private_search["steps"])
            self.budget = PrivacyBudget(private_search["per_trial_epsilon"], delta, "rdp")
        elif not cfg.non_private:
            self.budget = PrivacyBudget(cfg.privacy.epsilon, delta, cfg.privacy.accountant)
        self._microbatch: int | None = None if cfg.microbatch_size == "auto" else cfg.microbatch_size

    def microbatch_size(self) -> int:
        """The study's microbatch, measured once per worker (and cached on disk) when set to ``auto``."""
        if self._microbatch is None:
            cfg = self.resolved.study
            upper = smallest_batch(self.resolved.space, len(self.dataset.train))
            self._microbatch = microbatch.choose(
                cfg.model, self.dataset.image_shape, self.dataset.num_classes, jax.local_devices(),
                weight_standardization=cfg.weight_standardization, clipping=cfg.clipping, upper=upper,
            ).microbatch_size
        return self._microbatch

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except KeyboardInterrupt as e:
            # Optuna marks the trial FAIL; the reason says it was stopped, not broken.
            trial.set_user_attr("failed_reason", f"interrupted by {interrupt.signal_name(e)}")
            raise

    def _run(self, trial: optuna.Trial) -> float:
        cfg = self.resolved.study
        n = len(self.dataset.train)
        trial.set_user_attr(orphans.WORKER_ATTR, orphans.worker_identity())
        # False until the data is read (a re-queued retry also starts with its failed parent's attributes).
        trial.set_user_attr("touched_data", False)
        if trial.user_attrs.get("filter_admitted") is not None:
            trial.set_user_attr("filter_admitted", None)
        for key in RESUME_ATTRS:  # a heartbeat retry inherits its parent's; this attempt has done nothing yet
            if trial.user_attrs.get(key) is not None:
                trial.set_user_attr(key, None)
        if self.private_search is not None and trial.number >= self.private_search["n_trials"]:
            # K is enforced in the storage, not per process: Optuna numbers trials
            # atomically there, so however many workers or machines share the
            # study, only trials 0 … K−1 ever reach the data.
            trial.set_user_attr("skipped_reason", "every trial of the private search has started")
            trial.study.stop()
            raise optuna.TrialPruned("private search: no trials left")
        if self.budget is not None:
            trial.set_user_attr("epsilon_target", self.budget.epsilon)
            trial.set_user_attr("delta", self.budget.delta)
            trial.set_user_attr("accountant", self.budget.accountant)
        try:
            plan = plan_trial(trial, self.resolved.space, n, self.budget, cfg.budget, self.fixed)
        except Infeasible as e:
            trial.set_user_attr("rejected_reason", str(e))
            trial.set_user_attr("epsilon_spent", 0.0)
            trial.set_user_attr("steps", 0)
            raise optuna.TrialPruned(str(e))
        for k, v in plan.as_attrs().items():
            trial.set_user_attr(k, v)
        plan.hparams.validate(n, not cfg.non_private)
        if self.filter is not None and (refusal := self._admit(trial, plan)) is not None:
            trial.study.stop()
            raise optuna.TrialPruned(refusal)

        reports = []
        digests: dict[str, str] = {}
        checkpointer: Checkpointer | None = None

        def report(step: int, metrics: dict[str, float]) -> bool:
            if checkpointer is not None and checkpointer.last_digest is not None:
                # Written before the report: a resumed attempt checks its replay against what was released.
                digests[str(step)] = checkpointer.last_digest[1]
                trial.set_user_attr("replay_digests", dict(digests))
                trial.set_user_attr("progress_steps", step)
            # With averaging on, the better of raw and EMA parameters is what the trial would release.
            reports.append(metrics["best_val_accuracy"])
            trial.report(metrics["best_val_accuracy"], len(reports))
            orphans.kill_if_test_requests(trial.number, step)
            return trial.should_prune()

        config = RunConfig(
            model=cfg.model,
            weight_standardization=cfg.weight_standardization,
            microbatch_size=self.microbatch_size(),
            clipping=cfg.clipping,
            private=not cfg.non_private,
            init_checkpoint=cfg.init_checkpoint,
            reinitialize=tuple(cfg.reinitialize),
            augmentation=Augmentation(**cfg.augmentation.model_dump()),
            eval_every=max(1, round(cfg.eval_every_epochs / plan.sampling_rate)),
            # In a private search every trial starts from the same public initialisation:
            # a seed that varied with the trial number would reveal the released trial's index.
            # A retry keeps its first attempt's (public) initialisation: it resumes that run (dptune/resume.py).
            seed=cfg.seed if self.private_search is not None else cfg.seed + attempt_origin(trial),
            # A fixed private seed gives each trial of each study its own stream (never seed + number,
            # which another study or a `dptune train --private-seed` would reuse).
            secret=None if cfg.private_seed is None else SecretSeed.from_int(cfg.private_seed).child(
                f"study {trial.study.study_name} trial {trial.number}"),
            unsafe_ignore_checkpoint_provenance=cfg.unsafe_ignore_checkpoint_provenance,
            feed=cfg.feed, loader_workers=cfg.loader_workers, device_data_fraction=cfg.device_data_fraction,
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
        config = dataclasses.replace(config, save_checkpoint=pending)
        checkpointer = self._checkpointer(trial, plan, config, folder)
        point = None
        if checkpointer is not None:
            config = dataclasses.replace(config, resume=checkpointer)
            point = checkpointer.latest()
            if point is not None:
                trial.set_user_attr("resumed_from", {"trial": point.header.get("trial"), "step": point.step,
                                                     "randomness": "replayed"})
                for m in point.history:  # the same outputs of the same run: the trial's curve stays whole
                    reports.append(m["best_val_accuracy"])
                    trial.report(m["best_val_accuracy"], len(reports))
        orphans.abort_if_test_requests(trial.number)
        interrupt.raise_if_pending()  # before the trial is marked as having touched the data
        trial.set_user_attr("touched_data", True)
        try:
            try:
                result = train_and_evaluate(self.dataset, plan.hparams, plan.steps, config=config,
                                            budget=self.budget, callback=report)
            except ReplayDiverged as e:
                # The replay computed other parameters from the same noise: nothing of it was released. Start
                # again from the checkpoint with fresh randomness; the dead attempt's steps then count apart.
                assert checkpointer is not None
                replayed = checkpointer.started_from
                point = checkpointer.restart_fresh(str(e))  # the very point replayed, held in memory
                dead = None if replayed is None else replayed.header.get("trial")
                # Without a start point the fresh run starts at step 0 and the dead attempt counts whole.
                trial.set_user_attr("resumed_from", {"trial": dead, "step": 0 if point is None else point.step,
                                                     "randomness": "fresh", "diverged_at": e.step})
                del reports[0 if point is None else len(point.history):]
                digests.clear()
                result = train_and_evaluate(self.dataset, plan.hparams, plan.steps, config=config,
                                            budget=self.budget, callback=report)
        finally:
            if checkpointer is not None:
                checkpointer.clear()  # finished (or stopped for good): the secret state is of no more use
        for path in (pending, pending + ".json"):
            if os.path.exists(path):
                os.chmod(path, 0o600)
        # The steps this attempt ran itself: [the step it really started from (0: none), the last step].
        started = None if checkpointer is None else checkpointer.started_from
        trial.set_user_attr("ran_steps", [0 if started is None else started.step, result.steps])
        attrs = {
            "epsilon_spent": result.epsilon,
            "steps": result.steps,
            "epochs": result.epochs,
            "val_accuracy": result.selected_val_accuracy,
            "test_accuracy": result.selected_test_accuracy,
            "ema_val_accuracy": result.ema_val_accuracy,
            "ema_test_accuracy": result.ema_test_accuracy,
            "examples_per_second": result.examples_per_second,
            "compile_seconds": result.compile_seconds,
            "startup_seconds": result.startup_seconds,
            "wall_seconds": result.wall_seconds,
            "examples_processed": result.examples_processed,
            "devices": result.devices,
            "microbatch_size": result.microbatch_size,
            "clipping": result.clipping,
            "seed": config.seed,
            "private_seed_fixed": result.private_seed_fixed,
            "budget_limited": result.budget_limited,
            "selected_parameters": result.selected,
            "raw_val_accuracy": result.val_accuracy,
            "raw_test_accuracy": result.test_accuracy,
            "trainable_modules": result.trainable_modules,
            "augmentation_multiplicity": cfg.augmentation.multiplicity,
        }
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
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
            trial.set_user_attr("checkpoint_step", step)

        c.on_save = saved
        return c

    def _admit(self, trial: optuna.Trial, plan: Any) -> str | None:
        """The privacy filter: None if this trial may start within ``search_budget``, else why not."""
        assert self.filter is not None
        request = (plan.sampling_rate, plan.hparams.noise_multiplier, int(plan.steps))
        return admit(trial, request, self.filter, self.prior)


def admit(trial: optuna.Trial, request: tuple[float, float, int], filt: RenyiFilter,
          prior: Sequence[tuple[float, float, int]] = ()) -> str | None:
    """The privacy filter: None if a run of ``request`` = (q, σ, steps) may start within the cap, else why not.

    Each trial writes its request before reading the others', so of two
    trials deciding at the same time at least the later reader counts the
    other: concurrent workers cannot both squeeze under the cap. Requests of
    trials still running are counted whether or not they were admitted yet
    (conservative); every admitted trial counts at its planned steps, which
    also covers pruning. Used for the search's trials and for audit runs
    (:mod:`dptune.search.audit`), which train on the same data.
    """
    trial.set_user_attr("filter_request", list(request))
    others = []
    for t in trial.study.get_trials(deepcopy=False):
        a = t.user_attrs
        if (t.number == trial.number or t.state == TrialState.WAITING or "filter_request" not in a
                or a.get("filter_admitted") is False):
            continue
        if t.state == TrialState.RUNNING or a.get("filter_admitted") or a.get("touched_data"):
            q, sigma, steps = a["filter_request"]
            others.append((float(q), float(sigma), int(steps)))
    trials = list(prior) + others + [request]
    if not filt.admits(trials):
        reason = (f"search_budget: starting this trial would take the search to ε = "
                  f"{filt.spent(trials):.4g} > {filt.epsilon:g} (privacy filter at Rényi order "
                  f"{filt.order:.3g}); the search stops here")
        for key, value in (("filter_admitted", False), ("rejected_reason", reason), ("epsilon_spent", 0.0),
                           ("steps", 0)):
            trial.set_user_attr(key, value)
        return reason
    trial.set_user_attr("filter_admitted", True)
    return None


TrialCallback = Callable[[optuna.Study, FrozenTrial], None]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def optimize(
    study_name: str,
    storage: str | None = None,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    callbacks: Sequence[TrialCallback] = (),
    stop_at_finished: int | None = None,
) -> optuna.Study:
    """Run ``n_trials`` more trials (or until ``timeout`` seconds) of a stored study.

    ``stop_at_finished`` stops this worker once the study holds that many
    COMPLETE or PRUNED trials (the shared target of several workers). Dead
    workers' trials are failed and re-queued before and after each trial. A
    KeyboardInterrupt marks the running trial FAILED with a ``failed_reason``
    and propagates; finished trials are already in the storage. Under
    :func:`dptune.interrupt.handled`, SIGINT and SIGTERM never cut a storage
    write short, so no trial is left RUNNING.
    """
    url = storage or default_storage(study_name)
    study, resolved = load(study_name, url, heartbeat=True)
    with interrupt.deferred(), storage_lib.writing(url):
        reap_dead_workers(study)
    cfg = resolved.study
    dataset = _dataset(cfg)
    delta = study.user_attrs.get("delta") or _resolve_delta(resolved, dataset)
    # A fresh seed per session, so a continued study does not replay its first samples.
    seed = cfg.seed + len(study.trials)
    private = study.user_attrs.get("private_search")
    if private is not None:
        # The number of trials was drawn at creation; every trial that ran counts.
        # This only saves starting processes for nothing: the objective enforces K.
        remaining = private["n_trials"] - len(study.trials)
        if remaining <= 0:
            return study
        n_trials = remaining if n_trials is None else min(n_trials, remaining)
        # Seeded from the OS (full MT19937 state), not from the public seed: draws that an
        # adversary could replay would reveal which trial index the released one had.
        study.sampler = optuna.samplers.RandomSampler(seed=None)
        study.pruner = optuna.pruners.NopPruner()
    else:
        study.sampler = make_sampler(cfg, resolved.space, seed)
        study.pruner = make_pruner(cfg)
    # The best model is decided once the trial's value is in the storage (release.keep_best), before user callbacks.
    hooks = [lambda st, t: release.keep_best(st, t, url)] + list(callbacks) + [lambda st, _t: reap_dead_workers(st)]
    with interrupt.deferred(), storage_lib.writing(url):
        release.sweep_pending(study, url)
    if stop_at_finished is not None:
        # Several workers share one target: stop once the study holds that many finished trials.
        hooks.append(optuna.study.MaxTrialsCallback(stop_at_finished, states=FINISHED))
    stored_split = study.user_attrs.get("split")
    if stored_split is not None and stored_split != dataset.split.as_dict():
        # q = B/N and the planned mechanism were fixed for the data as it was at create.
        raise StudyError(f"dataset: {cfg.dataset!r} is not what it was when the study was created "
                         f"({stored_split} then, {dataset.split.as_dict()} now); create a new study")
    # The finished trial is in the storage by now: the place to stop for a signal that came meanwhile.
    hooks.append(lambda _st, _t: interrupt.raise_if_pending())
    objective = Objective(resolved, dataset, delta, private, study.user_attrs.get("search_budget"),
                          study.user_attrs.get("prior_privacy_events", ()))
    objective.resolved_checkpoint = study.user_attrs.get("init_checkpoint_sha256")
    objective.storage_url = url
    # A signal waits for the next check point (a training step, a finished trial), so that it
    # never cuts a storage write short.
    with interrupt.deferred(), storage_lib.writing(url):
        study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=hooks, catch=())
    return study


# -- reading results ------------------------------------------------------------

@dataclass(frozen=True)
class StudySummary:
    name: str
    epsilon_target: float
    delta: float
    accountant: str
    n_trials: int
    complete: int
    pruned: int
    rejected: int
    failed: int
    running: int
    trial_steps: int
    examples_processed: int
    best: dict[str, Any] | None
    search: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @property
    def non_private(self) -> bool:
        return self.search.get("mode") == "non_private"

    @property
    def private_search(self) -> bool:
        return self.search.get("mode") == "private_search"

    @property
    def budget_text(self) -> str:
        """The per-trial budget in words ("ε = 3 per trial (δ = 1e-05, pld)" or "non-private")."""
        if self.non_private:
            return "non-private (no clipping, no noise: no privacy)"
        return f"ε = {self.epsilon_target:.4g} per trial (δ = {self.delta:g}, {self.accountant})"

    def release(self) -> dict[str, Any]:
        """What may be published with the best model.

        For a private search the bound holds only while K stays secret, so the
        trial count, the trial numbers and anything that adds up over trials
        (trial-steps, examples) are left out; the rest of the summary is internal.
        For other studies the guarantee covers every trial, and this is the whole summary.
        """
        if not self.private_search:
            return self.as_dict()
        # Timings too: only a worker's first trial compiles, and step times follow the realised batch sizes.
        internal = {"number", "trial_id", "retry_of", "retries", "worker", "datetime_start", "datetime_complete",
                    "intermediate_values", "seed", "skipped_reason", "compile_seconds", "startup_seconds",
                    "wall_seconds", "examples_per_second"}
        best = None if self.best is None else {k: v for k, v in self.best.items() if k not in internal}
        search = {k: v for k, v in self.search.items() if k not in PRIVATE_SEARCH_INTERNAL}
        return {"name": self.name, "epsilon_target": self.epsilon_target, "delta": self.delta,
                "accountant": self.accountant, "best": best, "search": search}


# Private-search figures that reveal K (or bound it): kept out of the release.
PRIVATE_SEARCH_INTERNAL = ("trials_drawn", "trials_run", "trials_touching_data", "internal_note")


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """A flat, JSON-ready description of one trial."""
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": dict(t.params),
        **{k: v for k, v in t.user_attrs.items()},
        "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
    }


def touched_data(t: FrozenTrial) -> bool:
    """Whether the trial reached the training data (and so counts in the search's privacy)."""
    if t.state == TrialState.WAITING:
        return False  # a queued retry carries its parent's attributes but has run nothing
    a = t.user_attrs
    if "touched_data" in a:
        return bool(a["touched_data"])
    # Studies stored before ``touched_data`` existed: every planned trial that was not rejected.
    return "rejected_reason" not in a and "skipped_reason" not in a and "sampling_rate" in a


def _spend(t: FrozenTrial) -> tuple[float, float, int] | None:
    """(q, σ, steps) of a trial that touched data: steps taken, or planned if it did not finish."""
    a = t.user_attrs
    steps = a.get("steps") if t.state in FINISHED else a.get("planned_steps")
    if not steps or "sampling_rate" not in a:
        return None
    return float(a["sampling_rate"]), float(a["noise_multiplier"]), int(steps)


def _extent(t: FrozenTrial) -> int:
    """The last step whose outputs an attempt that died wrote anywhere (its reports; see resumed_spends)."""
    a = t.user_attrs
    resumed = (a.get("resumed_from") or {}).get("step", 0)
    return max(int(a.get("progress_steps") or 0), int(a.get("checkpoint_step") or 0), int(resumed or 0))


def resumed_spends(trials: Sequence[FrozenTrial], touched: Sequence[FrozenTrial]) -> list[tuple[float, float, int]]:
    """The DP-SGD runs (q, σ, T) the trials that touched the data add up to, a resumed trial's attempts once.

    A trial without in-trial checkpoints counts alone: the steps it took, or,
    if it failed or is running, its planned steps (an upper bound). A retry
    that resumed from a dead attempt's checkpoint (``resumed_from``) with the
    *replayed* randomness continues that attempt's very run: same batches,
    same noise, and, checked by parameter digests at every step the dead
    attempt reported, the same parameters. Everything either attempt wrote is
    then an output of one DP-SGD run as long as the longer of them went: the
    pair counts once, at max(the retry's steps — taken, or planned while it
    runs —, the last step the dead attempt reported or checkpointed). If the
    replay diverged, the retry restarted from the checkpoint with fresh
    randomness, and the dead attempt's steps after the checkpoint are a run of
    their own: they count apart. A dead attempt whose retry has not resumed
    (yet) counts at its planned steps. A link is followed only to a
    smaller-numbered attempt of the same trial (:func:`_linked`): a record
    naming any other trial leaves that trial counted on its own.
    """
    by_number = {t.number: t for t in trials}
    continued = {hop[0].number for t in touched if (hop := _linked(t, by_number)) is not None}
    events: list[tuple[float, float, int]] = []
    for t in touched:
        if t.state == TrialState.FAIL and t.number in continued:
            continue  # counted with the attempt that resumed it
        sp = _spend(t)
        if sp is None:
            continue
        q, sigma, steps = sp
        apart = []
        current = t
        while (hop := _linked(current, by_number)) is not None:  # numbers fall along the chain: it ends
            dead, link = hop
            if link.get("randomness") == "replayed":
                steps = max(steps, _extent(dead))
            else:
                apart.append((q, sigma, max(0, _extent(dead) - int(link.get("step", 0)))))
            current = dead
        events.append((q, sigma, steps))
        events.extend(e for e in apart if e[2] > 0)
    return events


def coverage(study: optuna.Study) -> str:
    """One plain sentence on which examples the study's ε protects."""
    public = study.user_attrs.get(CONFIG_ATTR, {}).get("study", {}).get("validation_dataset")
    if public:
        return (f"The ε covers the training examples only: validation examples come from the separate dataset "
                f"{public!r}, treated as public, and the test examples used to report are not protected by it.")
    return COVERAGE


def search_guarantee(study: optuna.Study) -> dict[str, Any]:
    """The ε of releasing the best trial's model after the search as it ran.

    Ordinary studies: the composition of every trial that touched the training
    data (RDP), each at the steps it took; a trial that failed or is still
    running counts at its planned steps, an upper bound. With ``search_budget``
    a privacy filter enforced the cap before each trial: the cap is the
    guarantee. Private searches: the repeat-and-select bound, valid once all
    of the K drawn trials have run and no more than K touched the data; if more
    did, the bound is void and the composition of all of them is given instead.
    Every mode composes a private ``init_checkpoint``'s recorded spend.
    """
    trials = study.get_trials(deepcopy=False)
    delta = study.user_attrs.get("delta")
    private = study.user_attrs.get("private_search")
    prior = [(float(q), float(s), int(t)) for q, s, t in study.user_attrs.get("prior_privacy_events", [])]
    prior_text = (f" It includes the recorded training of the initial checkpoint on the same data "
                  f"({len(prior)} earlier run(s)).") if prior else ""
    if study.user_attrs.get("non_private"):
        return {"mode": "non_private", "total_epsilon": math.inf, "delta": None, "per_trial_epsilon": None,
                "guarantee": "None: a non-private baseline (no clipping, no noise); its models must not be released "
                             "as private."}
    touched = [t for t in trials if touched_data(t)]
    spends = resumed_spends(trials, touched)
    totals = (search_privacy.composed_epsilon(prior + spends, delta) if delta
              else {"rdp": math.nan, "pld": math.nan})
    if private is not None:
        k = int(private["n_trials"])
        exceeded = len(touched) > k or any(t.number >= k for t in touched)
        settled = [t for t in trials if t.number < k and t.state in (*FINISHED, TrialState.FAIL)]
        complete = not exceeded and len(settled) == k
        validation = study.user_attrs.get(CONFIG_ATTR, {}).get("study", {}).get("validation_dataset")
        base = {
            "mode": "private_search", "delta": delta, "per_trial_epsilon": private["per_trial_epsilon"],
            "sampling_rate": private["sampling_rate"], "noise_multiplier": private["noise_multiplier"],
            "steps": private["steps"], "complete": complete, "valid": not exceeded,
            "trials_drawn": k, "trials_run": len(touched), "trials_touching_data": len(touched),
            "validation_dataset": validation,
        }
        if exceeded:
            return {**base, "total_epsilon": totals["rdp"], "guarantee": (
                f"EXCEEDED, INVALID: {len(touched)} trials trained on the data, more than the secretly drawn number, "
                "so the repeat-and-select bound does not hold. The honest figure is the composition of every trial "
                f"that trained on the data (RDP): ε = {totals['rdp']:.4g}.{prior_text}")}
        total = search_privacy.search_epsilon(private["sampling_rate"], private["noise_multiplier"],
                                              int(private["steps"]), delta, _trial_count_of(private), prior)
        held_out = (f"selection on the public dataset {validation!r}" if validation else
                    "selection on a validation split of the private dataset declared public (a study of an earlier "
                    "dptune; that split is not covered)")
        return {**base, "total_epsilon": total, "guarantee": (
            f"Papernot & Steinke 2022 (RDP): a secret number K of trials drawn from a {private['distribution']} "
            f"law of mean {private['mean_trials']:g}, hyperparameters drawn at random from secret randomness, every "
            f"trial the same DP-SGD mechanism, only the best released, {held_out}. The bound holds while K stays "
            "secret: the trial count, trial numbers and the study storage are internal."
            + prior_text + ("" if complete else " Incomplete: trials remain; run dptune optimize until the search "
                            "is complete before releasing the result."))}
    cap = study.user_attrs.get("search_budget")
    accounted = (f"Composition of the {len(spends)} trial(s) that trained on the data, each at the steps it took "
                 f"(RDP): ε = {totals['rdp']:.4g}.{prior_text}")
    if cap is not None:
        admitted = [tuple(t.user_attrs["filter_request"]) for t in touched if "filter_request" in t.user_attrs]
        filt = RenyiFilter(cap["epsilon"], delta, cap["order"])
        return {
            "mode": "filter", "total_epsilon": cap["epsilon"], "accounted_epsilon": totals["rdp"],
            "filter_epsilon": filt.spent(prior + [(float(q), float(s), int(t)) for q, s, t in admitted]),
            "filter_order": cap["order"], "delta": delta, "per_trial_epsilon": study.user_attrs.get("epsilon_target"),
            "trials_touching_data": len(touched),
            "guarantee": (
                f"Pre-committed: a privacy filter (Feldman & Zrnic 2021, Rényi order {cap['order']:.3g}) started a "
                f"trial only if the whole search stayed within ε = {cap['epsilon']:g}, so releasing the best model "
                f"(and anything else from the search) is ({cap['epsilon']:g}, {delta:g})-DP whatever was chosen while "
                f"watching. {accounted}"),
        }
    return {
        "mode": "composition",
        "total_epsilon": totals["rdp"],
        "total_epsilon_pld_if_nonadaptive": totals["pld"],
        "delta": delta,
        "per_trial_epsilon": study.user_attrs.get("epsilon_target"),
        "trials_touching_data": len(touched),
        "guarantee": (
            f"{accounted} Releasing the best model after the search is covered by this total, not by the per-trial "
            "ε. It was computed after the search, over trials whose number and lengths depended on what was seen: "
            "an accounting of what ran, not a guarantee fixed in advance (set search_budget in the study file to "
            "enforce a cap before each trial)."
        ),
    }


def _trial_count_of(private: dict[str, Any]) -> TrialCount:
    return TrialCount(private["distribution"], private["mean_trials"], private.get("eta"))


def privacy_statement(study: optuna.Study, summary: "StudySummary | None" = None) -> Statement | None:
    """The written statement of releasing the best model after this search (None for non-private studies)."""
    summary = summary or summarize(study)
    g = summary.search
    if summary.non_private:
        return None
    cfg = study.user_attrs.get(CONFIG_ATTR, {}).get("study", {})
    split = study.user_attrs.get("split", {})
    mechanism = None
    if g["mode"] == "private_search":
        mechanism = Mechanism(g["sampling_rate"], g["noise_multiplier"], int(g["steps"]))
    validation = coverage(study)
    assumptions = []
    if cfg.get("validation_dataset"):
        assumptions.append(f"the validation dataset {cfg['validation_dataset']!r} holds none of the individuals of "
                           "the training data")
    if cfg.get("init_checkpoint"):
        assumptions.append("the initial checkpoint's recorded lineage is true and names its data as this study "
                           "does (a checkpoint without dptune metadata, or trained on differently named data that "
                           "holds the same individuals, is treated as trained on public data)")
        if cfg.get("unsafe_ignore_checkpoint_provenance"):
            assumptions.append("UNSAFE: the initial checkpoint's provenance was ignored on request, so what it "
                               "learnt from this data is not covered")
    accountant = "rdp" if g["mode"] in ("private_search", "composition", "filter") else summary.accountant
    return Statement(
        epsilon=g["total_epsilon"], delta=g["delta"], accountant=accountant,
        dataset=cfg.get("dataset"), dataset_size=split.get("train"), mechanism=mechanism,
        search=g["guarantee"],
        validation=validation, seed_fixed=cfg.get("private_seed") is not None,
        extra_assumptions=tuple(assumptions),
    )


def summarize(study: optuna.Study) -> StudySummary:
    """Counts, compute spent (trial-steps) and the best completed trial."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    rejected = sum(1 for t in trials if t.state == TrialState.PRUNED and "rejected_reason" in t.user_attrs)
    skipped = sum(1 for t in trials if "skipped_reason" in t.user_attrs)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = trial_record(max(complete, key=lambda t: t.value)) if complete else None
    return StudySummary(
        name=study.study_name,
        epsilon_target=study.user_attrs.get("epsilon_target", math.nan),
        delta=study.user_attrs.get("delta") or math.nan,
        accountant=study.user_attrs.get("accountant", "?"),
        n_trials=len(trials) - skipped,
        complete=len(complete),
        pruned=states.count(TrialState.PRUNED) - rejected - skipped,
        rejected=rejected,
        failed=states.count(TrialState.FAIL),
        running=states.count(TrialState.RUNNING),
        trial_steps=sum(int(t.user_attrs.get("steps", 0) or 0) for t in trials),
        examples_processed=sum(int(t.user_attrs.get("examples_processed", 0) or 0) for t in trials),
        best=best,
        search=search_guarantee(study),
    )


def list_studies(storage: str) -> list[dict[str, Any]]:
    """One row per study in ``storage``."""
    rows = []
    for s in optuna.get_all_study_summaries(open_storage(storage, create=False), include_best_trial=True):
        private = s.user_attrs.get("private_search")
        rows.append({
            "name": s.study_name,
            # A private search's trial count is its secret K; its ε is the search total.
            "trials": None if private else s.n_trials,
            "best_value": s.best_trial.value if s.best_trial else None,
            "epsilon_target": private["total_epsilon"] if private else s.user_attrs.get("epsilon_target"),
            "dataset": s.user_attrs.get(CONFIG_ATTR, {}).get("study", {}).get("dataset"),
            "dptune": CONFIG_ATTR in s.user_attrs,
        })
    return rows
