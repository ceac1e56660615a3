"""Turn a search space into one trial's plan under a fixed privacy budget.

A trial samples its hyperparameters, then derives what the budget (ε, δ)
leaves for them, with a real accountant:

* ``noise_multiplier`` sampled → the largest number of steps whose ε fits the
  budget for that (q, σ), capped by the training budget;
* ``epochs`` sampled → the smallest σ whose ε fits the budget for that many
  steps.

A sample that cannot train a useful number of steps within ε raises
:class:`Infeasible` before any data is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from dptune.config.schema import Choice, Range, SearchSpace, TrainingBudget, batch_size_problem
from dptune.errors import ConfigError, DptuneError
from dptune.privacy import accounting as privacy
from dptune.trainer.dp_step import OPTIMIZERS
from dptune.trainer.train import Hyperparams, PrivacyBudget

INT_PARAMS = ("batch_size",)


class Infeasible(DptuneError):
    """The sampled hyperparameters cannot train within the privacy budget."""


class SuggestsParams(Protocol):
    """The part of ``optuna.Trial`` a plan needs."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial will run with, and how it was derived."""

    hparams: Hyperparams
    steps: int
    sampling_rate: float
    max_steps_by_budget: int
    derived: str  # "steps_from_epsilon" or "noise_from_epsilon"

    @property
    def epochs(self) -> float:
        return self.steps * self.sampling_rate

    def as_attrs(self) -> dict[str, Any]:
        from dptune.search.record import plan_attrs

        return plan_attrs(self.hparams, self.sampling_rate, self.steps, self.epochs, self.max_steps_by_budget,
                          self.derived)


def _suggest(trial: SuggestsParams, name: str, spec: Any, num_examples: int) -> Any:
    if isinstance(spec, Range):
        high = num_examples if spec.high == "full" else spec.high
        if name in INT_PARAMS:
            low, high = int(math.ceil(spec.low)), int(min(high, num_examples))
            if low > high:
                raise ConfigError(f"search_space.{name}",
                                  f"low = {low} exceeds the training-set size {num_examples}")
            return trial.suggest_int(name, low, high, log=spec.log)
        if spec.high == "full":
            raise ConfigError(f"search_space.{name}", "high: 'full' is only allowed for batch_size")
        return trial.suggest_float(name, spec.low, high, log=spec.log)
    if isinstance(spec, Choice):
        return trial.suggest_categorical(name, list(spec.choices))
    return spec  # a fixed value


def _interval(low: float, low_open: bool, high: float | None, high_open: bool) -> tuple[str, Callable[[float], bool]]:
    upper = "∞)" if high is None else f"{high:g}" + (")" if high_open else "]")
    text = ("(" if low_open else "[") + f"{low:g}, " + upper

    def inside(v: float) -> bool:
        return (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))

    return text, inside


def check_space(space: SearchSpace, num_examples: int, private: bool) -> None:
    """Refuse any value a trial could sample that cannot train, before the study is created.

    Every fixed value, choice, grid value and range end is checked against what
    the trainer accepts and against the training-set size N, so that a bad
    space fails once at ``study create`` instead of in every trial. Ranges are
    intervals, so checking their ends covers every value inside.
    """
    n = num_examples
    # name: (allowed interval, why it matters if it is not obvious)
    rules: dict[str, tuple[tuple[str, Callable[[float], bool]], str]] = {
        "learning_rate": (_interval(0, True, None, False), ""),
        "effective_learning_rate": (_interval(0, True, None, False), ""),
        "epochs": (_interval(0, True, None, False), ""),
        "momentum": (_interval(0, False, 1, True), ""),
        "ema_decay": (_interval(0, False, 1, True), " (0 = off)"),
        "clip_norm": (_interval(0, True, None, False), ""),
        "noise_multiplier": (_interval(0, private, None, False),
                             " (σ = 0 adds no noise: ε would be infinite)" if private else ""),
    }
    for name, spec in space.params().items():
        field = f"search_space.{name}"
        if name == "trainable":
            continue  # checked when the file is read
        if name == "optimizer":
            if isinstance(spec, Range):
                raise ConfigError(field, f"is a name, not a range; give one of {', '.join(OPTIMIZERS)} or "
                                         "{choices: [...]}")
            for v in spec.choices if isinstance(spec, Choice) else [spec]:
                if v not in OPTIMIZERS:
                    raise ConfigError(field, f"unknown {v!r}; allowed: {', '.join(OPTIMIZERS)}")
            continue
        if isinstance(spec, Range):
            if spec.high == "full" and name != "batch_size":
                raise ConfigError(field, "high: 'full' is only allowed for batch_size")
            ends: list[tuple[str, Any]] = [("low", spec.low), ("high", spec.high)]
            ends += [("grid", g) for g in spec.grid or []]
        elif isinstance(spec, Choice):
            ends = [("choices", c) for c in spec.choices]
        else:
            ends = [("", spec)]
        for where, v in ends:
            label = f"{where} = " if where else ""
            if name == "batch_size" and where == "high" and v == "full":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(field, f"{label}{v!r} is not a number")
            if math.isnan(v):
                raise ConfigError(field, f"{label}.nan is not a number")
            if name == "batch_size":
                if batch_size_problem(v, n) is not None:
                    hint = "; use high: full for batches up to the whole set" if where == "high" and v > n else ""
                    raise ConfigError(field, f"{label}{v:g} is not a batch size: each must be a whole number in "
                                             f"[1, {n}] (N, the training-set size){hint}")
                continue
            (text, inside), why = rules[name]
            finite = name != "clip_norm" or private or "effective_learning_rate" in space.params()
            if not inside(v) or (finite and not math.isfinite(v)):
                raise ConfigError(field, f"{label}{v:g} is out of range: must be a {'finite ' if finite else ''}"
                                         f"number in {text}{why}")


