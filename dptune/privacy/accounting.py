"""Privacy accounting for DP-SGD, on top of Google's ``dp_accounting``.

This module does no mathematics of its own: every ε comes from a
``dp_accounting`` accountant applied to the event that describes DP-SGD as the
trainer runs it,

    SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), T),

i.e. T steps, each of which includes every example independently with
probability q (Poisson sampling) and adds Gaussian noise of standard deviation
σ·C to a sum of gradients clipped to L2 norm C (add-or-remove-one adjacency).
The trainer's sampler (``dptune.data.sampling``) implements exactly that sampling.

Answers are cached: a study asks the same questions many times, and a PLD
calibration costs seconds. No JAX here.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.mechanism_calibration import ExplicitBracketInterval
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from dp_accounting.rdp import rdp_privacy_accountant as rdp_conversion
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from dptune.choices import Accountant
from dptune.errors import PrivacyError


class _ExcludedOrders(logging.Filter):
    """Drops dp-accounting's "failed to converge … Excluding this order" lines, and only those.

    The RDP accountant logs one for every Rényi order whose series does not converge; it then
    leaves that order out, which is sound, and nobody can act on the line. Logging is otherwise
    left as the application configured it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


logging.getLogger("absl").addFilter(_ExcludedOrders())

ACCOUNTANTS: tuple[str, ...] = tuple(c.value for c in Accountant)
DEFAULT_ACCOUNTANT = Accountant.PLD.value

@dataclass(frozen=True)
class PrivacySpend:
    """The guarantee of one DP-SGD run, with everything needed to recompute it."""

    epsilon: float
    delta: float
    sampling_rate: float
    noise_multiplier: float
    steps: int
    accountant: str

    def as_dict(self) -> dict:
        return asdict(self)


# PLD with a coarser (pessimistic) discretisation over-states ε slightly (≤ ~0.3%
# here) and is ~10× faster. Calibrations search with it, then every answer is
# checked with the default accountant, which is the one that reports ε.
_COARSE_PLD_INTERVAL = 1e-3

# The largest target ε dptune accepts. At ε = 100 an adversary's odds may
# change by a factor e^100 ≈ 10^43: the guarantee no longer protects anything,
# while the accounting of ever larger ε costs memory and time without bound.
MAX_EPSILON = 100.0
EPSILON_TOO_LARGE = "beyond it the guarantee protects nothing (e^100 ≈ 10^43) and accounting costs grow without bound"

