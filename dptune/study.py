"""The study driver: Optuna studies of DP-SGD hyperparameters under a fixed ε.

A study's whole configuration (study file + search space, resolved) is stored
in the study's user attributes, so a worker anywhere needs only the storage URL
and the study name. Each trial

1. samples hyperparameters and derives steps or σ from the budget
   (:func:`dptune.search_space.plan_trial`); an infeasible sample is recorded
   as PRUNED with ``rejected_reason`` and ε spent 0 — it never touched data;
2. trains with :func:`dptune.train.train_and_evaluate`, reporting validation
   accuracy at each evaluation (``trial.report``) and stopping when the pruner
   says so;
3. records what ran as user attributes: ε target and spent, δ, accountant,
   q, σ, C, steps, epochs, examples/s, compile and wall time, seeds, devices.

Pruned trials are PRUNED, not FAILED, so TPE learns from them; their recorded ε
is what they really spent.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune import __version__, microbatch, orphans, privacy, search_privacy
from dptune.augment import Augmentation
from dptune.config import ResolvedStudy, SearchSpace, StudyConfig, default_storage
from dptune.data import Dataset, load_dataset
from dptune.errors import ConfigError, DptuneError, PrivacyError
from dptune.orphans import reap_dead_workers
from dptune.search_privacy import TrialCount
from dptune.search_space import Infeasible, plan_trial, smallest_batch
from dptune.storage import open_storage
from dptune.train import PrivacyBudget, RunConfig, train_and_evaluate

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
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, image_size=cfg.image_size,
                        test_split=cfg.test_split)


def _resolve_delta(resolved: ResolvedStudy, dataset: Dataset) -> float | None:
    n = len(dataset.train)
    cfg = resolved.study
    if cfg.non_private:
        return None
    given = cfg.privacy.delta if cfg.privacy is not None else cfg.search_privacy.delta
    delta = given if given is not None else privacy.default_delta(n)
    privacy.check_delta(delta, n)
    return delta


def _trial_count(cfg: StudyConfig) -> TrialCount:
    t = cfg.search_privacy.trials
    try:
        return TrialCount(t.distribution, t.mean, t.eta)
    except PrivacyError as e:
        raise ConfigError("search_privacy.trials", str(e)) from None


def _plan_private_search(resolved: ResolvedStudy, dataset: Dataset, delta: float) -> dict[str, Any]:
    """Draw the number of trials and calibrate the one mechanism every trial runs."""
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
    sigma = search_privacy.noise_for_search(q, steps, total, delta, count)
    return {
        # The bound holds over the randomness of K, so K is as secret as the noise:
        # drawn from private_seed (reproducible, keep it secret) or the OS.
        "n_trials": count.sample(np.random.default_rng(
            None if cfg.private_seed is None else [cfg.private_seed, 7])),
        "n_trials_seed_fixed": cfg.private_seed is not None,
        "distribution": count.distribution,
        "mean_trials": count.mean,
        "eta": count.eta,
        "sampling_rate": q,
        "noise_multiplier": sigma,
        "steps": steps,
        "total_epsilon": search_privacy.search_epsilon(q, sigma, steps, delta, count),
        "total_epsilon_target": total,
        "per_trial_epsilon": privacy.epsilon(q, sigma, steps, delta, "rdp"),
    }


def create_study(resolved: ResolvedStudy, storage: str | None = None, *, skip_if_exists: bool = False) -> optuna.Study:
    """Create a study holding its full configuration.

    Everything is validated first (the dataset is opened, δ checked against
    1/N, the sampler built), so a bad configuration writes nothing. An
    existing study of the same name is an error unless ``skip_if_exists`` and
    its stored configuration is identical.
    """
    study_cfg = resolved.study
    storage = storage or study_cfg.storage or default_storage(study_cfg.name)
    dataset = _dataset(study_cfg)
    delta = _resolve_delta(resolved, dataset)
    make_sampler(study_cfg, resolved.space, study_cfg.seed)
    from dptune.models import build_model

    model = build_model(study_cfg.model, dataset.num_classes, weight_standardization=study_cfg.weight_standardization)
    if study_cfg.init_checkpoint:
        # A checkpoint that does not fit is a configuration error, found before anything is written.
        from dptune import checkpoint
        from dptune.models import init_params

        checkpoint.fit(init_params(model, dataset.image_shape, jax.random.key(0)),
                       checkpoint.load(study_cfg.init_checkpoint), study_cfg.reinitialize)
    stored = resolved.to_json()
    attrs: dict[str, Any] = {CONFIG_ATTR: stored, "dptune_version": __version__, "delta": delta,
                             "split": dataset.split.as_dict()}
    if study_cfg.private_search:
        plan = _plan_private_search(resolved, dataset, delta)
        attrs.update(private_search=plan, epsilon_target=plan["per_trial_epsilon"], accountant="rdp")
    elif study_cfg.non_private:
        attrs.update(non_private=True)
    else:
        attrs.update(epsilon_target=study_cfg.privacy.epsilon, accountant=study_cfg.privacy.accountant)

    storage_obj = open_storage(storage)
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
    url = storage or default_storage(study_name)
    storage_obj = open_storage(url, heartbeat=heartbeat)
    if _find(study_name, storage_obj) is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage_obj, include_best_trial=False)]
        raise StudyError(f"study_name: no study {study_name!r} in {url}; "
                         f"available: {', '.join(names) if names else '(none)'}")
    study = optuna.load_study(study_name=study_name, storage=storage_obj)
    if CONFIG_ATTR not in study.user_attrs:
        raise StudyError(f"study_name: {study_name!r} was not created by dptune (no stored configuration)")
    return study, ResolvedStudy.from_json(study.user_attrs[CONFIG_ATTR])


# -- trials ---------------------------------------------------------------------

class Objective:
    """The per-trial function handed to ``study.optimize``."""

    def __init__(self, resolved: ResolvedStudy, dataset: Dataset, delta: float,
                 private_search: dict[str, Any] | None = None):
        self.resolved = resolved
        self.dataset = dataset
        cfg = resolved.study
        self.fixed = None
        self.budget: PrivacyBudget | None = None
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
        cfg = self.resolved.study
        n = len(self.dataset.train)
        trial.set_user_attr(orphans.WORKER_ATTR, orphans.worker_identity())
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

        reports = []

        def report(step: int, metrics: dict[str, float]) -> bool:
            # With averaging on, the better of raw and EMA parameters is what the trial would release.
            reports.append(metrics["best_val_accuracy"])
            trial.report(metrics["best_val_accuracy"], len(reports))
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
            seed=cfg.seed + trial.number,
            private_seed=None if cfg.private_seed is None else cfg.private_seed + trial.number,
        )
        orphans.abort_if_test_requests(trial.number)
        result = train_and_evaluate(self.dataset, plan.hparams, plan.steps, config=config,
                                    budget=self.budget, callback=report)
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
    KeyboardInterrupt marks the running trial FAILED (Optuna's own handling)
    and propagates; finished trials are already in the storage.
    """
    study, resolved = load(study_name, storage, heartbeat=True)
    reap_dead_workers(study)
    cfg = resolved.study
    dataset = _dataset(cfg)
    delta = study.user_attrs.get("delta") or _resolve_delta(resolved, dataset)
    # A fresh seed per session, so a continued study does not replay its first samples.
    seed = cfg.seed + len(study.trials)
    private = study.user_attrs.get("private_search")
    if private is not None:
        # The number of trials was drawn at creation; every trial that ran counts.
        remaining = private["n_trials"] - len(study.trials)
        if remaining <= 0:
            return study
        n_trials = remaining if n_trials is None else min(n_trials, remaining)
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
        study.pruner = optuna.pruners.NopPruner()
    else:
        study.sampler = make_sampler(cfg, resolved.space, seed)
        study.pruner = make_pruner(cfg)
    hooks = list(callbacks) + [lambda st, _t: reap_dead_workers(st)]
    if stop_at_finished is not None:
        # Several workers share one target: stop once the study holds that many finished trials.
        hooks.append(optuna.study.MaxTrialsCallback(stop_at_finished, states=FINISHED))
    study.optimize(Objective(resolved, dataset, delta, private), n_trials=n_trials, timeout=timeout,
                   callbacks=hooks, catch=())
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
    def budget_text(self) -> str:
        """The per-trial budget in words ("ε = 3 per trial (δ = 1e-05, pld)" or "non-private")."""
        if self.non_private:
            return "non-private (no clipping, no noise: no privacy)"
        return f"ε = {self.epsilon_target:.4g} per trial (δ = {self.delta:g}, {self.accountant})"


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


