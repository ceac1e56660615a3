"""The privacy calculator: ε, σ, steps and the cost of a search from the public quantities (``dptune privacy``).

Each function checks its inputs, applies the default δ (a power of ten below
1/(10N)) when none is given, and returns one row per accountant, so that the
command line only renders them. No JAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dptune.errors import PrivacyError
from dptune.privacy import accounting
from dptune.privacy.search_totals import TrialCount, naive_epsilon, noise_for_search, search_epsilon
from dptune.privacy.statement import Mechanism, Statement

__all__ = ["Table", "epsilon_table", "noise_table", "steps_table", "search_table"]


@dataclass(frozen=True)
class Table:
    """Rows of one calculation (one per accountant) and whether δ was the default."""

    rows: list[dict[str, Any]]
    delta: float
    delta_is_default: bool
    statement: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"results": self.rows, "delta_is_default": self.delta_is_default}
        if self.statement is not None:
            out["statement"] = self.statement
        return out


def _setup(dataset_size: int, batch_size: int, delta: float | None, accountant: str,
           noise_multiplier: float | None = None, epsilon: float | None = None
           ) -> tuple[float, float, bool, list[str]]:
    if batch_size > dataset_size:
        raise PrivacyError(f"batch_size: {batch_size} exceeds dataset_size {dataset_size}")
    q = batch_size / dataset_size
    delta_default = delta is None
    d = accounting.default_delta(dataset_size) if delta is None else delta
    accounting.check_delta(d, dataset_size)
    if accountant == "all":
        accountants = list(accounting.ACCOUNTANTS)
    else:
        accounting.validate(accountant=accountant)
        accountants = [accountant]
    if noise_multiplier is not None:
        accounting.validate(noise_multiplier=noise_multiplier)
    if epsilon is not None:
        accounting.validate(epsilon=epsilon)
    return q, d, delta_default, accountants


def _steps(q: float, steps: int | None, epochs: float | None) -> int:
    if (steps is None) == (epochs is None):
        raise PrivacyError("steps: give exactly one of steps and epochs")
    if steps is not None:
        return steps
    assert epochs is not None
    if not (epochs > 0 and math.isfinite(epochs)):
        raise PrivacyError(f"epochs: must be a finite number > 0, got {epochs}")
    return math.ceil(epochs / q)


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    if any(r.get("accountant") == "pld" and (r.get("epsilon") or 0) > accounting.PLD_LIMIT for r in rows):
        return [f"Above ε = {accounting.PLD_LIMIT:g} the pld row shows the RDP bound (also valid): the PLD "
                "accountant's memory and time grow with ε."]
    return []


def epsilon_table(dataset_size: int, batch_size: int, noise_multiplier: float, *, steps: int | None = None,
                  epochs: float | None = None, delta: float | None = None, accountant: str = "pld",
                  statement: bool = False) -> Table:
    """ε of DP-SGD with Poisson sampling at q = B/N, σ and T steps (or E epochs: T = ⌈E/q⌉).

    Args:
      dataset_size: N. batch_size: the expected batch B. noise_multiplier: σ.
      steps, epochs: exactly one. delta: δ (default below 1/(10N)). accountant: pld, rdp or all.
      statement: also write the privacy statement of the first row.

    Returns:
      One row per accountant.

    Raises:
      PrivacyError: a value out of range (the message names it).

    Guarantee: each ε is an upper bound for (ε, δ)-DP of the stated mechanism
    (dp-accounting's PLD or RDP accountant).
    """
    q, d, d_default, accountants = _setup(dataset_size, batch_size, delta, accountant, noise_multiplier)
    t = _steps(q, steps, epochs)
    rows: list[dict[str, Any]] = [
        dict(accountant=a, epsilon=accounting.epsilon(q, noise_multiplier, t, d, a), delta=d, sampling_rate=q,
                 noise_multiplier=noise_multiplier, steps=t, epochs=t * q) for a in accountants]
    text = None
    if statement:
        text = Statement(epsilon=rows[0]["epsilon"], delta=d, accountant=rows[0]["accountant"],
                         dataset_size=dataset_size, mechanism=Mechanism(q, noise_multiplier, t)).text()
    return Table(rows, d, d_default, text, _notes(rows))


def noise_table(dataset_size: int, batch_size: int, epsilon: float, *, steps: int | None = None,
                epochs: float | None = None, delta: float | None = None, accountant: str = "pld") -> Table:
    """The smallest σ whose T steps spend at most ε (calibrated by dp-accounting; ε ≤ target guaranteed).

    Raises:
      PrivacyError: a value out of range, or a budget no σ meets.
    """
    q, d, d_default, accountants = _setup(dataset_size, batch_size, delta, accountant, epsilon=epsilon)
    t = _steps(q, steps, epochs)
    rows = []
    for a in accountants:
        sigma = accounting.noise_for_epsilon(q, t, epsilon, d, a)
        rows.append(dict(accountant=a, noise_multiplier=sigma, epsilon=accounting.epsilon(q, sigma, t, d, a),
                         target_epsilon=epsilon, delta=d, sampling_rate=q, steps=t, epochs=t * q))
    return Table(rows, d, d_default, None, _notes(rows))


def steps_table(dataset_size: int, batch_size: int, noise_multiplier: float, epsilon: float, *,
                delta: float | None = None, accountant: str = "pld") -> Table:
    """The most steps at σ that spend at most ε.

    Raises:
      PrivacyError: a value out of range.
    """
    q, d, d_default, accountants = _setup(dataset_size, batch_size, delta, accountant, noise_multiplier, epsilon)
    rows = []
    for a in accountants:
        t = accounting.max_steps(q, noise_multiplier, epsilon, d, a)
        rows.append(dict(accountant=a, steps=t, epochs=t * q, epsilon=accounting.epsilon(q, noise_multiplier, t, d, a),
                         target_epsilon=epsilon, delta=d, sampling_rate=q, noise_multiplier=noise_multiplier))
    return Table(rows, d, d_default, None, _notes(rows))


def search_table(dataset_size: int, batch_size: int, count: TrialCount, *, noise_multiplier: float | None = None,
                 total_epsilon: float | None = None, steps: int | None = None, epochs: float | None = None,
                 delta: float | None = None) -> Table:
    """ε of a private search (Papernot & Steinke 2022: a random number of trials, the best released) beside
    naive composition of its expected number of trials; or σ for a total ε.

    Raises:
      PrivacyError: a value out of range, or not exactly one of ``noise_multiplier`` and ``total_epsilon``.

    Guarantee: ``search_epsilon`` bounds releasing the best of K ~ ``count`` trials of the mechanism (RDP).
    """
    q, d, d_default, _ = _setup(dataset_size, batch_size, delta, "rdp", noise_multiplier)
    t = _steps(q, steps, epochs)
    if (noise_multiplier is None) == (total_epsilon is None):
        raise PrivacyError("noise_multiplier: give exactly one of --noise-multiplier and --total-epsilon")
    if total_epsilon is not None:
        accounting.validate(epsilon=total_epsilon)
        sigma = noise_for_search(q, t, total_epsilon, d, count)
    else:
        assert noise_multiplier is not None
        sigma = noise_multiplier
    expected = math.ceil(count.mean)
    row = dict(distribution=count.distribution, mean_trials=count.mean, eta=count.eta, noise_multiplier=sigma,
               single_trial_epsilon=accounting.epsilon(q, sigma, t, d, "rdp"),
               search_epsilon=search_epsilon(q, sigma, t, d, count),
               naive_composition_epsilon=naive_epsilon(q, sigma, t, d, expected),
               naive_trials=expected, delta=d, sampling_rate=q, steps=t, accountant="rdp")
    return Table([row], d, d_default)
