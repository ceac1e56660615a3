"""The training loop: ``train_step`` over Poisson batches, ``evaluate``, ``train_and_evaluate``.

The loop knows nothing of Optuna. A caller passes a ``callback(step, metrics)``
that is called after each evaluation; returning ``True`` stops the run, which
then still reports the privacy it really spent.

Budget enforcement: given a :class:`PrivacyBudget`, the run computes the
largest number of steps whose ε stays within it before the first step and never
takes more; the ε reported is that of the steps actually taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import jax
import numpy as np

from dptune import __version__, interrupt, seams
from dptune.config.schema import Hyperparams, is_import_path
from dptune.config.schema import default as setting
from dptune.data import pipeline
from dptune.data.augment import Augmentation
from dptune.data.datasets import Dataset, RecordSplit, batches
from dptune.data.sampling import microbatches, pad_to_multiple, poisson_batch
from dptune.errors import ConfigError, PrivacyError
from dptune.models import checkpoint, freezing
from dptune.models.builtin import build_model, init_params
from dptune.models.custom import load_loss
from dptune.privacy import accounting as privacy
from dptune.privacy import search_totals as search_privacy
from dptune.privacy.statement import USER_CODE, Mechanism, Statement
from dptune.progress import Event, Reporter, StepMeter
from dptune.randomness import SecretSeed
from dptune.trainer import compile_stats, dispatch, multihost
from dptune.trainer import feed as feeds
from dptune.trainer.dp_step import StepFunctions, TrainState, step_functions

Callback = Callable[[int, dict[str, float]], bool | None]


@dataclass(frozen=True)
class PrivacyBudget:
    """A run may not take a step that would make its ε exceed ``epsilon`` at ``delta``."""

    epsilon: float
    delta: float
    accountant: str = privacy.DEFAULT_ACCOUNTANT  # one of dptune.choices.Accountant


@dataclass(frozen=True)
class RunConfig:
    """What stays fixed across the trials of a study (and fixes the compiled shapes).

    ``seed`` makes initialisation reproducible and is public. ``private_seed``
    drives Poisson sampling, the noise and the augmentation
    (:mod:`dptune.randomness`): the guarantee assumes an adversary cannot
    predict them, so by default 256 bits are drawn from the OS; fix it only for
    reproducible experiments, and keep it as secret as the data.
    ``secret`` (rather than ``private_seed``) hands in a secret derived by the
    caller, e.g. one per trial of a study. ``unsafe_ignore_checkpoint_provenance`` accepts an ``init_checkpoint``
    whose metadata says it was trained without privacy on the dataset being
    protected (or whose spend on it was not recorded): the printed ε then does
    not cover what that checkpoint learnt.
    """

    # Defaults are the study schema's (dptune.config.schema): one place for each.
    model: str = setting("model")
    model_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a model factory
    loss: str | None = setting("loss")  # import path of a per-example loss; None: softmax cross-entropy
    weight_standardization: bool = setting("weight_standardization")
    private: bool = True
    microbatch_size: int = setting("microbatch_size")
    clipping: str = setting("clipping")
    eval_every: int | None = None
    eval_batch_size: int = 500
    seed: int = setting("seed")
    private_seed: int | None = None
    secret: SecretSeed | None = None
    num_devices: int | None = None
    init_checkpoint: str | None = None
    reinitialize: tuple[str, ...] = ()
    augmentation: Augmentation = Augmentation()
    save_checkpoint: str | None = None
    unsafe_ignore_checkpoint_provenance: bool = False
    feed: str = setting("feed")
    device_data_fraction: float = setting("device_data_fraction")
    loader_workers: int = setting("loader_workers")
    # A dptune.trainer.resume.Checkpointer: in-trial checkpoints, and resuming from the last one.
    resume: Any = None
    # Subset tuning (dptune.search.modes): the public Poisson rate q when the training split is a
    # secret random subset, whose size must not set q; the expected batch is then ``batch_size``. None: B/N.
    sampling_rate: float | None = None
    # A trial of this study: its saved parameters are a search's candidate, not a release
    # (dptune.models.checkpoint.prior_spend refuses them until the study exports its choice).
    search: str | None = None


@dataclass
class TrainResult:
    """What a run reports. Accuracies are on the validation and test splits.

    With parameter averaging on, both the raw and the EMA parameters are
    evaluated; ``selected`` names the one with the better validation accuracy
    (test accuracy plays no part in the choice) and ``selected_*`` are its figures.
    """

    val_accuracy: float
    test_accuracy: float
    val_loss: float
    ema_val_accuracy: float | None
    ema_test_accuracy: float | None
    steps: int
    steps_requested: int
    epochs: float
    stopped_early: bool
    budget_limited: bool
    private: bool
    privacy: privacy.PrivacySpend | None
    examples_per_second: float
    compile_seconds: float
    startup_seconds: float
    wall_seconds: float
    examples_processed: int
    devices: int
    microbatch_size: int
    clipping: str
    private_seed_fixed: bool
    split: dict[str, Any]
    selected: str = "raw"
    trainable_modules: list[str] = field(default_factory=list)
    init_checkpoint: str | None = None
    augmentation: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    prior_events: list[tuple[float, float, int]] = field(default_factory=list)
    prior_bounds: list[tuple[float, float]] = field(default_factory=list)  # (ε, δ) of searches it was chosen by
    feed: str = "loop"
    clipping_rules: dict[str, str] = field(default_factory=dict)  # parameter path -> rule (fast path)

    @property
    def epsilon(self) -> float | None:
        """ε of this run's steps alone."""
        return None if self.privacy is None else self.privacy.epsilon

    @property
    def total_epsilon(self) -> float | None:
        """ε on this dataset including a private ``init_checkpoint``'s recorded spend.

        Its runs compose with this one (RDP); the bounds of searches that selected it add (basic composition).
        """
        if self.privacy is None or not (self.prior_events or self.prior_bounds):
            return self.epsilon
        runs = composed_with_prior(self.privacy, self.prior_events) if self.prior_events else self.privacy.epsilon
        return runs + sum(epsilon for epsilon, _ in self.prior_bounds)

    @property
    def total_delta(self) -> float | None:
        """δ of :attr:`total_epsilon`: this run's, plus each prior search bound's."""
        if self.privacy is None:
            return None
        return self.privacy.delta + sum(delta for _, delta in self.prior_bounds)

    @property
    def warnings(self) -> list[str]:
        """What a person should know about a run that ended without an error but did not do its job."""
        if not math.isfinite(self.val_loss):
            return ["the validation loss is not finite: the model or its loss gives NaN or infinity (such "
                    "examples' gradients are dropped, so the model did not learn from them)"]
        return []

    @property
    def selected_val_accuracy(self) -> float:
        if self.selected == "ema":
            assert self.ema_val_accuracy is not None  # selected only when the EMA parameters were evaluated
            return self.ema_val_accuracy
        return self.val_accuracy

    @property
    def selected_test_accuracy(self) -> float:
        if self.selected == "ema":
            assert self.ema_test_accuracy is not None
            return self.ema_test_accuracy
        return self.test_accuracy

    def statement(self, dataset: str, config: RunConfig) -> Statement | None:
        """The written privacy statement of this run (None when it was not private)."""
        if self.privacy is None:
            return None
        p = self.privacy
        notes = []
        assumptions = []
        if is_import_path(config.model) or config.loss or is_import_path(dataset) or dataset == "arrays":
            assumptions.append(USER_CODE)
        if self.prior_events:
            notes.append(f"This run alone: ε = {p.epsilon:.4g} ({p.accountant}); the guarantee above composes it "
                         f"with the initial checkpoint's {len(self.prior_events)} recorded run(s) on {dataset!r} "
                         "(RDP).")
        if self.prior_bounds:
            notes.append("The initial checkpoint was selected by a search on the same data whose cost is a bound, "
                         + ", ".join(f"(ε = {e:.4g}, δ = {d:g})" for e, d in self.prior_bounds)
                         + "; the guarantee above adds it (basic composition: ε and δ add).")
        if config.init_checkpoint:
            assumptions.append("the initial checkpoint's recorded lineage is true and names its data as this run "
                               "does (a checkpoint without dptune metadata, or trained on differently named data "
                               "that holds the same individuals, is treated as trained on public data)")
            if config.unsafe_ignore_checkpoint_provenance:
                assumptions.append("UNSAFE: the initial checkpoint's provenance was ignored on request, so what it "
                                   "learnt from this data is not covered")
        total, delta = self.total_epsilon, self.total_delta
        assert total is not None and delta is not None  # a private run's
        return Statement(
            epsilon=total, delta=delta, accountant="rdp" if self.prior_events else p.accountant,
            dataset=dataset, dataset_size=self.split.get("train"),
            mechanism=Mechanism(p.sampling_rate, p.noise_multiplier, p.steps),
            seed_fixed=self.private_seed_fixed, extra_assumptions=tuple(assumptions), notes=tuple(notes))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(epsilon=self.epsilon, total_epsilon=self.total_epsilon, total_delta=self.total_delta,
                 warnings=self.warnings,
                 selected_val_accuracy=self.selected_val_accuracy,
                 selected_test_accuracy=self.selected_test_accuracy)
        return d