def search_guarantee(study: optuna.Study) -> dict[str, Any]:
    """The ε of releasing the best trial's model after the search as it ran.

    Ordinary studies: the composition of every trial that touched the training
    data (RDP, valid for adaptively chosen trials), each at the steps it took;
    a trial that failed or is still running counts at its planned steps, an
    upper bound. Private searches: the repeat-and-select bound, valid once all
    of the K drawn trials have run.
    """
    trials = study.get_trials(deepcopy=False)
    delta = study.user_attrs.get("delta")
    private = study.user_attrs.get("private_search")
    if study.user_attrs.get("non_private"):
        return {"mode": "non_private", "total_epsilon": math.inf, "delta": None, "per_trial_epsilon": None,
                "guarantee": "None: a non-private baseline (no clipping, no noise); its models must not be released "
                             "as private."}
    if private is not None:
        done = len(trials)
        complete = done >= private["n_trials"]
        return {
            "mode": "private_search",
            "total_epsilon": private["total_epsilon"],
            "delta": delta,
            "per_trial_epsilon": private["per_trial_epsilon"],
            "trials_drawn": private["n_trials"],
            "trials_run": done,
            "complete": complete,
            "guarantee": (
                f"Papernot & Steinke 2022 (RDP): K = {private['n_trials']} trials drawn from a "
                f"{private['distribution']} law of mean {private['mean_trials']:g}, hyperparameters drawn at random, "
                "every trial the same DP-SGD mechanism, only the best released; validation declared public. "
                "K and the other trials stay internal: the study storage is as sensitive as the data."
                + ("" if complete else f" Incomplete: {done} of {private['n_trials']} trials ran; finish them "
                   "before releasing the result.")
            ),
        }
    touched = []
    for t in trials:
        a = t.user_attrs
        if "rejected_reason" in a or "sampling_rate" not in a:
            continue
        steps = a.get("steps") if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else a.get("planned_steps")
        if steps:
            touched.append((a["sampling_rate"], a["noise_multiplier"], int(steps)))
    totals = search_privacy.composed_epsilon(touched, delta) if delta else {"rdp": math.nan, "pld": math.nan}
    return {
        "mode": "composition",
        "total_epsilon": totals["rdp"],
        "total_epsilon_pld_if_nonadaptive": totals["pld"],
        "delta": delta,
        "per_trial_epsilon": study.user_attrs.get("epsilon_target"),
        "trials_touching_data": len(touched),
        "guarantee": (
            f"Composition of the {len(touched)} trial(s) that trained on the data, each at the ε it spent "
            "(RDP accountant, valid for adaptively chosen trials). Releasing the best model after the search "
            "is covered by this total, not by the per-trial ε."
        ),
    }


def summarize(study: optuna.Study) -> StudySummary:
    """Counts, compute spent (trial-steps) and the best completed trial."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    rejected = sum(1 for t in trials if t.state == TrialState.PRUNED and "rejected_reason" in t.user_attrs)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = trial_record(max(complete, key=lambda t: t.value)) if complete else None
    return StudySummary(
        name=study.study_name,
        epsilon_target=study.user_attrs.get("epsilon_target", math.nan),
        delta=study.user_attrs.get("delta") or math.nan,
        accountant=study.user_attrs.get("accountant", "?"),
        n_trials=len(trials),
        complete=len(complete),
        pruned=states.count(TrialState.PRUNED) - rejected,
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
    for s in optuna.get_all_study_summaries(open_storage(storage), include_best_trial=True):
        rows.append({
            "name": s.study_name,
            "trials": s.n_trials,
            "best_value": s.best_trial.value if s.best_trial else None,
            "epsilon_target": s.user_attrs.get("epsilon_target"),
            "dataset": s.user_attrs.get(CONFIG_ATTR, {}).get("study", {}).get("dataset"),
            "dptune": CONFIG_ATTR in s.user_attrs,
        })
    return rows
