"""The storage schema of a dptune study: every Optuna attribute key it writes or reads, and typed views of them.

This is the one module that names storage keys. Everything else (the study
driver, the objective, the proxies, the release, the inspection layers and the
command line) reads and writes a study's and its trials' attributes through the
constants, views and builders here, so that a key is spelt once and a study
written by an older dptune is read the same way everywhere. No JAX here: the
inspection layers import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from dptune.privacy.mechanism import Mechanism, mechanisms

# -- study user attributes ----------------------------------------------------------------
CONFIG = "dptune_config"  # the resolved study file and search space (ResolvedStudy.to_json)
VERSION = "dptune_version"
DELTA = "delta"
SPLIT = "split"  # the split sizes the study was planned for
PRIOR_EVENTS = "prior_privacy_events"  # a private initial checkpoint's recorded runs, [[q, σ, T], …]
INIT_CHECKPOINT_SHA = "init_checkpoint_sha256"
EPSILON_TARGET = "epsilon_target"  # also a trial attribute: the budget a trial trained under
ACCOUNTANT = "accountant"  # also a trial attribute
NON_PRIVATE = "non_private"
PRIVATE_SEARCH = "private_search"  # the drawn K and the one calibrated mechanism
SEARCH_BUDGET = "search_budget"  # {"epsilon", "order"}: a privacy filter's cap
SEARCH_MODE = "search_mode"  # a cheaper-tuning mode's settings and the sizes it was planned for
TOTAL_BUDGET = "total_budget"  # a total budget's plan: K proxies, their mechanism, the final run's, the split
SEED_FIXED = "private_seed_fixed"  # a fixed private_seed exists (the seed itself is never stored); also a trial's

# -- study system attributes ----------------------------------------------------------------
STUDY_ID = "dptune:study_id"  # random, set at creation
BEST_MODEL_PREFIX = "dptune:best_model:"  # + artifact id: a kept best model's index entry
ARTIFACTS_PREFIX = "artifacts:"  # optuna.artifacts' listing of a study's artifacts

# -- trial user attributes: bookkeeping ----------------------------------------------------------
WORKER = "worker"  # the process running the trial (host, pid, start)
TOUCHED_DATA = "touched_data"  # set just before the trial reads the training data
REJECTED_REASON = "rejected_reason"  # infeasible or refused before touching data
SKIPPED_REASON = "skipped_reason"  # a private search's trial past K
FAILED_REASON = "failed_reason"
RETRY_OF = "retry_of"  # the first attempt a re-queued retry repeats
RETRIES = "retries"
REAPED_BY = "reaped_by"
AUDIT_OF = "audit_of"  # an audit run of that trial
FILTER_REQUEST = "filter_request"  # [q, σ, T] written before the filter reads the others'
FILTER_ADMITTED = "filter_admitted"
# In-trial checkpoints: what a retry resumed and what each attempt reported.
RESUMED_FROM = "resumed_from"  # {"trial", "step", "randomness": "replayed" | "fresh", ["diverged_at"]}
REPLAY_DIGESTS = "replay_digests"
PROGRESS_STEPS = "progress_steps"
CHECKPOINT_STEP = "checkpoint_step"
RAN_STEPS = "ran_steps"
RESUME_ATTRS = (RESUMED_FROM, REPLAY_DIGESTS, PROGRESS_STEPS, CHECKPOINT_STEP, RAN_STEPS)

# -- trial user attributes: the plan and what ran ----------------------------------------------------------
DELTA_OF_TRIAL = DELTA
SAMPLING_RATE = "sampling_rate"
NOISE_MULTIPLIER = "noise_multiplier"
BATCH_SIZE = "batch_size"
LEARNING_RATE = "learning_rate"
CLIP_NORM = "clip_norm"
OPTIMIZER = "optimizer"
MOMENTUM = "momentum"
EMA_DECAY = "ema_decay"
TRAINABLE = "trainable"
PLANNED_STEPS = "planned_steps"
PLANNED_EPOCHS = "planned_epochs"
MAX_STEPS_BY_BUDGET = "max_steps_by_budget"
DERIVED = "derived"
STEPS = "steps"
EPSILON_SPENT = "epsilon_spent"
VAL_ACCURACY = "val_accuracy"
TEST_ACCURACY = "test_accuracy"
EXAMPLES_PROCESSED = "examples_processed"
MICROBATCH_SIZE = "microbatch_size"
SEED = "seed"
WALL_SECONDS = "wall_seconds"
WARNINGS = "warnings"

# -- trial user attributes: cheaper-tuning modes ----------------------------------------------------------
PROXY = "proxy_trial"  # a tuning trial of a mode (its model is not kept)
FULL_SCALE = "full_scale"  # the full-scale run the proxy stood in for
FINAL = "final_run"  # the mode's final run (the released model)
FINAL_PLAN = "final_plan"  # the transferred hyperparameters the final run trains with
FINAL_SOURCE = "final_from_trial"  # the proxy whose hyperparameters were transferred
SUBSET_ID = "subset_id"  # the public id of the secret subset a subset proxy read

# Step and wall times follow the realised Poisson batches, so a subset proxy's tell the size of its secret subset;
# Optuna's own start and end times are the same figures.
TIMING_ATTRS = ("wall_seconds", "examples_per_second", "compile_seconds", "startup_seconds",
                "datetime_start", "datetime_complete", "duration_seconds")

# Trial attributes a private search keeps internal: counts, ids and retries tell K, timings the realised batches
# (only a worker's first trial compiles; step times follow the batch sizes).
K_REVEALING = (RETRY_OF, RETRIES, WORKER, SEED, SKIPPED_REASON, "compile_seconds", "startup_seconds", WALL_SECONDS,
               "examples_per_second")

# The columns of a report's table of the best trials, after the trial's number, state and value.
TOP_TABLE = (TEST_ACCURACY, EPSILON_SPENT, EPSILON_TARGET, DELTA_OF_TRIAL, BATCH_SIZE, LEARNING_RATE, CLIP_NORM,
             NOISE_MULTIPLIER, STEPS, "epochs", "examples_per_second")

# -- trial system attributes (Optuna's) ----------------------------------------------------------
OPTUNA_FAILED_TRIAL = "failed_trial"  # Optuna's heartbeat retry: the trial it repeats



@dataclass(frozen=True)
class StudyRecord:
    """A study's user attributes, typed. Missing keys (older studies) read as None or empty."""

    config: dict[str, Any]
    delta: float | None
    epsilon_target: float | None
    accountant: str | None
    split: dict[str, Any] | None
    prior: tuple[Mechanism, ...]
    non_private: bool
    private_search: dict[str, Any] | None
    search_budget: dict[str, Any] | None
    search_mode: dict[str, Any] | None
    init_checkpoint_sha: str | None
    seed_fixed: bool
    is_dptune: bool
    total_budget: dict[str, Any] | None = None

    @classmethod
    def of(cls, study: optuna.Study | Any) -> StudyRecord:
        """The record of a study (or of anything with ``user_attrs``: a study summary)."""
        return cls.read(study.user_attrs)

    @classmethod
    def read(cls, a: Mapping[str, Any]) -> StudyRecord:
        return cls(
            config=a.get(CONFIG) or {}, delta=a.get(DELTA), epsilon_target=a.get(EPSILON_TARGET),
            accountant=a.get(ACCOUNTANT), split=a.get(SPLIT), prior=mechanisms(a.get(PRIOR_EVENTS)),
            non_private=bool(a.get(NON_PRIVATE)), private_search=a.get(PRIVATE_SEARCH),
            search_budget=a.get(SEARCH_BUDGET), search_mode=a.get(SEARCH_MODE),
            init_checkpoint_sha=a.get(INIT_CHECKPOINT_SHA), seed_fixed=bool(a.get(SEED_FIXED)),
            is_dptune=CONFIG in a, total_budget=a.get(TOTAL_BUDGET))

    @property
    def study_config(self) -> dict[str, Any]:
        """The ``study`` section of the stored configuration (the study file's keys)."""
        return dict(self.config.get("study") or {})

    @property
    def validation_dataset(self) -> str | None:
        return self.study_config.get("validation_dataset")

    @property
    def n_validation(self) -> int:
        return int((self.split or {}).get("validation") or 0)

    @property
    def n_train(self) -> int | None:
        return (self.split or {}).get("train")