def composed_with_prior(spend: privacy.PrivacySpend, prior: list[tuple[float, float, int]]) -> float:
    """ε of ``spend``'s steps composed with earlier DP-SGD runs (q, σ, T) on the same data.

    RDP composition, valid when the later run's settings were chosen after
    seeing the earlier one's model.
    """
    events = list(prior) + [(spend.sampling_rate, spend.noise_multiplier, spend.steps)]
    return search_privacy.composed_epsilon(events, spend.delta)["rdp"]


def _meter(progress: Reporter, planned: int, start: int, q: float, sigma: float, batch_size: int,
           budget: PrivacyBudget | None, private: bool) -> StepMeter:
    """The run's step events; says first what the silent stretch before the first step is."""
    progress(Event("phase", {"phase": "compiling and taking the first step", "planned": planned}))
    epsilon_at = (privacy.epsilon_curve(q, sigma, budget.delta) if private and budget is not None and sigma > 0
                  else None)
    return StepMeter(progress, planned=planned, start=start, sampling_rate=q, batch_size=batch_size,
                     epsilon_at=epsilon_at, epsilon_budget=None if budget is None else budget.epsilon)


def _code_digest(config: RunConfig) -> str:
    """SHA-256 of a user's model and loss code (named by import path): every Python file of the package
    or folder that holds them, their helpers too (a module installed at the top of site-packages: its own
    file). Their code is the run as much as its settings are.

    Raises:
      ConfigError: ``private_seed``: the code has no file to hash (defined in a script or notebook).
    """
    import importlib.util

    h = hashlib.sha256()
    for path in (config.model, config.loss):
        if not (path and is_import_path(path)):
            continue
        module = path.split(":", 1)[0]
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        origin = None if spec is None else spec.origin
        if not (origin and os.path.isfile(origin)):
            raise ConfigError("private_seed", f"a fixed seed is keyed on the code of {path!r}, which has no file "
                                              "to hash (a script or notebook); leave private_seed unset")
        root = os.path.dirname(origin)
        installed = os.path.basename(root) in ("site-packages", "dist-packages")  # not a folder of the user's
        names = [os.path.basename(origin)] if installed else sorted(n for n in os.listdir(root) if n.endswith(".py"))
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def run_secret(config: RunConfig, settings: dict[str, Any] | None) -> SecretSeed:
    """The secret of one run: the caller's, the OS's, or a fixed ``private_seed`` keyed on what the run is.

    A fixed seed reproduces one run and never serves two: two runs on one noise stream, say with clip norms
    C₁ and C₂, release C₂·Δ₁ − C₁·Δ₂, in which the noise cancels. So the seed's stream is keyed on the run's
    ``settings`` (hyperparameters, steps, budget, configuration, devices, data), the source of a user's
    model and loss, dptune's version and the bytes of its ``init_checkpoint``: the same command on the
    same data and checkpoint replays itself, any other run draws other batches and noise. A fixed secret
    the caller hands in (a study's trial, an audit: a seed keyed on the study and the trial's number) is
    keyed on the run in the same way, so that two copies of one study running a trial of that number with
    different settings never share a stream.
    """
    if config.secret is not None and not config.secret.fixed:
        return config.secret
    if config.secret is None and config.private_seed is None:
        return SecretSeed.from_os()
    assert settings is not None  # computed whenever a seed is fixed
    # Only what cannot change a parameter is left out. Devices, microbatches, clipping engines and feeds
    # compute the same mechanism only up to rounding (and frozen layers may count differently in an
    # engine's norms): two such runs would differ by a noise-free amount, so each is a run of its own.
    unread = {"save_checkpoint", "eval_every", "eval_batch_size", "search"}
    platform = sorted({(d.platform, d.device_kind) for d in jax.devices()})  # ids alone: CPU 0 and GPU 0 match
    what = {**settings, "code": _code_digest(config), "dptune": __version__, "jax": jax.__version__,
            "platform": platform,
            "config": {k: v for k, v in settings["config"].items() if k not in unread}}
    identity = json.dumps(what, sort_keys=True, default=str)
    start = checkpoint.fingerprint(config.init_checkpoint) if config.init_checkpoint else ""
    digest = hashlib.sha256(f"{identity}\n{start}".encode()).hexdigest()
    base = config.secret
    if base is None:
        assert config.private_seed is not None
        base = SecretSeed.from_int(config.private_seed)
    return base.child(f"run {digest}")


