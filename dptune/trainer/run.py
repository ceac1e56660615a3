"""One DP-SGD run from settings: what ``dptune train`` and :func:`dptune.train` do.

The settings are a study file's (:class:`dptune.config.schema.StudyConfig`,
the single source of every default); :func:`run_config` is the one mapping
from them to what the trainer runs, used for a single run here and for every
trial of a study (:mod:`dptune.search.objective`). :func:`train` adds what a
single run must decide itself: δ (default and check against 1/N), σ
calibrated to the budget, the number of steps, the microbatch size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dptune.config.schema import (
    ConfigLike,
    Hyperparameters,
    Overrides,
    StudyConfig,
    batch_size_problem,
    parse,
    run_settings,
)
from dptune.data.augment import Augmentation
from dptune.data.datasets import Dataset, load_dataset
from dptune.errors import ConfigError, DataError, PrivacyError
from dptune.models import checkpoint
from dptune.models.builtin import build_model
from dptune.models.custom import load_loss
from dptune.privacy import accounting as privacy
from dptune.privacy.statement import Statement
from dptune.progress import Event, Reporter
from dptune.trainer.train import PrivacyBudget, RunConfig, TrainResult, train_and_evaluate

__all__ = ["TrainRun", "dataset_of", "run_config", "train", "pretrain"]


def dataset_of(settings: StudyConfig) -> Dataset:
    """The data a study's settings name; with ``validation_dataset``, validation examples come from that dataset.

    Raises:
      ConfigError: ``validation_dataset`` is the private dataset, or does not match its shapes.
      DataError: the dataset cannot be read.
    """
    data = load_dataset(settings.dataset, data_dir=settings.data_dir, seed=settings.seed,
                        image_size=settings.image_size, test_split=settings.test_split)
    if settings.validation_dataset is None:
        return data
    if checkpoint.dataset_identity(settings.validation_dataset) == checkpoint.dataset_identity(settings.dataset):
        raise ConfigError("validation_dataset", f"must be another, public dataset, not the private "
                                                f"{settings.dataset!r}")
    try:
        public = load_dataset(settings.validation_dataset, data_dir=settings.data_dir, seed=settings.seed,
                              image_size=settings.image_size)
    except DataError as e:
        raise ConfigError("validation_dataset", str(e).removeprefix("dataset: ")) from None
    if public.image_shape != data.image_shape or public.num_classes != data.num_classes:
        raise ConfigError("validation_dataset", f"{settings.validation_dataset!r} has images {public.image_shape} "
                          f"and {public.num_classes} classes, the training data {data.image_shape} and "
                          f"{data.num_classes}; set image_size so that they match")
    return dataclasses.replace(data, validation=public.validation)


MIXING_BATCH = 32  # a size past the small batches a model that mixes only in larger ones would hide behind


def check_model(settings: StudyConfig, data: Dataset, microbatch: int | None = None) -> None:
    """Refuse, before anything trains, a user's model (import path) that DP-SGD cannot clip per example.

    On synthetic inputs of the data's shape (never the data): the model builds, initialises, holds
    no batch statistics, returns logits [batch, classes], its loss gives one value per example,
    and no example's output depends on another example's input
    (:func:`dptune.trainer.clipping.independence.check_per_example`), at a small batch, at 32 and at the
    microbatch training runs (``microbatch``, else the settings' when it is a number). Built-in
    models pass by construction.

    Raises:
      ConfigError: naming ``model``, ``model_args`` or ``loss`` and the reason.
    """
    if ":" not in settings.model:
        if settings.loss is not None:
            load_loss(settings.loss)
        return
    from dptune.models import custom
    from dptune.trainer.clipping.independence import check_per_example

    module = build_model(settings.model, data.num_classes, input_shape=data.image_shape, args=settings.model_args)
    variables, x = custom.check_model(module, data.image_shape, data.input_dtype, data.num_classes,
                                      load_loss(settings.loss))
    check_per_example(module, variables, x)
    # The fast clipping path runs the model on whole microbatches: check at the size training uses too.
    size = microbatch if microbatch is not None else settings.microbatch_size
    for b in sorted({MIXING_BATCH, size if isinstance(size, int) else MIXING_BATCH} - {len(x)}):
        check_per_example(module, variables, custom.synthetic_inputs(data.image_shape, data.input_dtype, b))


def run_config(settings: StudyConfig, **per_run: Any) -> RunConfig:
    """What the trainer runs for these settings: the one mapping from a study's settings to a :class:`RunConfig`.

    Args:
      settings: the study's (or single run's) settings.
      **per_run: what varies per run and is not a setting: ``microbatch_size`` (required when the
        settings say ``auto``), ``eval_every``, ``seed``, ``secret``, ``num_devices``,
        ``save_checkpoint``, ``resume``.

    Returns:
      The trainer's configuration.

    Raises:
      ConfigError: ``microbatch_size`` is ``auto`` and no measured size was given.
    """
    base: dict[str, Any] = dict(
        model=settings.model,
        model_args=dict(settings.model_args),
        loss=settings.loss,
        weight_standardization=settings.weight_standardization,
        private=not settings.non_private,
        clipping=settings.clipping,
        seed=settings.seed,
        private_seed=settings.private_seed,
        init_checkpoint=settings.init_checkpoint,
        reinitialize=tuple(settings.reinitialize),
        augmentation=Augmentation(**settings.augmentation.model_dump()),
        unsafe_ignore_checkpoint_provenance=settings.unsafe_ignore_checkpoint_provenance,
        feed=settings.feed,
        loader_workers=settings.loader_workers,
        device_data_fraction=settings.device_data_fraction,
    )
    if settings.microbatch_size != "auto":
        base["microbatch_size"] = settings.microbatch_size
    base.update(per_run)
    if base.get("microbatch_size", "auto") == "auto":
        raise ConfigError("microbatch_size", "'auto' must be measured first (dptune.trainer.microbatch.choose)")
    return RunConfig(**base)


@dataclass
class TrainRun:
    """A finished single run: the trainer's result with what was decided before it ran.

    ``delta_is_default``: δ was not given and was set below 1/N. ``calibrated``: σ was
    calibrated so that the run's steps spend at most the budget.
    """

    result: TrainResult
    settings: StudyConfig
    hyperparameters: Hyperparameters
    dataset: str
    steps: int
    noise_multiplier: float
    delta: float | None
    delta_is_default: bool
    calibrated: bool
    microbatch_size: int
    statement: Statement | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the result's fields and the written statement."""
        return {**self.result.as_dict(), "statement": None if self.statement is None else self.statement.text(),
                "delta_is_default": self.delta_is_default, "noise_calibrated": self.calibrated}