# Above this ε the PLD accountant is not run. Its grid spans the privacy-loss
# range in steps of its discretisation interval, so its memory and time grow
# with ε (ε = 1e5 asks for hundreds of GiB). There the RDP bound, cheap at any
# ε and also a valid upper bound, is reported instead. At twice MAX_EPSILON no
# budget dptune accepts depends on the difference.
PLD_LIMIT = 2 * MAX_EPSILON
# A few Rényi orders give a quick upper bound that decides how PLD runs.
_SCREEN_ORDERS = (1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
# Up to this ε (where tight accounting matters) PLD runs at its own interval;
# above, the interval grows in proportion to ε, which keeps the grid's size,
# and the relative over-estimate of the pessimistic discretisation, about constant.
_FULL_RESOLUTION_EPSILON = 10.0


def bound_dropped_orders(orders: np.ndarray, rdp: np.ndarray) -> np.ndarray:
    """An RDP curve whose orders without a value (inf) take the smallest value found at a higher order.

    Rényi divergence does not decrease with the order, so a bound at order β
    bounds every order below it: the result is an upper bound wherever
    ``rdp`` was one, and never below it.
    """
    out = np.array(rdp, dtype=np.float64)
    best = math.inf
    for i in np.argsort(orders)[::-1]:
        if math.isfinite(out[i]):
            best = min(best, float(out[i]))
        else:
            out[i] = best
    return out


class FilledRdpAccountant(RdpAccountant):
    """dp-accounting's RDP accountant, keeping the orders it drops for an event as bounds from higher orders.

    dp-accounting leaves out an order whose series fails to converge for an
    event (e.g. orders 1.1–1.9 of DP-SGD at q = 0.2, σ = 1.36) by setting it to
    infinity. In a composition that order is then lost for every event, and
    a mix (small-σ proxies with a final run) keeps only high orders, which
    overstates ε several-fold. Here each event's missing orders are bounded
    by :func:`bound_dropped_orders` before the events add up; orders
    dp-accounting computes are unchanged.
    """

    def _maybe_compose(self, event: dp_event.DpEvent, count: int, do_compose: bool):
        nested = (dp_event.ComposedDpEvent, dp_event.SelfComposedDpEvent, dp_event.RepeatAndSelectDpEvent)
        if not do_compose or isinstance(event, nested):
            return super()._maybe_compose(event, count, do_compose)
        alone = RdpAccountant(self.orders, self.neighboring_relation)
        error = alone._maybe_compose(event, count, True)
        if error is None:
            self._rdp = self.rdp + bound_dropped_orders(self.orders, alone.rdp)
        return error


class BoundedPLDAccountant(PrivacyAccountant):
    """The PLD accountant with its cost bounded at any ε.

    Events are only recorded by ``compose``; ``get_epsilon`` first bounds ε
    with a cheap RDP computation, then runs PLD at a discretisation interval
    scaled to that bound, or, above :data:`PLD_LIMIT`, returns the RDP bound.
    Every answer is a valid upper bound on ε (the discretisation is pessimistic).
    """

    def __init__(self, value_discretization_interval: float = 1e-4):
        super().__init__(NeighboringRelation.ADD_OR_REMOVE_ONE)
        self._interval = value_discretization_interval

    def _maybe_compose(self, event: dp_event.DpEvent, count: int, do_compose: bool):
        # What PLD supports, checked without composing; the ledger keeps the events.
        return PLDAccountant()._maybe_compose(event, count, False)

    def get_epsilon(self, target_delta: float) -> float:
        event = self.ledger
        # Orders dropped for one event would inflate the screen of a mix and skip PLD for no reason.
        screen = FilledRdpAccountant(orders=_SCREEN_ORDERS).compose(event).get_epsilon(target_delta)
        if screen > PLD_LIMIT:
            # The few screening orders may miss the best one: the full grid decides before PLD is given up.
            screen = min(screen, FilledRdpAccountant().compose(event).get_epsilon(target_delta))
            if screen > PLD_LIMIT:
                return screen
        interval = self._interval * max(1.0, screen / _FULL_RESOLUTION_EPSILON)
        return PLDAccountant(value_discretization_interval=interval).compose(event).get_epsilon(target_delta)


def make_accountant(name: str, coarse: bool = False) -> PrivacyAccountant:
    """A fresh accountant by name; ``pld`` is bounded in cost (:class:`BoundedPLDAccountant`)."""
    if name == "pld":
        return BoundedPLDAccountant(_COARSE_PLD_INTERVAL) if coarse else BoundedPLDAccountant()
    if name == "rdp":
        return RdpAccountant()
    raise PrivacyError(f"accountant: unknown {name!r}; allowed: {', '.join(ACCOUNTANTS)}")


_accountant = make_accountant  # inside functions whose argument ``accountant`` hides a module-level name


@functools.lru_cache(maxsize=4096)
def _coarse_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str) -> float:
    if accountant != "pld":
        return epsilon(sampling_rate, noise_multiplier, steps, delta, accountant)
    if steps == 0:
        return 0.0
    acc = _accountant(accountant, coarse=True)
    acc.compose(dpsgd_event(sampling_rate, noise_multiplier, int(steps)))
    return float(acc.get_epsilon(delta))


