"""The study driver: create, load and optimize Optuna studies of DP-SGD hyperparameters under a fixed ε.

A study's whole configuration (study file + search space, resolved) is stored
in the study's user attributes, so a worker anywhere needs only the storage URL
and the study name. :func:`create_study` validates everything before it
writes anything; :func:`optimize` runs trials of :class:`dptune.search.objective.Objective`.

Pruned trials are PRUNED, not FAILED, so TPE learns from them; their recorded ε
is what they really spent.

Counts and caps that protect the guarantee are enforced through the storage,
never per process: a private search's K by trial number (Optuna numbers trials
atomically in the storage), and a ``search_budget`` by a privacy filter whose
requests every trial writes before it reads the others'.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import jax
import optuna
from optuna.trial import FrozenTrial

from dptune import __version__, interrupt
from dptune.config.schema import ConfigLike, Overrides, ResolvedStudy, StudyConfig, check_name, default_storage, resolve
from dptune.data.datasets import Dataset
from dptune.errors import ConfigError, DptuneError, PrivacyError, StudyError
from dptune.models import checkpoint
from dptune.privacy import accounting as privacy
from dptune.privacy import search_totals as search_privacy
from dptune.privacy import total_budget
from dptune.privacy.mechanism import Mechanism, mechanisms
from dptune.privacy.search_totals import TrialCount
from dptune.progress import Reporter
from dptune.randomness import SecretSeed
from dptune.search import modes, proxy, record, release
from dptune.search import storage as storage_lib
from dptune.search.objective import Objective
from dptune.search.orphans import reap_dead_workers
from dptune.search.record import StudyRecord
from dptune.search.regimes import CreateContext, TotalBudget, regime_for_config
from dptune.search.registry import make_pruner, make_sampler
from dptune.search.results import FINISHED
from dptune.search.space import check_space
from dptune.search.storage import open_storage
from dptune.search.watch import StudyWatch
from dptune.trainer.run import check_model, dataset_of
from dptune.trainer.train import PrivacyBudget

__all__ = ["create_study", "load", "load_study", "optimize", "storage_url", "StudyError", "TrialCallback"]


# -- create / load ------------------------------------------------------------

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
    assert cfg.search_privacy is not None
    t = cfg.search_privacy.trials
    try:
        return TrialCount(t.distribution, t.mean, t.eta)
    except PrivacyError as e:
        raise ConfigError("search_privacy.trials", str(e)) from None


def trial_count_secret(resolved: ResolvedStudy, study_id: str) -> SecretSeed:
    """Where a private search's K comes from: the OS, or a fixed ``private_seed`` keyed on the study's
    random id and configuration too (two searches, even of one file, never share their K)."""
    digest = hashlib.sha256(json.dumps(resolved.to_json(), sort_keys=True, default=str).encode()).hexdigest()
    return SecretSeed.resolve(resolved.study.private_seed).child(f"number of trials {study_id} {digest}")


def _fixed_run(resolved: ResolvedStudy, n: int) -> tuple[int, float, int]:
    """(B, q, T) of a search whose batch size and epochs are fixed numbers (the schema checked that) on N = ``n``.

    Raises:
      ConfigError: the batch is not in [1, N].
    """
    space = resolved.space
    assert isinstance(space.batch_size, (int, float)) and isinstance(space.epochs, (int, float))
    batch = int(space.batch_size)
    if not 1 <= batch <= n:
        raise ConfigError("search_space.batch_size", f"must be in [1, {n}], got {batch}")
    q = batch / n
    return batch, q, max(1, math.ceil(float(space.epochs) / q))


def _plan_private_search(resolved: ResolvedStudy, dataset: Dataset, delta: float,
                         prior: Sequence[Mechanism], study_id: str) -> dict[str, Any]:
    """Draw the number of trials and calibrate the one mechanism every trial runs.

    ``prior``: a private initial checkpoint's recorded runs on the same data,
    composed in, so that the whole release meets ``total_epsilon``.
    """
    cfg = resolved.study
    n = len(dataset.train)
    assert cfg.search_privacy is not None
    batch, q, steps = _fixed_run(resolved, n)
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
    return {
        "n_trials": count.sample(trial_count_secret(resolved, study_id).sampler()),
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


def _plan_total(resolved: ResolvedStudy, n: int, delta: float, prior: Sequence[Mechanism]) -> dict[str, Any]:
    """A total budget's plan for N = ``n`` examples (:func:`dptune.privacy.total_budget.plan_total`).

    Raises:
      ConfigError: the total leaves no useful plan (naming the smallest total that works), or the subset
        would hold less than one example.
    """
    cfg = resolved.study
    p = cfg.privacy
    assert p is not None and p.total_epsilon is not None  # the regime is chosen by it
    batch, q, steps = _fixed_run(resolved, n)
    if cfg.budget.max_epochs is not None:
        steps = min(steps, math.ceil(cfg.budget.max_epochs / q))
    if cfg.budget.max_steps is not None:
        steps = min(steps, cfg.budget.max_steps)
    fraction = p.subset_fraction or total_budget.DEFAULT_FRACTION
    if fraction * n < 1:
        raise ConfigError("privacy.subset_fraction", f"{fraction:g} of {n} training examples is less than one")
    shape = total_budget.Shape(q, steps, p.proxies or total_budget.DEFAULT_PROXIES, fraction,
                               p.tuning_share or total_budget.DEFAULT_TUNING_SHARE, delta, tuple(prior))
    try:
        return total_budget.plan_total(p.total_epsilon, shape)
    except total_budget.BudgetTooSmall as e:
        raise ConfigError("privacy.total_epsilon", str(e)) from None


def _prepare(resolved: ResolvedStudy, study_id: str) -> dict[str, Any]:
    """Validate everything and compute the study's user attributes, writing nothing."""
    study_cfg = resolved.study
    sp = study_cfg.search_privacy
    if sp is not None and study_cfg.validation_dataset is None:
        raise ConfigError("validation_dataset", "a private search chooses the best trial by validation accuracy, "
                          "which its theorem covers only on public examples: name a public dataset (e.g. digits), "
                          "not a split of the private one")
    if study_cfg.artifacts.path:
        _check_folder("artifacts.path", study_cfg.artifacts.path)
    dataset = dataset_of(study_cfg)
    delta = _resolve_delta(resolved, dataset)
    check_space(resolved.space, len(dataset.train), private=not study_cfg.non_private)
    # A search mode that cannot run or be accounted is refused here, before anything is written.
    public = proxy.public_dataset(resolved)
    if public is not None:
        check_space(resolved.space, len(public.train), private=True)
        shared = proxy.shared_examples(dataset, public)
        if shared:
            raise ConfigError("search.dataset", f"{public.name!r} holds {shared} input(s) identical to training "
                              f"inputs of the private {study_cfg.dataset!r}: proxies on it would read private data "
                              "without being accounted; use a dataset that shares no individual with the private one")
    mode = modes.check_create(resolved, len(dataset.train), delta,
                              None if public is None else (public.name, len(public.train), public.image_shape,
                                                           public.num_classes),
                              (dataset.image_shape, dataset.num_classes))
    make_sampler(study_cfg, resolved.space, study_cfg.seed)
    from dptune.models.builtin import build_model

    check_model(study_cfg, dataset)  # a user's model that mixes examples is refused before anything is written
    model = build_model(study_cfg.model, dataset.num_classes, weight_standardization=study_cfg.weight_standardization,
                        input_shape=dataset.image_shape, args=study_cfg.model_args)
    prior: list[Mechanism] = []
    if study_cfg.init_checkpoint:
        # A checkpoint that does not fit, or that saw this data without privacy, is a
        # configuration error, found before anything is written.
        from dptune.models.builtin import init_params

        spent = checkpoint.prior_spend(study_cfg.init_checkpoint, dataset.name, private=not study_cfg.non_private,
                                       unsafe_ignore=study_cfg.unsafe_ignore_checkpoint_provenance)
        if spent.bounds:
            # A study's totals compose DP-SGD runs; a search's (ε, δ) bound is not one.
            raise checkpoint.CheckpointError(
                f"{study_cfg.init_checkpoint} was selected by a search whose cost is a bound (ε, δ), which a study "
                "cannot compose with its trials; continue from it with dptune train, which adds the bound")
        prior = list(mechanisms(spent.events))
        checkpoint.fit(init_params(model, dataset.image_shape, jax.random.key(0), dataset.input_dtype),
                       checkpoint.load(study_cfg.init_checkpoint), study_cfg.reinitialize)
    # Whether the public tuning set was compared with the private one example by example (the statement says).
    checked = {} if public is None else {"content_checked": shared is not None}
    stored_mode = None if mode is None else {**mode, **checked}
    total = None
    if study_cfg.privacy is not None and study_cfg.privacy.total:
        total = _plan_total(resolved, len(dataset.train), cast(float, delta), prior)
        stored_mode = modes.planned_mode(total, len(dataset.train), int(cast(float, resolved.space.batch_size)))
    attrs = record.study_attrs(
        config=resolved.to_json(), version=__version__, delta=delta, split=dataset.split.as_dict(),
        prior=[list(e) for e in prior], search_mode=stored_mode,
        init_checkpoint_sha=checkpoint.fingerprint(study_cfg.init_checkpoint) if study_cfg.init_checkpoint else None)
    attrs.update(_regime_attrs(resolved, dataset, delta, prior, study_id, total))
    return attrs