def _hyperparameters(given: Hyperparameters | dict[str, Any] | None) -> Hyperparameters:
    if isinstance(given, Hyperparameters):
        return given
    return parse("hyperparameters", Hyperparameters, dict(given or {}))


def train(
    config: ConfigLike | None = None,
    *,
    overrides: Overrides | None = None,
    hyperparameters: Hyperparameters | dict[str, Any] | None = None,
    dataset: Dataset | tuple | dict | None = None,
    eval_every: int | None = None,
    devices: int | None = None,
    save_checkpoint: str | None = None,
    callback: Callable[[int, dict[str, float]], Any] | None = None,
    log: Callable[[str], None] = lambda _line: None,
    progress: Reporter | None = None,
) -> TrainRun:
    r"""Train one model with DP-SGD under the settings' privacy budget (``dptune train``).

    Args:
      config: settings: a study file, a dict of its keys, a :class:`StudyConfig`, or None for the
        defaults (ε = 3 on mnist5k with the CNN). A search space in it is not used.
      overrides: dotted-key overrides of the settings (``{"privacy.epsilon": 1.0}``), validated with them.
      hyperparameters: batch size, learning rate, clip norm, σ (None: calibrated), epochs, optimizer…;
        a :class:`Hyperparameters` or a dict of its fields (missing ones take its defaults).
      dataset: data already loaded, or arrays: ``(x, y)`` or ``{"train": (x, y), "validation": …, "test": …}``
        (:func:`dptune.data.custom.from_arrays`; the train split is the private one). Default: the one the
        settings name.
      eval_every: evaluate on the validation split every this many steps (default: at the end only).
      devices: local devices to use (default: all).
      save_checkpoint: write the selected parameters (raw or EMA, by validation accuracy) here.
      callback: called as ``callback(step, metrics)`` at each evaluation.
      log: receives one line for each decision taken (δ default, σ calibrated, microbatch measured).
      progress: receives :class:`dptune.progress.Event`\ s: the silent phases, steps and validations.

    Returns:
      The run: its result, the decisions taken and the written privacy statement.

    Raises:
      ConfigError: a setting or hyperparameter the schema or the data refuses (e.g. batch_size above N).
      PrivacyError: δ not below 1/N, or a budget that cannot be met.
      DataError: the dataset cannot be read.

    Guarantee: unless ``non_private``, the run is (ε, δ)-DP for the examples of the training split
    with ε ≤ ``privacy.epsilon`` (accounted by ``privacy.accountant`` for Poisson-sampled DP-SGD
    at q = B/N, σ and the steps run; a run stops before a step that would exceed the budget),
    provided the private seed stays secret (by default it is drawn from the OS). Validation and
    test examples are not protected. With a private ``init_checkpoint``, the statement composes
    its recorded spend on the same data.
    """
    settings = run_settings(config, overrides)
    hp = _hyperparameters(hyperparameters)
    data = _data(settings, dataset, progress)
    check_model(settings, data)
    q, steps = _steps(settings, hp, len(data.train), log)
    if eval_every is None and "eval_every_epochs" in settings.model_fields_set:
        eval_every = max(1, round(settings.eval_every_epochs / q))
    if settings.checkpoints.active:
        log("checkpoints: in-trial checkpoints are for a study's trials; this run writes only save_checkpoint")
    plan = _privacy(settings, hp, len(data.train), q, steps, log)
    size = _microbatch_size(settings, hp, data, devices, log)
    run = run_config(settings, microbatch_size=size, eval_every=eval_every, num_devices=devices,
                     save_checkpoint=save_checkpoint)
    result = train_and_evaluate(data, hp.for_steps(plan.sigma), steps, config=run, budget=plan.budget,
                                callback=callback, progress=progress)
    return TrainRun(result=result, settings=settings, hyperparameters=hp, dataset=data.name, steps=steps,
                    noise_multiplier=plan.sigma, delta=plan.delta, delta_is_default=plan.delta_is_default,
                    calibrated=plan.budget is not None and hp.noise_multiplier is None, microbatch_size=size,
                    statement=result.statement(data.name, run))