def dpsgd_event(sampling_rate: float, noise_multiplier: float, steps: int) -> dp_event.DpEvent:
    """The ``DpEvent`` of ``steps`` Poisson-sampled Gaussian DP-SGD steps."""
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier)),
        steps,
    )


def validate(
    *,
    sampling_rate: float | None = None,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    delta: float | None = None,
    epsilon: float | None = None,
    accountant: str | None = None,
) -> None:
    """Raise :class:`PrivacyError` naming the first argument out of range."""
    if sampling_rate is not None and not (0.0 < sampling_rate <= 1.0):
        raise PrivacyError(f"sampling_rate: must be in (0, 1], got {sampling_rate}")
    if noise_multiplier is not None and not (noise_multiplier >= 0.0 and math.isfinite(noise_multiplier)):
        raise PrivacyError(f"noise_multiplier: must be a finite number >= 0, got {noise_multiplier}")
    if steps is not None and (int(steps) != steps or steps < 0):
        raise PrivacyError(f"steps: must be an integer >= 0, got {steps}")
    if delta is not None and not (0.0 < delta < 1.0):
        raise PrivacyError(f"delta: must be in (0, 1), got {delta}")
    if epsilon is not None and not (epsilon > 0.0 and math.isfinite(epsilon)):
        raise PrivacyError(f"epsilon: must be a finite number > 0, got {epsilon}")
    if epsilon is not None and epsilon > MAX_EPSILON:
        raise PrivacyError(f"epsilon: {epsilon:g} is above the maximum {MAX_EPSILON:g}: {EPSILON_TOO_LARGE}")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant: unknown {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")


@functools.lru_cache(maxsize=4096)
def epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """ε of ``steps`` DP-SGD steps at Poisson rate q and noise multiplier σ.

    Zero steps spend nothing (ε = 0); σ = 0 with at least one step is not
    private (ε = ∞).
    """
    validate(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=steps,
             delta=delta, accountant=accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    acc = _accountant(accountant)
    acc.compose(dpsgd_event(sampling_rate, noise_multiplier, int(steps)))
    return float(acc.get_epsilon(delta))


def spend(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> PrivacySpend:
    """:func:`epsilon` wrapped with the parameters that produced it."""
    return PrivacySpend(
        epsilon=epsilon(sampling_rate, noise_multiplier, steps, delta, accountant),
        delta=delta,
        sampling_rate=sampling_rate,
        noise_multiplier=noise_multiplier,
        steps=int(steps),
        accountant=accountant,
    )


@functools.lru_cache(maxsize=1024)
def noise_for_epsilon(
    sampling_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
) -> float:
    """A σ, at most ~0.5% above the smallest, such that ``steps`` steps at rate q spend ≤ target ε.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (which guarantees ε ≤ target
    for the accountant it searches with). For PLD the search runs on a coarser,
    pessimistic PLD bracketed by the fast RDP answer, and the result is checked
    with the default PLD accountant; a failed check falls back to a full search.
    """
    validate(sampling_rate=sampling_rate, steps=steps, delta=delta, epsilon=target_epsilon,
             accountant=accountant)
    if steps == 0:
        return 0.0

    def make_event(sigma: float) -> dp_event.DpEvent:
        return dpsgd_event(sampling_rate, sigma, int(steps))

    def calibrate(coarse: bool, bracket=None) -> float:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant, coarse), make_event, target_epsilon, delta,
            bracket_interval=bracket, tol=1e-4,
        ))

    if accountant != "pld":
        return calibrate(False)
    upper = noise_for_epsilon(sampling_rate, steps, target_epsilon, delta, "rdp")
    # PLD is tighter than RDP, so its σ lies below the RDP one; the margin covers
    # discretisation. The bracket is checked, not assumed.
    lo, hi = upper * 0.5, upper * 1.02
    bracket = None
    if _coarse_epsilon(sampling_rate, hi, steps, delta, "pld") <= target_epsilon < _coarse_epsilon(
        sampling_rate, lo, steps, delta, "pld"
    ):
        bracket = ExplicitBracketInterval(lo, hi)
    sigma = calibrate(True, bracket)
    if epsilon(sampling_rate, sigma, steps, delta, "pld") <= target_epsilon:
        return sigma
    return calibrate(False)


