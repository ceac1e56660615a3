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
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from dptune import privacy
from dptune.config import Choice, Range, SearchSpace, TrainingBudget
from dptune.errors import ConfigError, DptuneError
from dptune.train import Hyperparams, PrivacyBudget

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
        return {
            **{k: v for k, v in asdict(self.hparams).items()},
            "sampling_rate": self.sampling_rate,
            "planned_steps": self.steps,
            "planned_epochs": self.epochs,
            "max_steps_by_budget": self.max_steps_by_budget,
            "derived": self.derived,
        }


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