def augmenter(augmentation: Augmentation, secret: SecretSeed) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
    """``augment(x, indices, step)`` for :func:`train_step`, with randomness keyed by (secret, step, example).

    Guarantee: with the secret fixed, example i's copies at a step depend on
    (x_i, i, step) alone, so adding or removing one example from a batch changes
    one term of the clipped sum (norm ≤ C) and leaves the others as they were.
    """
    def augment(x: np.ndarray, indices: np.ndarray, step: int) -> np.ndarray:
        return augmentation(x, secret.augmentation_words(step, indices, augmentation.multiplicity))

    return augment


def _ema_decay_at(decay: float, step: int) -> float:
    # Warm-up keeps early EMA from being dominated by the initialisation.
    return min(decay, (1.0 + step) / (10.0 + step)) if decay > 0 else 0.0


def _compute_seconds(tick: float, compiled_before: float) -> float:
    # Steps run asynchronously; the loop blocks before each evaluation, so the
    # sum over steps is exact even if single steps are not. Compilation is
    # reported separately and excluded here.
    return (time.perf_counter() - tick) - (compile_stats.seconds() - compiled_before)


@seams.seam  # tests may break the mechanism here (dptune.faults); production steps as written here
def train_step(fns: StepFunctions, state: TrainState, dataset: Dataset, indices: np.ndarray,
               key: jax.Array, step: int, hp: Hyperparams, denominator: float,
               clip_norm: float, noise_multiplier: float, lr: float, private: bool = True, *,
               augment: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None,
               trainable: Any = None, audit: Any = None) -> TrainState:
    """One logical batch: accumulate clipped sums over microbatches, then one noisy update.

    ``private=False`` sums plain gradients instead (a non-private baseline; σ must be 0).
    ``augment(x, indices, step)`` expands each microbatch's images into k copies
    per example (averaged before clipping), with randomness keyed by example
    index and step; ``trainable`` is the 0/1 mask of :mod:`dptune.models.freezing`.
    ``audit`` (white-box audits, :mod:`dptune.search.audit`) adds this step's canary
    terms to the clipped sum before the noise and observes the update.
    """
    padded, mask = pad_to_multiple(indices, fns.microbatch_size)
    # Every dispatch goes through dispatch.track: unbounded run-ahead deadlocks
    # multi-device CPU runs (the why is in dptune/trainer/dispatch.py).
    acc = dispatch.track(fns.zeros_like(state.params))
    accumulate = fns.accumulate if private else fns.accumulate_nonprivate
    for chunk, chunk_mask in microbatches(padded, mask, fns.microbatch_size):
        x, y = dataset.train.take(chunk)
        if augment is not None:
            x = augment(x, chunk, step)
        xs, ys, m = fns.shard_batch(x, y, chunk_mask)
        acc = dispatch.track(accumulate(state.params, acc, xs, ys, m, clip_norm, trainable))
    if audit is not None:
        acc = dispatch.track(audit.add(fns, state, acc, step, clip_norm))
    state = dispatch.track(fns.apply(state, acc, key, step, noise_multiplier, clip_norm,
                                     denominator, lr, hp.momentum, _ema_decay_at(hp.ema_decay, step), trainable))
    if audit is not None:
        audit.observe(state.params)
    return state