def smallest_batch(space: SearchSpace, num_examples: int) -> int:
    """The smallest logical batch the space can sample (a microbatch larger than it is wasted padding)."""
    spec = space.batch_size
    if isinstance(spec, Range):
        low = spec.low
    elif isinstance(spec, Choice):
        low = min(num_examples if c == "full" else float(c) for c in spec.choices)
    else:
        low = num_examples if spec == "full" else float(spec)
    return max(1, min(num_examples, int(math.ceil(low))))


def plan_trial(
    trial: SuggestsParams,
    space: SearchSpace,
    num_examples: int,
    budget: PrivacyBudget | None,
    training: TrainingBudget,
    fixed_mechanism: tuple[float, int] | None = None,
) -> TrialPlan:
    """Sample one trial's hyperparameters and derive steps or σ from the budget.

    ``fixed_mechanism`` = (σ, steps) imposes the mechanism of a private search,
    which every trial runs identically. ``budget=None``: a non-private study
    (σ = 0; steps from the sampled epochs, else the training budget's cap).
    """
    v = {name: _suggest(trial, name, spec, num_examples) for name, spec in space.params().items()}
    batch = int(v["batch_size"])
    q = batch / num_examples
    cap = math.inf
    if training.max_epochs is not None:
        cap = math.ceil(training.max_epochs / q)
    if training.max_steps is not None:
        cap = min(cap, training.max_steps)
    cap = int(cap)

    if budget is None:
        sigma, derived = 0.0, "non_private"
        if "epochs" in v:
            steps = min(cap, max(1, math.ceil(float(v["epochs"]) / q)))
        elif cap < math.inf:
            steps = cap
        else:
            raise ConfigError("budget", "a non-private study needs epochs in the search space or "
                                        "budget.max_epochs / budget.max_steps")
    elif fixed_mechanism is not None:
        sigma, steps = fixed_mechanism
        derived = "private_search"
    elif space.mode == "sample_noise":
        sigma = float(v["noise_multiplier"])
        steps = privacy.max_steps(q, sigma, budget.epsilon, budget.delta, budget.accountant, limit=cap)
        derived = "steps_from_epsilon"
        if steps < training.min_steps:
            raise Infeasible(
                f"σ = {sigma:.4g} at q = {q:.4g} allows only {steps} step(s) within ε = {budget.epsilon:g} "
                f"(budget.min_steps = {training.min_steps})"
            )
    else:
        steps = min(cap, max(1, math.ceil(float(v["epochs"]) / q)))
        sigma = privacy.noise_for_epsilon(q, steps, budget.epsilon, budget.delta, budget.accountant)
        derived = "noise_from_epsilon"

    clip = float(v["clip_norm"])
    lr = float(v["learning_rate"]) if "learning_rate" in v else float(v["effective_learning_rate"]) / clip
    hp = Hyperparams(
        batch_size=batch,
        learning_rate=lr,
        clip_norm=clip,
        noise_multiplier=sigma,
        optimizer=str(v["optimizer"]),
        momentum=float(v["momentum"]),
        ema_decay=float(v["ema_decay"]),
        trainable=str(v["trainable"]),
    )
    return TrialPlan(hparams=hp, steps=steps, sampling_rate=q, max_steps_by_budget=cap, derived=derived)