def _regime_attrs(resolved: ResolvedStudy, dataset: Dataset, delta: float | None,
                  prior: Sequence[Mechanism], study_id: str, total: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attributes of the study's privacy regime, which checks itself first (:meth:`Regime.check`)."""
    cfg = resolved.study
    regime = regime_for_config(cfg)
    ctx = CreateContext(
        delta=delta, prior=prior, dataset=dataset.name,
        epsilon=None if cfg.privacy is None else cfg.privacy.epsilon,
        accountant=None if cfg.privacy is None else cfg.privacy.accountant,
        cap=None if cfg.search_budget is None else (cfg.search_budget.epsilon, cfg.search_budget.order),
        draw_private_search=lambda: _plan_private_search(resolved, dataset, cast(float, delta), prior, study_id),
        plan_total=None if total is None else (lambda: total))
    return regime.check(ctx)


def _check_folder(field: str, path: str) -> None:
    """Refuse a folder that could not be created, leaving nothing behind (a probe folder is removed)."""
    head = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(head):
        head = os.path.dirname(head)
    try:
        if not os.path.isdir(head):
            raise NotADirectoryError(20, "Not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".dptune-probe-", dir=head))
    except OSError as e:
        raise ConfigError(field, f"{path}: cannot be created ({e.strerror} at {head})") from None


def _in_file(e: DptuneError, source: str, space_file: str | None) -> DptuneError:
    """``e`` naming the file the user must edit: the study file, or the search-space file for its fields."""
    if isinstance(e, ConfigError):
        message = str(e)[len(e.field) + 2:]
        if space_file is not None and e.field.startswith("search_space."):
            return ConfigError(f"{space_file}: {e.field.removeprefix('search_space.')}", message)
        return ConfigError(f"{source}: {e.field}", message)
    return type(e)(f"{source}: {e}")


def create_study(config: ConfigLike, storage: str | None = None, *, skip_if_exists: bool = False,
                 overrides: Overrides | None = None, source: str | None = None) -> optuna.Study:
    """Create a study holding its full configuration (``dptune study create``).

    Everything is validated first (the dataset is opened, δ checked against
    1/N, every search-space value against N, the sampler built), so a bad
    configuration writes nothing.

    Args:
      config: a study file's path, a dict of its keys (``search_space`` may be the space itself),
        a :class:`~dptune.config.schema.StudyConfig` or a resolved study.
      storage: an Optuna storage URL (default: the file's ``storage``, else ``sqlite:///studies/<name>.db``).
      skip_if_exists: return an existing study of the same name and identical configuration.
      overrides: dotted-key overrides of the configuration (``{"privacy.epsilon": 1.0}``).
      source: the file to name in errors (default: ``config`` when it is a path).

    Returns:
      The Optuna study; its user attributes hold the configuration, δ, the split and the budget.

    Raises:
      ConfigError: a value the schema or the data refuses (naming the file and the field).
      StudyError: a study of that name exists (with another configuration, or without ``skip_if_exists``).

    Guarantee: a private search's number of trials K is drawn here from the OS (or the secret
    ``private_seed``) and its σ calibrated so that releasing the best of its trials meets
    ``search_privacy.total_epsilon``.
    """
    if source is None and isinstance(config, (str, os.PathLike)):
        source = os.fspath(config)
    resolved = resolve(config, overrides)
    study_cfg = resolved.study
    storage = storage or study_cfg.storage or default_storage(study_cfg.name)
    storage_lib.check_url(storage)
    new_id = release.new_study_id()  # before the plan: a private search's K is keyed on it
    try:
        attrs = _prepare(resolved, new_id)
    except DptuneError as e:
        if source is None:
            raise
        from dptune.config.schema import search_space_path

        try:
            space_file = search_space_path(study_cfg.search_space, source)
        except ConfigError:
            space_file = None
        raise _in_file(e, source, space_file) from None
    seed = study_cfg.private_seed
    if seed is not None:
        # Kept out of the storage: whoever reads it could recompute every trial's batches and noise.
        config = record.config_of(attrs) or {}
        attrs = record.with_config(attrs, {**config, "study": {**config["study"], "private_seed": None}})
        attrs[record.SEED_FIXED] = True
    stored = record.config_of(attrs)

    storage_obj = open_storage(storage)
    with storage_lib.writing(storage):
        existing = _find(study_cfg.name, storage_obj)
        if existing is not None:
            found = storage_lib.remember(optuna.load_study(study_name=study_cfg.name, storage=storage_obj),
                                         storage_obj, storage)
            if record.config_of(existing.user_attrs) != stored or _stored_seed(found, storage) != seed:
                raise StudyError(f"study_name: a study {study_cfg.name!r} with a different configuration exists "
                                 f"in {storage}; choose another name or delete it")
            if not skip_if_exists:
                raise StudyError(f"study_name: {study_cfg.name!r} already exists in {storage} (use --skip-if-exists)")
            return found

        return _write_new(study_cfg, storage, storage_obj, attrs, new_id)


def _write_new(study_cfg: StudyConfig, storage: str, storage_obj: Any, attrs: dict[str, Any],
               new_id: str) -> optuna.Study:
    """Create the study and write its record in full, or leave no study behind."""
    seed = study_cfg.private_seed
    study = optuna.create_study(study_name=study_cfg.name, storage=storage_obj,
                                direction=study_cfg.objective.direction)
    try:
        # A Ctrl-C here would leave a study without its configuration: finish or undo.
        with interrupt.deferred(), warnings.catch_warnings():
            # Metric names are "experimental" in Optuna; the dashboard shows the name instead of "Objective 0".
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([study_cfg.objective.metric])
            # Set before any worker can see the configuration: every worker reads the same id.
            storage_lib.remember(study, storage_obj, storage)
            storage_lib.backend(study).set_system_attr(record.STUDY_ID, new_id)
            for key, value in attrs.items():
                study.set_user_attr(key, value)
            if seed is not None:  # where: the stored configuration's artifacts.path, if any
                release.keep_private_seed(study, storage, seed)
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
    rec = StudyRecord.of(study)
    if not rec.is_dptune:
        raise StudyError(f"study_name: {study_name!r} was not created by dptune (no stored configuration)")
    storage_lib.remember(study, storage_obj, url)
    resolved = ResolvedStudy.from_json(rec.config)
    if rec.seed_fixed:
        try:
            seed = release.private_seed(study, url)
        except release.ReleaseError as e:
            raise StudyError(str(e)) from None
        resolved = resolved.model_copy(update={"study": resolved.study.model_copy(update={"private_seed": seed})})
    return study, resolved


def _stored_seed(study: optuna.Study, storage_url: str) -> int | None:
    """The fixed private_seed of an existing study (None if it has none, or an older study stored it inline)."""
    rec = StudyRecord.of(study)
    if not rec.seed_fixed:
        return rec.study_config.get("private_seed")
    try:
        return release.private_seed(study, storage_url)
    except release.ReleaseError:
        return None


def load_study(study_name: str, storage: str | None = None) -> optuna.Study:
    """A dptune study from its storage (default ``sqlite:///studies/<name>.db``).

    Raises:
      StudyError: no such study, or one dptune did not create.
    """
    return load(study_name, storage)[0]


def storage_url(study: optuna.Study, storage: str | None = None) -> str:
    """The storage URL of a study dptune opened (Optuna does not expose it), or ``storage`` when given.

    Raises:
      StorageError: the study was opened without dptune and no ``storage`` was given.
    """
    return storage if storage is not None else storage_lib.backend(study).url


TrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def optimize(
    study: optuna.Study | str,
    storage: str | None = None,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    devices_per_trial: int = 1,
    callbacks: Sequence[TrialCallback] = (),
    stop_at_finished: int | None = None,
    cache_dir: str | None = None,
    progress: Reporter | None = None,
) -> optuna.Study:
    r"""Run ``n_trials`` more trials (or until ``timeout`` seconds) of a stored study (``dptune optimize``).

    Dead workers' trials are failed and re-queued before and after each trial.
    A KeyboardInterrupt marks the running trial FAILED with a ``failed_reason``
    and propagates; finished trials are already in the storage. Under
    :func:`dptune.interrupt.handled`, SIGINT and SIGTERM never cut a storage
    write short, so no trial is left RUNNING.

    Args:
      study: a study from :func:`create_study`/:func:`load_study`, or its name.
      storage: its storage URL (default: where the study was opened, else ``sqlite:///studies/<name>.db``).
      n_trials: trials to run now (in all, over every worker); None: until ``timeout``.
      timeout: seconds.
      workers: processes, each with ``devices_per_trial`` devices (several need a journal or database storage).
      callbacks: called as ``callback(study, trial)`` after each finished trial.
      stop_at_finished: stop once the study holds that many COMPLETE or PRUNED trials (a shared target).
      cache_dir: JAX's persistent compilation cache for worker processes.
      progress: receives :class:`dptune.progress.Event`\ s: each running trial's steps and validations,
        each finished trial, the search so far (with several workers, tagged with the worker's index).

    Returns:
      The study (reloaded from the storage when several workers ran).

    Raises:
      StudyError: no such study; or a worker process failed (finished trials are kept).
      ConfigError: the data changed since the study was created, or the storage cannot serve ``workers``.

    Guarantee: every trial's spend is recorded in the storage and counted by the search's
    privacy statement; a private search's K and a ``search_budget`` are enforced through the
    storage, so any number of workers and machines stays within them.
    """
    if isinstance(study, optuna.Study):
        study_name = study.study_name
        storage = storage_url(study, storage)
    else:
        study_name = study
    url = storage or default_storage(study_name)
    if workers > 1:
        return _optimize_pool(study_name, url, workers=workers, n_trials=n_trials, timeout=timeout,
                              devices_per_trial=devices_per_trial, callbacks=callbacks, cache_dir=cache_dir,
                              progress=progress)
    study, resolved = load(study_name, url, heartbeat=True)
    with interrupt.deferred(), storage_lib.writing(url):
        reap_dead_workers(study)
    dataset = dataset_of(resolved.study)
    rec = StudyRecord.of(study)
    left, n_trials = _choose_search(study, resolved, rec, n_trials)
    if not left:
        return study
    hooks = _hooks(study, url, callbacks, stop_at_finished)
    if rec.split is not None and rec.split != dataset.split.as_dict():
        # q = B/N and the planned mechanism were fixed for the data as it was at create.
        raise StudyError(f"dataset: {resolved.study.dataset!r} is not what it was when the study was created "
                         f"({rec.split} then, {dataset.split.as_dict()} now); create a new study")
    objective = _objective(study, resolved, dataset, rec, url, progress)
    if progress is not None:
        watch = StudyWatch(progress, study_name, n_trials, private_search=objective.secret_count)
        hooks.insert(1, watch)  # after the best model is kept, before the user's callbacks
    # A signal waits for the next check point (a training step, a finished trial), so that it
    # never cuts a storage write short.
    with (storage_lib.one_process(url), interrupt.deferred(), storage_lib.writing(url),
          _quiet_trials(objective.secret_count)):
        study.optimize(objective, n_trials=n_trials, timeout=timeout, callbacks=hooks, catch=())
    return study


def _optimize_pool(study_name: str, url: str, *, workers: int, n_trials: int | None, timeout: float | None,
                   devices_per_trial: int, callbacks: Sequence[TrialCallback], cache_dir: str | None,
                   progress: Reporter | None) -> optuna.Study:
    """:func:`optimize` over ``workers`` processes (:mod:`dptune.search.workers`)."""
    from dptune.search import workers as pool

    cfg = load(study_name, url)[1].study
    here = [k for k in ("model", "dataset", "loss") if str(getattr(cfg, k) or "").startswith("__main__:")]
    if here:
        raise ConfigError("workers", f"{here[0]} {getattr(cfg, here[0])!r} lives in this script (__main__), which "
                                     "worker processes cannot import; move it to a module, or use workers=1")

    def on_trial(t: FrozenTrial) -> None:
        for callback in callbacks:
            callback(loaded, t)

    loaded = load_study(study_name, url)
    code = pool.run_pool(study_name, url, workers=workers, n_trials=n_trials, timeout=timeout,
                         devices_per_trial=devices_per_trial, cache_dir=cache_dir, on_trial=on_trial,
                         progress=progress)
    if code != 0:
        raise StudyError(f"workers: a worker exited with code {code}; finished trials are kept, nothing is "
                         "left RUNNING; run again to continue")
    return load_study(study_name, url)


def _choose_search(study: optuna.Study, resolved: ResolvedStudy, rec: StudyRecord,
                   n_trials: int | None) -> tuple[bool, int | None]:
    """Set the study's sampler and pruner; whether any trial is left to run, and how many to run now."""
    cfg = resolved.study
    private = rec.private_search
    if private is None:
        # A fresh seed per session, so a continued study does not replay its first samples.
        study.sampler = make_sampler(cfg, resolved.space, cfg.seed + len(study.trials))
        study.pruner = make_pruner(cfg)
        return True, n_trials
    # The number of trials was drawn at creation; every trial that ran counts.
    # This only saves starting processes for nothing: the objective enforces K.
    remaining = private["n_trials"] - len(study.trials)
    if remaining <= 0:
        return False, 0
    # Seeded from the OS (full MT19937 state), not from the public seed: draws that an
    # adversary could replay would reveal which trial index the released one had.
    study.sampler = optuna.samplers.RandomSampler(seed=None)
    study.pruner = optuna.pruners.NopPruner()
    return True, remaining if n_trials is None else min(n_trials, remaining)


def _hooks(study: optuna.Study, url: str, callbacks: Sequence[TrialCallback],
           stop_at_finished: int | None) -> list[Callable[[optuna.Study, FrozenTrial], Any]]:
    """What runs after each trial: keep the best model, the user's callbacks, reap dead workers, stop on a signal."""
    # The best model is decided once the trial's value is in the storage (release.keep_best), before user callbacks.
    hooks: list[Callable[[optuna.Study, FrozenTrial], Any]] = [lambda st, t: release.keep_best(st, t, url)]
    hooks += list(callbacks) + [lambda st, _t: reap_dead_workers(st)]
    with interrupt.deferred(), storage_lib.writing(url):
        release.sweep_pending(study, url)
    if stop_at_finished is not None:
        # Several workers share one target: stop once the study holds that many finished trials.
        hooks.append(optuna.study.MaxTrialsCallback(stop_at_finished, states=FINISHED))
    # The finished trial is in the storage by now: the place to stop for a signal that came meanwhile.
    hooks.append(lambda _st, _t: interrupt.raise_if_pending())
    return hooks


def _objective(study: optuna.Study, resolved: ResolvedStudy, dataset: Dataset, rec: StudyRecord, url: str,
               progress: Reporter | None) -> Objective:
    """The study's objective: its regime's terms, and a mode's proxies until the final run, then nothing."""
    delta = rec.delta or _resolve_delta(resolved, dataset)
    objective = Objective(resolved, dataset, delta, rec.private_search, rec.search_budget, rec.prior,
                          total_budget=rec.total_budget)
    objective.resolved_checkpoint = rec.init_checkpoint_sha
    objective.storage_url = url
    objective.study_id = release.study_id(study, url)
    objective.progress = progress
    if rec.search_mode is not None:
        if modes.final_trial(study.trials) is not None:
            raise StudyError(f"study_name: {study.study_name!r} is finalized: its final run is recorded, and more "
                             "proxy trials would only add to its ε; create a new study to tune again")
        objective.mode = mode_runner(objective, study, url)
    return objective


def mode_runner(objective: Objective, study: optuna.Study, url: str) -> proxy.ModeRunner:
    """The proxies' and final run's planner of a study with a mode, under the objective's regime's terms."""
    rec = StudyRecord.of(study)
    assert objective.budget is not None and rec.search_mode is not None  # a mode needs a budget (create)
    final = objective.regime.final_terms if isinstance(objective.regime, TotalBudget) else None
    return proxy.ModeRunner(objective.resolved, objective.dataset, objective.budget, rec.search_mode,
                            study.study_name, release.folder_of(study, url), objective.study_id,
                            fixed=objective.fixed, final_budget=None if final is None else PrivacyBudget(*final))


@contextlib.contextmanager
def _quiet_trials(secret_count: bool) -> Iterator[None]:
    """With a secret trial count, Optuna's line per failed trial is not shown: trial numbers would tell K."""
    if not secret_count:
        yield
        return
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