def study_attrs(*, config: dict[str, Any], version: str, delta: float | None, split: dict[str, Any],
                prior: list[list[float]], search_mode: dict[str, Any] | None = None,
                init_checkpoint_sha: str | None = None) -> dict[str, Any]:
    """The user attributes every new study starts with (the regime adds its own: :func:`regime_attrs`)."""
    attrs: dict[str, Any] = {CONFIG: config, VERSION: version, DELTA: delta, SPLIT: split, PRIOR_EVENTS: prior}
    if search_mode is not None:
        attrs[SEARCH_MODE] = search_mode
    if init_checkpoint_sha is not None:
        attrs[INIT_CHECKPOINT_SHA] = init_checkpoint_sha
    return attrs


def regime_attrs(*, private_search: dict[str, Any] | None = None, non_private: bool = False,
                 epsilon_target: float | None = None, accountant: str | None = None,
                 search_budget: dict[str, Any] | None = None,
                 total_budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """The user attributes that say which privacy regime a study runs under."""
    if total_budget is not None:
        return {TOTAL_BUDGET: total_budget, EPSILON_TARGET: total_budget["total_epsilon"], ACCOUNTANT: "pld"}
    if private_search is not None:
        return {PRIVATE_SEARCH: private_search, EPSILON_TARGET: private_search["per_trial_epsilon"],
                ACCOUNTANT: "rdp"}
    if non_private:
        return {NON_PRIVATE: True}
    attrs: dict[str, Any] = {EPSILON_TARGET: epsilon_target, ACCOUNTANT: accountant}
    if search_budget is not None:
        attrs[SEARCH_BUDGET] = search_budget
    return attrs


def with_config(attrs: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` holding ``config`` as the stored configuration."""
    return {**attrs, CONFIG: config}


def config_of(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored configuration in a study's user attributes (None: not a dptune study)."""
    return attrs.get(CONFIG)


# -- trials ----------------------------------------------------------------------------------

def attrs_of(t: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    return t.user_attrs


def get(t: FrozenTrial | optuna.Trial | Mapping[str, Any], key: str, default: Any = None) -> Any:
    """A trial attribute by its key constant (``t`` a trial or its user attributes)."""
    a = t if isinstance(t, Mapping) else t.user_attrs
    return a.get(key, default)


def has(t: FrozenTrial | optuna.Trial | Mapping[str, Any], key: str) -> bool:
    a = t if isinstance(t, Mapping) else t.user_attrs
    return key in a


def set_all(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Write trial attributes one by one (Optuna has no batch write for a running trial)."""
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def is_proxy(t: FrozenTrial | optuna.Trial) -> bool:
    return bool(t.user_attrs.get(PROXY))


def is_final(t: FrozenTrial | optuna.Trial) -> bool:
    return bool(t.user_attrs.get(FINAL))


def is_audit(t: FrozenTrial | optuna.Trial) -> bool:
    return AUDIT_OF in t.user_attrs


def is_rejected(t: FrozenTrial | optuna.Trial) -> bool:
    return REJECTED_REASON in t.user_attrs


def is_skipped(t: FrozenTrial | optuna.Trial) -> bool:
    return SKIPPED_REASON in t.user_attrs


def optuna_retry_of(system: Mapping[str, Any]) -> int | None:
    """The trial an Optuna heartbeat retry repeats, from the trial's system attributes."""
    value = system.get(OPTUNA_FAILED_TRIAL)
    return None if value is None else int(value)


@dataclass(frozen=True)
class ResumeLink:
    """A retry's ``resumed_from``: the dead attempt, the step it resumed at, and whether its randomness replayed."""

    trial: int | None
    step: int
    replayed: bool
    diverged_at: int | None = None

    @classmethod
    def of(cls, t: FrozenTrial) -> ResumeLink | None:
        link = t.user_attrs.get(RESUMED_FROM)
        if not link:
            return None
        return cls(None if link.get("trial") is None else int(link["trial"]), int(link.get("step") or 0),
                   link.get("randomness") == "replayed", link.get("diverged_at"))

    def as_attr(self) -> dict[str, Any]:
        out: dict[str, Any] = {"trial": self.trial, "step": self.step,
                               "randomness": "replayed" if self.replayed else "fresh"}
        if self.diverged_at is not None:
            out["diverged_at"] = self.diverged_at
        return out


def spend_of(t: FrozenTrial, finished: bool) -> Mechanism | None:
    """(q, σ, steps) of a trial: the steps it took if ``finished``, else its planned steps; None if unplanned."""
    a = t.user_attrs
    steps = a.get(STEPS) if finished else a.get(PLANNED_STEPS)
    if not steps or SAMPLING_RATE not in a:
        return None
    return Mechanism(float(a[SAMPLING_RATE]), float(a[NOISE_MULTIPLIER]), int(steps))


def extent_of(t: FrozenTrial) -> int:
    """The last step whose outputs an attempt wrote anywhere: its reports, its checkpoints, where it resumed."""
    a = t.user_attrs
    resumed = (a.get(RESUMED_FROM) or {}).get("step", 0)
    return max(int(a.get(PROGRESS_STEPS) or 0), int(a.get(CHECKPOINT_STEP) or 0), int(resumed or 0))


def filter_request(t: FrozenTrial) -> Mechanism | None:
    raw = t.user_attrs.get(FILTER_REQUEST)
    return None if raw is None else Mechanism.of(raw)


def touched_data(t: FrozenTrial) -> bool | None:
    """The trial's ``touched_data`` flag, or None for a trial of a study stored before it existed."""
    a = t.user_attrs
    return bool(a[TOUCHED_DATA]) if TOUCHED_DATA in a else None


def total(trials: Any, key: str) -> int:
    """The sum of an integer trial attribute (missing: 0)."""
    return sum(int(t.user_attrs.get(key, 0) or 0) for t in trials)


def plan_attrs(hparams: Any, sampling_rate: float, steps: int, epochs: float, max_steps_by_budget: int | None,
               derived: str) -> dict[str, Any]:
    """A planned trial's attributes: its hyperparameters (a dataclass), q and the planned length."""
    return {**dataclasses.asdict(hparams), SAMPLING_RATE: sampling_rate, PLANNED_STEPS: steps,
            PLANNED_EPOCHS: epochs, MAX_STEPS_BY_BUDGET: max_steps_by_budget, DERIVED: derived}


def result_attrs(result: Any, seed: int, multiplicity: int) -> dict[str, Any]:
    """What a finished run records (``result``: a :class:`~dptune.trainer.train.TrialResult`)."""
    attrs = {
        EPSILON_SPENT: result.epsilon, STEPS: result.steps, "epochs": result.epochs,
        VAL_ACCURACY: result.selected_val_accuracy, TEST_ACCURACY: result.selected_test_accuracy,
        "ema_val_accuracy": result.ema_val_accuracy, "ema_test_accuracy": result.ema_test_accuracy,
        "examples_per_second": result.examples_per_second, "compile_seconds": result.compile_seconds,
        "startup_seconds": result.startup_seconds, WALL_SECONDS: result.wall_seconds,
        EXAMPLES_PROCESSED: result.examples_processed, "devices": result.devices,
        MICROBATCH_SIZE: result.microbatch_size, "clipping": result.clipping,
        "clipping_rules": result.clipping_rules,  # which rule clipped each parameter (fast path)
        SEED: seed, SEED_FIXED: result.private_seed_fixed, "budget_limited": result.budget_limited,
        "selected_parameters": result.selected, "raw_val_accuracy": result.val_accuracy,
        "raw_test_accuracy": result.test_accuracy, "trainable_modules": result.trainable_modules,
        "augmentation_multiplicity": multiplicity,
    }
    if result.warnings:
        attrs[WARNINGS] = result.warnings
    return attrs


def rejected_attrs(reason: str) -> dict[str, Any]:
    """A trial refused before it touched data: why, and that it spent nothing."""
    return {REJECTED_REASON: reason, EPSILON_SPENT: 0.0, STEPS: 0}


def budget_attrs(epsilon: float, delta: float, accountant: str) -> dict[str, Any]:
    return {EPSILON_TARGET: epsilon, DELTA_OF_TRIAL: delta, ACCOUNTANT: accountant}


def hparams_of(t: FrozenTrial, fields: Any) -> dict[str, Any]:
    """The hyperparameters a trial recorded, restricted to ``fields`` (the trainer's dataclass fields)."""
    return {k: v for k, v in t.user_attrs.items() if k in fields}


def audit_start_attrs(target: int, threat_model: str, worker: Any) -> dict[str, Any]:
    """An audit run's attributes from its first write on: what it audits, that it has not read data yet."""
    return {AUDIT_OF: target, "audit_threat_model": threat_model, TOUCHED_DATA: False, WORKER: worker}


def audit_plan_attrs(q: float, sigma: float, steps: int, clip_norm: float, batch_size: int) -> dict[str, Any]:
    """An audit run's mechanism, written before it reads data (so that it is counted if it dies)."""
    return {SAMPLING_RATE: q, NOISE_MULTIPLIER: sigma, PLANNED_STEPS: steps, CLIP_NORM: clip_norm,
            BATCH_SIZE: batch_size}


def audit_result_attrs(result: Any) -> dict[str, Any]:
    """What an audit run recorded (``result``: a :class:`~dptune.search.audit.AuditResult`)."""
    return {STEPS: result.steps, SAMPLING_RATE: result.sampling_rate, EPSILON_SPENT: result.claimed_epsilon,
            "training_examples": result.training_examples, "audit_epsilon_lower_bound": result.epsilon_lower_bound,
            "audit_epsilon_lower_bound_fdp": result.epsilon_lower_bound_fdp,
            "audit_max_lower_bound": result.max_lower_bound, "audit_canaries": result.canaries,
            "audit_exceeds_claim": result.exceeds_claim}


# The hyperparameters a released model's metadata lists (those the trial recorded).
RELEASED_HPARAMS = (BATCH_SIZE, LEARNING_RATE, CLIP_NORM, NOISE_MULTIPLIER, SAMPLING_RATE, OPTIMIZER, MOMENTUM,
                    "schedule", "warmup_steps", EMA_DECAY, TRAINABLE, PLANNED_STEPS)


def released_hparams(t: FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    return {k: a.get(k) for k in RELEASED_HPARAMS if k in a}


def trial_privacy(t: FrozenTrial) -> dict[str, Any]:
    """A trial's own privacy as its last attempt recorded it: ε, δ, accountant and its (q, σ, T)."""
    a = t.user_attrs
    return {"epsilon": a.get(EPSILON_SPENT), "delta": a.get(DELTA_OF_TRIAL), "accountant": a.get(ACCOUNTANT),
            "sampling_rate": a.get(SAMPLING_RATE), "noise_multiplier": a.get(NOISE_MULTIPLIER),
            "steps": a.get(STEPS)}


def own_run(t: FrozenTrial) -> Mechanism:
    """(q, σ, steps taken) of a trial's last attempt; zeros for what it did not record."""
    a = t.user_attrs
    return Mechanism(float(a.get(SAMPLING_RATE, 0.0)), float(a.get(NOISE_MULTIPLIER, 0.0)), int(a.get(STEPS) or 0))