def evaluate(fns: StepFunctions, params: Any, split: Any, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean loss) of ``params`` on a whole split, in fixed-shape padded batches."""
    correct = loss = 0.0
    for positions in batches(split, batch_size):
        x, y = split.take(positions)
        n = len(y)
        if n < batch_size:
            pad = batch_size - n
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        mask = (np.arange(batch_size) < n).astype(np.float32)
        c, batch_loss = fns.evaluate(params, *fns.shard_batch(x, y, mask))
        correct += float(multihost.fetch(c))
        loss += float(multihost.fetch(batch_loss))
    return correct / len(split), loss / len(split)


def _devices(config: RunConfig) -> tuple[jax.Device, ...]:
    """``num_devices`` devices; by default the most that evenly share a microbatch.

    With several processes (dptune.trainer.multihost) the devices are all processes' devices.
    """
    local = jax.devices() if jax.process_count() > 1 else jax.local_devices()
    if config.num_devices:
        return tuple(local[: config.num_devices])
    count = max(d for d in range(1, len(local) + 1) if config.microbatch_size % d == 0)
    return tuple(local[:count])


def _public_settings(dataset: Dataset, hparams: Hyperparams, steps: int, config: RunConfig,
                     budget: PrivacyBudget | None, devices: tuple[jax.Device, ...]) -> dict[str, Any]:
    """Everything that shapes the mechanism and the data, without the secret (compared across processes)."""
    public = {f.name: repr(getattr(config, f.name)) for f in fields(config)
              if f.name not in ("secret", "private_seed", "resume")}
    train = dataset.train
    rows = getattr(train, "indices", None)
    labels = getattr(train, "labels", None)
    images = getattr(train, "images", None)  # in-memory pixels; record splits: their source is in `split`
    data = hashlib.sha256()
    for part in (rows, labels, images):
        if part is not None:
            data.update(np.ascontiguousarray(part).tobytes())
    return {"hparams": asdict(hparams), "steps": steps, "config": public,
            "budget": None if budget is None else asdict(budget), "devices": [d.id for d in devices],
            "dataset": dataset.name, "split": dataset.split.as_dict(), "image_shape": list(dataset.image_shape),
            "classes": dataset.num_classes, "data": data.hexdigest(),
            "private_seed_fixed": config.private_seed is not None}


def train_and_evaluate(
    dataset: Dataset,
    hparams: Hyperparams,
    steps: int,
    *,
    config: RunConfig = RunConfig(),
    budget: PrivacyBudget | None = None,
    callback: Callback | None = None,
    audit: Any = None,
    progress: Reporter | None = None,
) -> TrainResult:
    r"""Train with DP-SGD (or non-privately) for at most ``steps`` steps and evaluate.

    In private mode a ``budget`` is required; the run is capped at the largest
    number of steps within it (``budget_limited`` says whether the cap bit).

    Guarantee: in private mode, (ε, δ)-DP for add-or-remove-one-example
    adjacency on ``dataset.train``, with ε the reported ``privacy.epsilon`` —
    provided the Poisson sampling, noise and augmentation streams stay secret
    (:mod:`dptune.randomness`). A private ``init_checkpoint`` trained on the
    same dataset adds its recorded spend (``total_epsilon``). The validation and
    test splits are not protected.

    ``progress`` receives :class:`dptune.progress.Event`\ s: the phase before the first step, ``step``
    events at most four times a second from the host clock (no device synchronisation of their
    own), and one ``eval`` per validation, with the ε spent so far (RDP, an upper bound).

    ``audit`` (:mod:`dptune.search.audit`, white-box audits only) adds ``audit.members``
    canaries to the sampled population: each joins each step with the same
    Poisson rate q as a training example, from the same secret sampler.

    Raises:
      PrivacyError: not even one step fits the budget, or no budget in private mode.
      ConfigError: invalid hyperparameters or steps.
      CheckpointError: ``init_checkpoint`` unreadable, not fitting the model, or
        trained without privacy on this dataset.
    """
    n = len(dataset.train)
    q = _check_run(dataset, hparams, steps, config)
    clip_norm = hparams.clip_norm if config.private else math.inf
    sigma = hparams.noise_multiplier if config.private else 0.0
    allowed = _allowed_steps(config, budget, n, q, sigma, steps)
    prior = checkpoint.PriorSpend()
    if config.init_checkpoint:
        # Before anything is computed or written: a checkpoint that saw this data must be accounted for.
        prior = checkpoint.prior_spend(config.init_checkpoint, dataset.name, private=config.private,
                                       unsafe_ignore=config.unsafe_ignore_checkpoint_provenance)
    devices = _devices(config)
    settings = _shared_settings(dataset, hparams, steps, config, budget, devices)
    model = build_model(config.model, dataset.num_classes, weight_standardization=config.weight_standardization,
                        input_shape=dataset.image_shape, args=config.model_args)
    # The clipping setting is interpreted by the clipping engine (a custom model never takes book-keeping).
    fns = step_functions(model, hparams.optimizer, config.microbatch_size, devices, config.clipping,
                         load_loss(config.loss), custom_model=is_import_path(config.model))

    clock = _Clock(time.perf_counter(), compile_stats.seconds())
    start = _initial_state(fns, model, dataset, hparams, config, settings)
    loop = _Loop(fns=fns, dataset=dataset, hparams=hparams, config=config, q=q, sigma=sigma, clip_norm=clip_norm,
                 allowed=allowed, secret=start.secret, trainable=start.trainable, audit=audit, callback=callback,
                 eval_batch_size=-(-config.eval_batch_size // len(devices)) * len(devices))
    loop.prepare(start, progress, budget)
    done = loop.run(start, clock)
    final = _final_evaluation(loop, done)
    spent = None
    if config.private:
        assert budget is not None  # a private run always has one (checked on entry)
        spent = privacy.spend(q, sigma, done.taken, budget.delta, budget.accountant)
    if config.save_checkpoint and jax.process_index() == 0:
        _save(config, dataset, final, done.taken, q, sigma, spent)
    return _result(dataset, config, steps, loop, start, done, final, clock, spent, prior, len(devices))


def _check_run(dataset: Dataset, hparams: Hyperparams, steps: int, config: RunConfig) -> float:
    """The run's Poisson rate q, once its hyperparameters, augmentation and steps are checked.

    Raises:
      ConfigError: naming the bad field.
    """
    n = len(dataset.train)
    # With a public rate, the expected batch is not bounded by the (secret) size of the split.
    hparams.validate(n if config.sampling_rate is None else max(n, hparams.batch_size), config.private)
    aug = config.augmentation
    if not dataset.pixels and (aug.multiplicity > 1 or aug.shift or aug.flip):
        raise ConfigError("augmentation", "shifts and flips are for images (H, W, C); this dataset's inputs "
                                          f"{dataset.image_shape} are not; remove the augmentation section")
    if steps < 1:
        raise ConfigError("steps", f"must be >= 1, got {steps}")
    q = hparams.batch_size / n if config.sampling_rate is None else config.sampling_rate
    if not 0 < q <= 1:
        raise ConfigError("sampling_rate", f"must be in (0, 1], got {q}")
    return q


def _allowed_steps(config: RunConfig, budget: PrivacyBudget | None, n: int, q: float, sigma: float,
                   steps: int) -> int:
    """The most of ``steps`` whose ε stays within the budget (all of them in a non-private run).

    Raises:
      PrivacyError: a private run without a budget, or whose first step already exceeds it.
    """
    if not config.private:
        return steps
    if budget is None:
        raise PrivacyError("budget: private training needs a privacy budget (epsilon, delta)")
    privacy.validate(epsilon=budget.epsilon, delta=budget.delta, accountant=budget.accountant)
    if config.sampling_rate is None:
        # A secret subset's size must decide nothing (not even a refusal): δ was checked against the
        # public N of the split it was drawn from, which is no smaller.
        privacy.check_delta(budget.delta, n)
    allowed = privacy.max_steps(q, sigma, budget.epsilon, budget.delta, budget.accountant, limit=steps)
    if allowed == 0:
        raise PrivacyError(
            f"noise_multiplier: σ = {sigma:g} at q = {q:.4g} exceeds ε = {budget.epsilon:g} "
            f"(δ = {budget.delta:g}) in a single step; raise σ or lower the batch size"
        )
    return allowed


def _shared_settings(dataset: Dataset, hparams: Hyperparams, steps: int, config: RunConfig,
                     budget: PrivacyBudget | None, devices: tuple[jax.Device, ...]) -> dict[str, Any] | None:
    """The run's public settings where something is keyed on them (a fixed seed, several processes), else None.

    Raises:
      ConfigError: a fixed seed on data read record by record (its content is not hashed).
    """
    if config.secret is None and config.private_seed is not None and isinstance(dataset.train, RecordSplit):
        # The run identity a fixed seed is keyed on holds the data; records are not read to hash them.
        raise ConfigError("private_seed", f"a fixed seed needs data whose content dptune hashes, and {dataset.name!r} "
                                          "is read record by record; leave private_seed unset (OS randomness)")
    fixed = config.secret.fixed if config.secret is not None else config.private_seed is not None
    if not (jax.process_count() > 1 or fixed):
        return None
    settings = _public_settings(dataset, hparams, steps, config, budget, devices)
    if jax.process_count() > 1:
        # One mechanism across processes needs one configuration and the same data (dptune.trainer.multihost).
        multihost.assert_same(settings, "settings")
    return settings


@dataclass(frozen=True)
class _Clock:
    started: float  # perf_counter when the step functions were built
    compiled: float  # compile_stats.seconds() then


@dataclass
class _Start:
    """Where the loop starts: the first step, the state and secret there, and what earlier steps reported."""

    state: TrainState
    secret: SecretSeed
    trainable: Any
    trainable_modules: list[str]
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    examples: int = 0


def _initial_state(fns: StepFunctions, model: Any, dataset: Dataset, hparams: Hyperparams, config: RunConfig,
                   settings: dict[str, Any] | None) -> _Start:
    """The initial (or initial checkpoint's) parameters, or the state of the last in-trial checkpoint."""
    params = init_params(model, dataset.image_shape, jax.random.key(config.seed), dataset.input_dtype)
    if config.init_checkpoint:
        params = checkpoint.fit(params, checkpoint.load(config.init_checkpoint), config.reinitialize)
    trainable = multihost.put(freezing.trainable_mask(params, hparams.trainable), fns.replicated)
    state = fns.init_state(multihost.put(params, fns.replicated))
    # With several processes (dptune.trainer.multihost) every one of them uses process 0's secret.
    start = _Start(state, multihost.shared_secret(run_secret(config, settings)), trainable,
                   freezing.trainable_modules(params, hparams.trainable))
    if config.resume is not None and (point := config.resume.latest()) is not None:
        # A resumed run goes on with the secret, state and reports of its last checkpoint (dptune.trainer.resume).
        start.secret = config.resume.resume_secret(point)
        start.state = multihost.put(point.state(multihost.fetch(state)), fns.replicated)
        start.step, start.history, start.examples = point.step, list(point.history), point.examples
    return start


@dataclass
class _Done:
    """What the loop did."""

    state: TrainState
    taken: int
    history: list[dict[str, float]]
    examples: int
    train_seconds: float
    startup_seconds: float
    stopped: bool


@dataclass
class _Loop:
    """The steps of one run, from its start to its budget, a callback's stop or an interrupt."""

    fns: StepFunctions
    dataset: Dataset
    hparams: Hyperparams
    config: RunConfig
    q: float
    sigma: float
    clip_norm: float
    allowed: int
    secret: SecretSeed
    trainable: Any
    audit: Any
    callback: Callback | None
    eval_batch_size: int
    augment: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None
    feed: str = "loop"
    feeder: Any = None
    noise_key: Any = None
    meter: StepMeter | None = None

    def prepare(self, start: _Start, progress: Reporter | None, budget: PrivacyBudget | None) -> None:
        """Augmentation, feed and noise key of the (possibly resumed) secret, and the progress meter."""
        config, hp = self.config, self.hparams
        self.secret = start.secret
        self.augment = augmenter(config.augmentation, start.secret) if config.augmentation.active else None
        self.feed, self.feeder = _feed(config, self.dataset, self.fns, self.augment, hp.batch_size, self.q,
                                       start.secret, self.allowed, start.step,
                                       loop_only=self.audit is not None or seams.active(train_step))
        self.noise_key = multihost.put(start.secret.noise_key(), self.fns.replicated)
        if progress is not None:
            self.meter = _meter(progress, self.allowed, start.step, self.q, self.sigma, hp.batch_size, budget,
                                config.private)

    def run(self, start: _Start, clock: _Clock) -> _Done:
        config = self.config
        eval_every = config.eval_every or max(1, round(1 / self.q))
        done = _Done(start.state, start.step, list(start.history), start.examples, 0.0, 0.0, False)
        for t in range(start.step, self.allowed):
            interrupt.raise_if_pending()  # SIGINT/SIGTERM in a study stop here, between steps
            tick, compiled = time.perf_counter(), compile_stats.seconds()
            done.state, sampled = self.step(done.state, t)
            # Throughput counts the expected batch (public); realised Poisson sizes are private.
            done.examples += self.hparams.batch_size if config.private else sampled
            done.taken = t + 1
            if config.resume is not None:
                config.resume.verify(done.taken, done.state.params)  # a replay must match what was reported
            if t == start.step:
                jax.block_until_ready(done.state.params)
                done.startup_seconds = time.perf_counter() - clock.started
            if self.meter is not None:
                self.meter.step(done.taken)  # after the first step's wait: its rate is not the dispatch's
            if done.taken % eval_every == 0 or done.taken == self.allowed:
                jax.block_until_ready(done.state.params)
                done.train_seconds += _compute_seconds(tick, compiled)
                if self.evaluated(done) and done.taken < self.allowed:
                    done.stopped = True
                    break
            else:
                done.train_seconds += _compute_seconds(tick, compiled)
            if config.resume is not None and done.taken < self.allowed and config.resume.due(done.taken):
                # The accountant's inputs travel with the state they produced.
                config.resume.save(done.taken, done.state, self.secret, done.history, done.examples,
                                   {"sampling_rate": self.q, "noise_multiplier": self.sigma, "steps": done.taken})
        return done

    def step(self, state: TrainState, t: int) -> tuple[TrainState, int]:
        """Step ``t`` on its Poisson batch: the new state and the realised batch size."""
        config, hp, n = self.config, self.hparams, len(self.dataset.train)
        audit = self.audit
        indices = poisson_batch(self.secret.batch_sampler(t), n + (audit.members if audit is not None else 0), self.q)
        if audit is not None:
            indices = audit.split(indices, n, t)  # keeps the sampled canaries, returns the training examples
        # Non-private baselines may normalise by the realised batch size.
        denominator = float(hp.batch_size) if config.private else float(max(1, len(indices)))
        if self.feeder is None:
            state = train_step(self.fns, state, self.dataset, indices, self.noise_key, t, hp, denominator,
                               self.clip_norm, self.sigma, hp.learning_rate, config.private, augment=self.augment,
                               trainable=self.trainable, audit=audit)
        else:
            state = self.feeder.step(state, indices, config.private, (
                self.noise_key, t, self.sigma, self.clip_norm, denominator, hp.learning_rate, hp.momentum,
                _ema_decay_at(hp.ema_decay, t)), trainable=self.trainable)
        return state, len(indices)

    def evaluated(self, done: _Done) -> bool:
        """Validate after ``done.taken`` steps and report it; whether the callback asks to stop."""
        fns, params, validation = self.fns, done.state.params, self.dataset.validation
        acc, loss = evaluate(fns, params, validation, self.eval_batch_size)
        metrics = {"step": done.taken, "epoch": done.taken * self.q, "val_accuracy": acc, "val_loss": loss}
        if self.hparams.ema_decay > 0:
            metrics["ema_val_accuracy"], _ = evaluate(fns, done.state.ema_params, validation, self.eval_batch_size)
        metrics["best_val_accuracy"] = max(acc, metrics.get("ema_val_accuracy", 0.0))
        done.history.append(metrics)
        if self.meter is not None:
            self.meter.evaluated(done.taken, metrics)
        if self.config.resume is not None:
            self.config.resume.note(done.taken, params)  # the digest of what this report reflects
        return bool(self.callback is not None and self.callback(done.taken, dict(metrics)))


def _feed(config: RunConfig, dataset: Dataset, fns: StepFunctions,
          augment: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None, batch_size: int, q: float,
          secret: SecretSeed, allowed: int, start: int, *, loop_only: bool) -> tuple[str, Any]:
    """(the feed used, its feeder; None for the microbatch loop of :func:`train_step`)."""
    used = feeds.choose(config.feed, dataset.train, fns, augmenting=augment is not None,
                        batch_size=batch_size, fraction=config.device_data_fraction)
    if loop_only:
        # Canaries and test seams hook into the microbatch loop; the compiled feeds equal it
        # to float tolerance (tests/test_feed.py), so what an audit finds holds for them too.
        used = "loop"
    if used == "resident":
        return used, feeds.ResidentFeed(fns, dataset.train)
    if used != "streamed":
        return used, None
    source = None
    if isinstance(dataset.train, RecordSplit) and config.loader_workers > 0:
        # Records decoded in worker processes, ahead of the step that needs them (dptune.data.pipeline).
        reader = pipeline.PoissonBatches(dataset.train.source, dataset.train.indices, dataset.train.decode,
                                         secret, q, fns.microbatch_size)
        source = pipeline.Loader(reader, allowed, num_workers=config.loader_workers, start=start).batch
    copies = config.augmentation.multiplicity if augment is not None else 1
    return used, feeds.StreamedFeed(fns, dataset.train, augment, source, copies=copies, sampling_rate=q)


@dataclass(frozen=True)
class _Final:
    """The last validation, the test accuracies, and which parameters (raw or EMA) are selected."""

    val_accuracy: float
    val_loss: float
    test_accuracy: float
    ema_val_accuracy: float | None
    ema_test_accuracy: float | None
    selected: str
    params: Any

    @property
    def selected_accuracies(self) -> tuple[float | None, float | None]:
        if self.selected == "ema":
            return self.ema_val_accuracy, self.ema_test_accuracy
        return self.val_accuracy, self.test_accuracy


def _final_evaluation(loop: _Loop, done: _Done) -> _Final:
    """Test the raw (and EMA) parameters; select by validation accuracy alone."""
    last, state, test, bs = done.history[-1], done.state, loop.dataset.test, loop.eval_batch_size
    test_acc, _ = evaluate(loop.fns, state.params, test, bs)
    if loop.hparams.ema_decay <= 0:
        return _Final(last["val_accuracy"], last["val_loss"], test_acc, None, None, "raw", state.params)
    ema_val = last["ema_val_accuracy"]
    ema_test, _ = evaluate(loop.fns, state.ema_params, test, bs)
    better = ema_val > last["val_accuracy"]
    return _Final(last["val_accuracy"], last["val_loss"], test_acc, ema_val, ema_test,
                  "ema" if better else "raw", state.ema_params if better else state.params)


def _save(config: RunConfig, dataset: Dataset, final: _Final, taken: int, q: float, sigma: float,
          spent: privacy.PrivacySpend | None) -> None:
    """Write the selected parameters with their lineage: which data they have seen, at what privacy.

    Continuing from them on the same data then composes instead of resetting.
    """
    assert config.save_checkpoint is not None
    lineage = checkpoint.lineage(config.init_checkpoint) + [{
        "dataset": dataset.name, "private": config.private,
        "events": [[q, sigma, taken]] if config.private else [],
        **({} if config.search is None else {"search": {"study": config.search, "exported": False}}),
    }]
    sel_val, sel_test = final.selected_accuracies
    checkpoint.save(config.save_checkpoint, multihost.fetch(final.params), {
        "model": config.model, "weight_standardization": config.weight_standardization,
        "model_args": dict(config.model_args), "loss": config.loss, "input_dtype": dataset.input_dtype,
        "pixels": dataset.pixels, "dataset": dataset.name, "image_shape": list(dataset.image_shape),
        "num_classes": dataset.num_classes, "private": config.private, "steps": taken,
        "parameters": final.selected, "val_accuracy": sel_val, "test_accuracy": sel_test,
        "init_checkpoint": config.init_checkpoint, "split": dataset.split.as_dict(),
        "privacy": None if spent is None else spent.as_dict(), "lineage": lineage,
    })


def _result(dataset: Dataset, config: RunConfig, steps: int, loop: _Loop, start: _Start, done: _Done,
            final: _Final, clock: _Clock, spent: privacy.PrivacySpend | None, prior: checkpoint.PriorSpend,
            devices: int) -> TrainResult:
    # Which path and rules clipped the sums: a value of the configuration, traced abstractly.
    copies = config.augmentation.multiplicity if loop.augment is not None else 1
    plan = (loop.fns.clipping_plan(start.state.params, dataset.image_shape, dataset.input_dtype, copies)
            if config.private else None)
    return TrainResult(
        val_accuracy=final.val_accuracy, test_accuracy=final.test_accuracy, val_loss=final.val_loss,
        ema_val_accuracy=final.ema_val_accuracy, ema_test_accuracy=final.ema_test_accuracy,
        steps=done.taken, steps_requested=steps, epochs=done.taken * loop.q, stopped_early=done.stopped,
        budget_limited=loop.allowed < steps, private=config.private, privacy=spent,
        examples_per_second=done.examples / max(done.train_seconds, 1e-9),
        compile_seconds=compile_stats.seconds() - clock.compiled, startup_seconds=done.startup_seconds,
        wall_seconds=time.perf_counter() - clock.started, examples_processed=done.examples, devices=devices,
        microbatch_size=config.microbatch_size,
        clipping=plan.label if plan else "none (non-private)",
        clipping_rules=plan.rule_map if plan else {},
        private_seed_fixed=loop.secret.fixed, split=dataset.split.as_dict(), history=done.history,
        selected=final.selected, trainable_modules=start.trainable_modules, init_checkpoint=config.init_checkpoint,
        augmentation=asdict(config.augmentation), prior_events=list(prior.events), prior_bounds=list(prior.bounds),
        feed=loop.feed,
    )