@functools.lru_cache(maxsize=4096)
def max_steps(
    sampling_rate: float,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    limit: int | None = None,
) -> int:
    """Largest T with ε(q, σ, T, δ) ≤ target ε, capped at ``limit`` if given.

    Returns 0 when even one step exceeds the budget. The answer is exact for the
    reporting accountant: a fast (for PLD: coarse, pessimistic) search gives a
    feasible T, and a bisection with the reporting accountant moves it to the
    largest feasible T.
    """
    validate(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, delta=delta,
             epsilon=target_epsilon, accountant=accountant)
    if limit is not None and limit < 0:
        raise PrivacyError(f"limit: must be >= 0, got {limit}")

    def eps(t: int) -> float:
        return epsilon(sampling_rate, noise_multiplier, int(t), delta, accountant)

    if noise_multiplier == 0.0 or eps(1) > target_epsilon:
        return 0
    if limit is not None and eps(limit) <= target_epsilon:
        return int(limit)
    upper = limit
    if upper is None:
        upper = 2
        while eps(upper) <= target_epsilon:
            if upper > 2**40:
                raise PrivacyError("steps: the budget allows practically unlimited steps; set a limit")
            upper *= 4
    # eps(upper) > target from here on.
    guess = int(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant, coarse=True),
        lambda s: dpsgd_event(sampling_rate, noise_multiplier, int(s)),
        target_epsilon, delta,
        bracket_interval=ExplicitBracketInterval(1, upper),
        discrete=True,
    ))
    lo, hi = 1, upper  # invariant: eps(lo) <= target < eps(hi)
    guess = min(max(guess, 1), upper - 1)
    if eps(guess) <= target_epsilon:
        lo = guess
        step = max(1, guess // 200)
        while lo + step < hi and eps(lo + step) <= target_epsilon:
            lo, step = lo + step, step * 2
        hi = min(hi, lo + step)
    else:
        hi = guess
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def epsilon_curve(sampling_rate: float, noise_multiplier: float, delta: float) -> Callable[[int], float]:
    """ε after t steps of DP-SGD(q, σ) at ``delta``, for watching a run: one RDP computation, then cheap.

    The RDP of one step is computed once; t steps compose to t times it, converted at the best order.
    An upper bound (RDP), for progress reports: the run's own figure comes from its accountant.
    """
    one = FilledRdpAccountant()
    one.compose(dpsgd_event(sampling_rate, noise_multiplier, 1))
    orders, rdp = np.asarray(one.orders, np.float64), np.asarray(one.rdp, np.float64)

    def at(steps: int) -> float:
        if steps <= 0:
            return 0.0
        return float(rdp_conversion.compute_epsilon(orders, steps * rdp, delta)[0])

    return at


def default_delta(dataset_size: int) -> float:
    """A δ well below 1/N: the largest power of ten at most 1/(10·N)."""
    if dataset_size <= 0:
        raise PrivacyError(f"dataset_size: must be > 0, got {dataset_size}")
    return 10.0 ** math.floor(math.log10(1.0 / (10.0 * dataset_size)))


def check_delta(delta: float, dataset_size: int) -> None:
    """Refuse δ ≥ 1/N: such a δ allows releasing a whole example outright."""
    validate(delta=delta)
    if delta >= 1.0 / dataset_size:
        raise PrivacyError(
            f"delta: {delta:g} is not below 1/N = {1.0 / dataset_size:.3g} (N = {dataset_size}); "
            "a mechanism may then publish an entire training example with probability δ. "
            f"Use δ ≤ {default_delta(dataset_size):g}"
        )
