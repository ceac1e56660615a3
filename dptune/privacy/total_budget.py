"""A total privacy budget planned before the search: tuning included, fixed in advance. No JAX here.

A study that states ``privacy: {total_epsilon: ε}`` is planned at create, before
any run reads the data, as three parts that follow each other and add up by
basic composition (δ split evenly over the parts):

* **Tuning**: K proxies, each the same DP-SGD mechanism (q, σ_p, T) on one
  secret Poisson subset of the training split (each example in it independently
  with probability γ). Whatever the proxies choose while watching (learning
  rate, clip norm, pruning), each is dominated by that one mechanism, so their
  adaptive composition is the PLD composition of K copies (Zhu, Dong & Wang
  2022): (ε', δ_part/γ)-DP on the subset, amplified by the subsampling to
  log(1 + γ(e^ε' − 1)) at δ_part for the whole data (Balle, Barthe & Gaboardi
  2018). σ_p is the smallest σ (bisection with dp-accounting) that keeps the
  tuning within ``tuning_share``·ε.
* **Final run**: one DP-SGD run (q, σ_f, T) on all of the data, σ_f the
  smallest σ that keeps the whole within ε (PLD, one fixed mechanism).
* **Prior**: a private initial checkpoint's recorded training (RDP), if any.

:func:`plan_total` computes the plan; :func:`verified` recomputes its parts
from the stored mechanisms alone (the guarantee states that, never the stored
figures); a
total too small for a useful plan raises :class:`BudgetTooSmall` with the
smallest total that works.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting import dp_event

from dptune.errors import PrivacyError
from dptune.privacy import accounting as privacy
from dptune.privacy.mechanism import Mechanism
from dptune.privacy.search_totals import amplified_by_subset, composed_epsilon

# Past this σ a run is noise with a little signal: a plan that needs more for a proxy or the final run is refused.
MAX_NOISE_MULTIPLIER = 30.0
DEFAULT_TUNING_SHARE = 0.15
DEFAULT_PROXIES = 8
DEFAULT_FRACTION = 0.2
ACCOUNTANT = "pld"


class BudgetTooSmall(PrivacyError):
    """A total that leaves no useful plan; ``smallest`` is the smallest total that would work."""

    def __init__(self, message: str, smallest: float):
        self.smallest = smallest
        super().__init__(message)


@dataclass(frozen=True)
class Shape:
    """What the plan fixes before it calibrates: the runs' rate and length, K, γ, the split, δ, the prior runs."""

    sampling_rate: float
    steps: int
    proxies: int
    fraction: float
    tuning_share: float
    delta: float
    prior: tuple[Mechanism, ...] = ()

    @property
    def parts(self) -> int:
        return 3 if [m for m in self.prior if m.steps > 0] else 2

    @property
    def part_delta(self) -> float:
        return self.delta / self.parts


def _proxies_event(shape: Shape, sigma: float) -> dp_event.DpEvent:
    one = privacy.dpsgd_event(shape.sampling_rate, sigma, shape.steps)
    return dp_event.SelfComposedDpEvent(one, shape.proxies)


def _pld(event: dp_event.DpEvent, delta: float) -> float:
    return float(privacy.make_accountant(ACCOUNTANT).compose(event).get_epsilon(delta))


def tuning_epsilon(shape: Shape, sigma: float) -> dict[str, float]:
    """The tuning's ε on the subset (at δ_part/γ) and, amplified, for the whole data (at δ_part)."""
    inner = _pld(_proxies_event(shape, sigma), shape.part_delta / shape.fraction)
    outer, _ = amplified_by_subset(inner, shape.part_delta / shape.fraction, shape.fraction)
    return {"tuning_on_subset": inner, "tuning": outer}


def final_epsilon(shape: Shape, sigma: float) -> float:
    return _pld(privacy.dpsgd_event(shape.sampling_rate, sigma, shape.steps), shape.part_delta)


def prior_epsilon(shape: Shape) -> float:
    ran = [m for m in shape.prior if m.steps > 0]
    return composed_epsilon(ran, shape.part_delta)["rdp"] if ran else 0.0


def plan_epsilon(shape: Shape, proxy_sigma: float, final_sigma: float) -> dict[str, float]:
    """Every part's ε and their sum: what releasing the final run costs, K proxies and the prior included."""
    parts = {**tuning_epsilon(shape, proxy_sigma), "final": final_epsilon(shape, final_sigma),
             "prior": prior_epsilon(shape)}
    return {**parts, "total": parts["tuning"] + parts["final"] + parts["prior"]}


def _calibrate(event_of: Any, target: float, delta: float) -> float:
    """The smallest σ (bisection, tolerance 1e-4) whose event spends at most ``target`` at ``delta``."""
    return float(dp_accounting.calibrate_dp_mechanism(lambda: privacy.make_accountant(ACCOUNTANT), event_of,
                                                      target, delta, tol=1e-4))


def smallest_total(shape: Shape) -> float:
    """The smallest total whose plan needs no σ above :data:`MAX_NOISE_MULTIPLIER` (rounded up)."""
    tuning = tuning_epsilon(shape, MAX_NOISE_MULTIPLIER)["tuning"]
    final = final_epsilon(shape, MAX_NOISE_MULTIPLIER) + prior_epsilon(shape)
    need = max(tuning / shape.tuning_share, final / (1 - shape.tuning_share)) * 1.001
    return math.ceil(need * 100) / 100