def _data(settings: StudyConfig, dataset: Dataset | tuple | dict | None, progress: Reporter | None) -> Dataset:
    """The data given, or the data the settings name."""
    if progress is not None:
        progress(Event("phase", {"phase": f"loading the data ({settings.dataset})"}))
    if dataset is None:
        return dataset_of(settings)
    if isinstance(dataset, Dataset):
        return dataset
    from dptune.data.custom import from_arrays

    return from_arrays("arrays", dataset, seed=settings.seed)


def _steps(settings: StudyConfig, hp: Hyperparameters, n: int, log: Callable[[str], None]) -> tuple[float, int]:
    """(q, steps): the sampling rate B/N and the steps of ``epochs``, capped by a study file's budget."""
    if (problem := batch_size_problem(hp.batch_size, n)) is not None:
        raise ConfigError("batch_size", problem)
    q = hp.batch_size / n
    if hp.epochs < q:
        raise ConfigError("epochs", f"{hp.epochs:g} is less than one step (one step at batch_size {hp.batch_size} "
                                    f"of {n} examples is {q:.4g} epochs); ask for at least {q:.4g}")
    steps = math.ceil(hp.epochs / q)
    if "budget" in settings.model_fields_set:
        # A study file's caps on one trial bind a single run of its settings too.
        caps = [c for c in (settings.budget.max_steps,
                            None if settings.budget.max_epochs is None else math.ceil(settings.budget.max_epochs / q))
                if c is not None]
        if caps and min(caps) < steps:
            steps = min(caps)
            log(f"{steps} steps: capped by budget (max_epochs {settings.budget.max_epochs}, "
                f"max_steps {settings.budget.max_steps})")
    return q, steps