def plan_total(total_epsilon: float, shape: Shape) -> dict[str, Any]:
    """The plan of a search under a total ε: σ of the proxies and of the final run, and every part's ε.

    Raises:
      BudgetTooSmall: the proxies or the final run would need σ above :data:`MAX_NOISE_MULTIPLIER`, or the
        prior training leaves nothing.
    """
    privacy.validate(sampling_rate=shape.sampling_rate, steps=shape.steps, delta=shape.delta,
                     epsilon=total_epsilon)
    prior = prior_epsilon(shape)
    tuning_target = shape.tuning_share * total_epsilon
    # The tuning's cap on the subset whose amplification is the tuning's share (inverse of Balle et al.'s bound).
    inner_target = math.log1p(math.expm1(tuning_target) / shape.fraction)
    ok = total_epsilon - prior > 0 and tuning_epsilon(shape, MAX_NOISE_MULTIPLIER)["tuning"] <= tuning_target
    if ok:
        proxy_sigma = _calibrate(lambda s: _proxies_event(shape, s), inner_target, shape.part_delta / shape.fraction)
        left = total_epsilon - tuning_epsilon(shape, proxy_sigma)["tuning"] - prior
        ok = left > 0 and final_epsilon(shape, MAX_NOISE_MULTIPLIER) <= left
    if not ok:
        smallest = smallest_total(shape)
        raise BudgetTooSmall(f"{total_epsilon:g} leaves no useful plan: {shape.proxies} proxies and a final run of "
                             f"{shape.steps} steps at q = {shape.sampling_rate:.4g} would need σ above "
                             f"{MAX_NOISE_MULTIPLIER:g}; the smallest total that works is {smallest:g}", smallest)
    final_sigma = _calibrate(lambda s: privacy.dpsgd_event(shape.sampling_rate, s, shape.steps), left,
                             shape.part_delta)
    parts = plan_epsilon(shape, proxy_sigma, final_sigma)
    if parts["total"] > total_epsilon:  # calibration guarantees each part; this is the sum's own check
        raise PrivacyError(f"total_epsilon: the plan composes to {parts['total']:.6g} > {total_epsilon:g}")
    return {"total_epsilon": total_epsilon, "delta": shape.delta, "part_delta": shape.part_delta,
            "tuning_share": shape.tuning_share, "proxies": shape.proxies, "fraction": shape.fraction,
            "sampling_rate": shape.sampling_rate, "steps": shape.steps, "proxy_noise_multiplier": proxy_sigma,
            "final_noise_multiplier": final_sigma, "accountant": ACCOUNTANT, "parts": parts}


def verified(plan: Mapping[str, Any], prior: Sequence[Mechanism], delta: float | None) -> dict[str, float]:
    """Every part's ε recomputed from the stored plan's mechanisms and the study's recorded prior runs.

    The stated total is what the plan's mechanisms cost, not what the record says they cost: a plan written by
    another version, edited or mismatched with the study's δ or prior training is caught here.

    Raises:
      PrivacyError: the record's δ is not the plan's, or the recomputed parts compose to more than the total.
    """
    if delta is None or not math.isclose(float(plan["delta"]), delta):
        raise PrivacyError(f"the study's δ {delta} is not its plan's {plan['delta']}")
    key = (float(plan["sampling_rate"]), int(plan["steps"]), int(plan["proxies"]), float(plan["fraction"]),
           float(plan["tuning_share"]), float(plan["delta"]), tuple(tuple(m) for m in prior),
           float(plan["proxy_noise_multiplier"]), float(plan["final_noise_multiplier"]))
    parts = _recomputed(key)
    if parts["total"] > float(plan["total_epsilon"]) * (1 + 1e-9):
        raise PrivacyError(f"the plan's mechanisms compose to ε = {parts['total']:.6g}, more than its total "
                           f"{plan['total_epsilon']:g}")
    return parts


@functools.lru_cache(maxsize=32)
def _recomputed(key: tuple) -> dict[str, float]:
    q, steps, proxies, fraction, share, delta, prior, proxy_sigma, final_sigma = key
    shape = Shape(q, steps, proxies, fraction, share, delta, tuple(Mechanism(*m) for m in prior))
    return plan_epsilon(shape, proxy_sigma, final_sigma)


def shape_of(plan: dict[str, Any], prior: Sequence[Mechanism] = ()) -> Shape:
    """The shape a stored plan was computed for (with the study's recorded prior runs)."""
    return Shape(float(plan["sampling_rate"]), int(plan["steps"]), int(plan["proxies"]), float(plan["fraction"]),
                 float(plan["tuning_share"]), float(plan["delta"]), tuple(prior))


def proxy_mechanism(plan: Mapping[str, Any]) -> Mechanism:
    return Mechanism(float(plan["sampling_rate"]), float(plan["proxy_noise_multiplier"]), int(plan["steps"]))


def final_mechanism(plan: Mapping[str, Any]) -> Mechanism:
    return Mechanism(float(plan["sampling_rate"]), float(plan["final_noise_multiplier"]), int(plan["steps"]))