@dataclass(frozen=True)
class _PrivacyPlan:
    budget: PrivacyBudget | None  # None: a non-private run
    sigma: float
    delta: float | None
    delta_is_default: bool


def _privacy(settings: StudyConfig, hp: Hyperparameters, n: int, q: float, steps: int,
             log: Callable[[str], None]) -> _PrivacyPlan:
    """The run's budget, δ (a default below 1/N, checked) and σ (calibrated to the budget when not given)."""
    sigma = hp.noise_multiplier if hp.noise_multiplier is not None else 0.0
    if settings.non_private:
        return _PrivacyPlan(None, sigma, None, False)
    assert settings.privacy is not None  # the schema requires it of a private run
    p = settings.privacy
    assert p.epsilon is not None  # run_settings refuses a total budget (a search's plan)
    delta = privacy.default_delta(n) if p.delta is None else p.delta
    privacy.check_delta(delta, n)
    if p.delta is None:
        log(f"δ = {delta:g} by default (well below 1/N = {1 / n:.3g}); set it with privacy.delta (--delta).")
    if hp.noise_multiplier is None:
        sigma = privacy.noise_for_epsilon(q, steps, p.epsilon, delta, p.accountant)
        log(f"σ = {sigma:.4f} calibrated so that {steps} steps ({hp.epochs:g} epochs) spend ε ≤ "
            f"{p.epsilon:g} at δ = {delta:g} ({p.accountant})")
    return _PrivacyPlan(PrivacyBudget(p.epsilon, delta, p.accountant), sigma, delta, p.delta is None)


def _microbatch_size(settings: StudyConfig, hp: Hyperparameters, data: Dataset, devices: int | None,
                     log: Callable[[str], None]) -> int:
    """The settings' microbatch size, or under ``auto`` the fastest measured on these devices (cached)."""
    size = settings.microbatch_size
    if size != "auto":
        return size
    import jax

    from dptune.trainer import microbatch

    choice = microbatch.choose(settings.model, data.image_shape, data.num_classes,
                               jax.local_devices()[: devices or None], clipping=settings.clipping,
                               upper=hp.batch_size, weight_standardization=settings.weight_standardization,
                               model_args=settings.model_args, input_dtype=data.input_dtype, loss=settings.loss)
    measured = ", ".join(f"{m}: {r:,.0f} ex/s" for m, (r, _) in sorted(choice.measured.items()))
    log(f"microbatch {choice.microbatch_size} ({'cached' if choice.cached else 'measured'}: {measured})")
    check_model(settings, data, choice.microbatch_size)  # a user's model, at the size it will run
    return choice.microbatch_size


def pretrain(config: ConfigLike | None = None, *, output: str, declare_public: bool,
             **kwargs: Any) -> TrainRun:
    """Train without privacy on data declared public, and save the checkpoint for transfer (``dptune pretrain``).

    Args:
      config: settings as for :func:`train` (``non_private`` is forced on).
      output: where the checkpoint (and its provenance ``.json``) is written.
      declare_public: the caller's statement that the dataset is public, not the data being protected.
      **kwargs: as for :func:`train`.

    Raises:
      PrivacyError: ``declare_public`` is false.

    Guarantee: none for this data (no clipping, no noise); the checkpoint's metadata records that it
    was trained without privacy on this dataset, so a later private run on the same dataset refuses it.
    """
    settings = run_settings(config, kwargs.pop("overrides", None))
    if not declare_public:
        raise PrivacyError(f"dataset: pretraining is not private; pass --declare-public to confirm that "
                           f"{settings.dataset!r} is public data (not the data you protect)")
    settings = run_settings({**settings.model_dump(mode="json", exclude_unset=True), "non_private": True,
                             "privacy": None})
    return train(settings, save_checkpoint=output, **kwargs)
