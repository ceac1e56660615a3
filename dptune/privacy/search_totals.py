"""The privacy cost of a hyperparameter search, not only of one trial.

Releasing the best of several models trained on the same private data leaks
more than any one of them. Two guarantees are computed here, both with
``dp_accounting`` (no JAX):

* **Ordinary studies** (a fixed or time-limited number of trials, adaptive
  samplers such as TPE, pruning): the released model is covered by the
  composition of *every* trial that touched the training data, each at what it
  spent. :func:`composed_epsilon` composes them with the RDP accountant, whose
  composition stays valid when each trial's hyperparameters are chosen from
  the results of earlier ones (adaptive composition); a PLD figure is also
  given, which holds only if the trials had been fixed in advance. Orders
  that dp-accounting drops for one trial (its series fails to converge) are
  bounded from the next order up
  (:class:`dptune.privacy.accounting.FilledRdpAccountant`), so that a mix of
  very different trials keeps the low orders it needs.

* **Private search** (Papernot & Steinke 2022, "Hyperparameter Tuning with
  Renyi Differential Privacy", ICLR): run a *random* number K of trials, K drawn
  from a fixed distribution independently of the data, each with
  hyperparameters drawn independently from a fixed distribution, and release
  only the best. dp-accounting implements the bound as
  ``RepeatAndSelectDpEvent(event, mean, shape)`` for its RDP accountant, where
  every trial must be dominated by ``event``. dptune makes every trial run
  exactly ``event`` (same q, σ, steps), so that holds by construction.

Distributions of K (``shape`` in dp-accounting's terms): Poisson(μ) (shape ∞;
K = 0 is possible and then nothing is released), truncated negative binomial
with η > 0 (shape η), geometric (η = 1) and logarithmic (η = 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant, compute_epsilon
from scipy import optimize, special

from dptune.choices import TrialDistribution
from dptune.errors import PrivacyError
from dptune.privacy import accounting as privacy
from dptune.privacy.mechanism import Mechanism, MechanismLike

Distribution = TrialDistribution
DISTRIBUTIONS: tuple[str, ...] = tuple(c.value for c in TrialDistribution)


@dataclass(frozen=True)
class TrialCount:
    """The distribution of the number of trials K, with mean ``mean``."""

    distribution: Distribution
    mean: float
    eta: float | None = None

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise PrivacyError(f"distribution: unknown {self.distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        if not (self.mean > 0 and math.isfinite(self.mean)):
            raise PrivacyError(f"mean_trials: must be a finite number > 0, got {self.mean}")
        if self.distribution == "truncated_negative_binomial":
            if self.eta is None or not (self.eta > 0 and math.isfinite(self.eta)):
                raise PrivacyError(f"eta: truncated_negative_binomial needs eta > 0, got {self.eta}")
        elif self.eta is not None:
            raise PrivacyError(f"eta: only for truncated_negative_binomial, not {self.distribution}")
        if self.distribution != "poisson" and self.mean <= 1:
            raise PrivacyError(f"mean_trials: must exceed 1 for {self.distribution} (K ≥ 1), got {self.mean}")

    @property
    def shape(self) -> float:
        """dp-accounting's ``shape`` parameter."""
        shape = {"poisson": math.inf, "geometric": 1.0, "logarithmic": 0.0}.get(self.distribution, self.eta)
        assert shape is not None  # η is required of the truncated negative binomial (checked on construction)
        return shape

    @functools.cached_property
    def gamma(self) -> float:
        """γ of the truncated negative binomial D_{η,γ} with this mean (not for Poisson)."""
        eta = self.shape

        def mean_of(g: float) -> float:
            if eta == 0:
                return (1 - g) / (g * math.log(1 / g))
            return eta * (1 - g) / (g * (1 - g**eta))

        return float(optimize.brentq(lambda g: mean_of(g) - self.mean, 1e-12, 1 - 1e-12, xtol=1e-14))

    def pmf(self, k: int) -> float:
        """P[K = k]."""
        if self.distribution == "poisson":
            return float(math.exp(-self.mean + k * math.log(self.mean) - math.lgamma(k + 1)))
        if k < 1:
            return 0.0
        g, eta = self.gamma, self.shape
        if eta == 0:
            return (1 - g) ** k / (k * math.log(1 / g))
        # (1-γ)^k / (γ^{-η} - 1) · Γ(k+η) / (Γ(η) k!)
        log_coef = special.gammaln(k + eta) - special.gammaln(eta) - special.gammaln(k + 1)
        return float(math.exp(k * math.log1p(-g) + log_coef) / (g ** (-eta) - 1))

    def sample(self, rng: np.random.Generator) -> int:
        """Draw K (independently of any data)."""
        if self.distribution == "poisson":
            return int(rng.poisson(self.mean))
        g, eta = self.gamma, self.shape
        if eta == 0:
            return int(rng.logseries(1 - g))
        while True:  # a negative binomial conditioned on K ≥ 1
            k = int(rng.negative_binomial(eta, g))
            if k >= 1:
                return k


def repeat_and_select_event(trial: dp_event.DpEvent, count: TrialCount) -> dp_event.DpEvent:
    return dp_event.RepeatAndSelectDpEvent(trial, count.mean, count.shape)


def search_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float,
                   count: TrialCount, prior: Iterable[Mechanism] = ()) -> float:
    """ε of a private search whose every trial is DP-SGD(q, σ, T) (RDP accountant).

    ``prior``: earlier DP-SGD runs (q, σ, T) on the same data, e.g. the
    training of a private initial checkpoint, composed with the search.
    """
    privacy.validate(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=steps, delta=delta)
    trial = privacy.dpsgd_event(sampling_rate, noise_multiplier, steps)
    events = [repeat_and_select_event(trial, count)] + [privacy.dpsgd_event(q, s, int(t)) for q, s, t in prior]
    event = events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)
    return float(RdpAccountant().compose(event).get_epsilon(delta))


def noise_for_search(sampling_rate: float, steps: int, total_epsilon: float, delta: float,
                     count: TrialCount, prior: Iterable[Mechanism] = ()) -> float:
    """The σ every trial needs so that the whole search (with ``prior`` runs composed) spends ≤ ``total_epsilon``."""
    privacy.validate(sampling_rate=sampling_rate, steps=steps, delta=delta, epsilon=total_epsilon)
    before = [privacy.dpsgd_event(q, s, int(t)) for q, s, t in prior]

    def event(sigma: float) -> dp_event.DpEvent:
        search = repeat_and_select_event(privacy.dpsgd_event(sampling_rate, sigma, steps), count)
        return dp_event.ComposedDpEvent([search, *before]) if before else search

    return float(dp_accounting.calibrate_dp_mechanism(RdpAccountant, event, total_epsilon, delta, tol=1e-4))


def naive_epsilon(sampling_rate: float, noise_multiplier: float, steps: int, delta: float, trials: int,
                  accountant: str = "rdp") -> float:
    """ε of composing ``trials`` identical trials (what releasing all of them costs)."""
    event = dp_event.SelfComposedDpEvent(privacy.dpsgd_event(sampling_rate, noise_multiplier, steps), trials)
    acc = RdpAccountant() if accountant == "rdp" else privacy.make_accountant("pld")
    return float(acc.compose(event).get_epsilon(delta))


def composed_epsilon(trials: Iterable[MechanismLike], delta: float) -> dict[str, float]:
    """ε of all trials that touched the data (their mechanisms), composed.

    ``rdp`` holds under adaptive choice of the trials (the guarantee dptune
    reports); ``pld`` is tighter but assumes the trials were fixed in advance.
    Cached: a study's summary, note and report ask for the same composition.
    """
    return dict(_composed(tuple(Mechanism.of(m) for m in trials), delta))


@functools.lru_cache(maxsize=64)
def _composed(trials: tuple[Mechanism, ...], delta: float) -> tuple[tuple[str, float], ...]:
    return tuple(_compose(trials, delta).items())


def _compose(trials: tuple[Mechanism, ...], delta: float) -> dict[str, float]:
    events = [privacy.dpsgd_event(q, s, int(t)) for q, s, t in trials if t > 0]
    if not events:
        return {"rdp": 0.0, "pld": 0.0}
    if any(s == 0 for q, s, t in trials if t > 0):
        return {"rdp": math.inf, "pld": math.inf}
    composed = dp_event.ComposedDpEvent(events)
    return {
        "rdp": float(privacy.FilledRdpAccountant().compose(composed).get_epsilon(delta)),
        "pld": float(privacy.make_accountant("pld").compose(composed).get_epsilon(delta)),
    }


def amplified_by_subset(epsilon: float, delta: float, fraction: float) -> tuple[float, float]:
    """(ε, δ) of a mechanism run on a Poisson subset of the data, from its (ε, δ) on the subset.

    Amplification by Poisson subsampling under add-or-remove adjacency (Li,
    Qardaji & Su 2012; Balle, Barthe & Gaboardi 2018, "Privacy Amplification by
    Subsampling: Tight Analyses via Couplings and Divergences"; Steinke 2022,
    "Composition of Differential Privacy & Privacy Amplification by
    Subsampling", §6): if M is (ε', δ')-DP and every example
    joins the subset independently with probability γ, secretly, then M run on
    the subset is (log(1 + γ(e^ε' − 1)), γδ')-DP for the whole data. M may be
    any (adaptive, interactive) procedure that reads the data only through the
    subset — here the whole tuning phase of a study.

    Args:
      epsilon: ε' of the mechanism on the subset (may be inf).
      delta: δ' of the mechanism on the subset.
      fraction: γ, the probability with which each example is in the subset.

    Returns:
      (ε, δ) for the whole data.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if math.isinf(epsilon):
        return math.inf, fraction * delta
    return math.log1p(fraction * math.expm1(epsilon)), fraction * delta


def subset_tuning_epsilon(cap: RenyiFilter, rest: Iterable[Mechanism], fraction: float,
                          delta: float, before: Iterable[Mechanism] = ()) -> dict[str, float]:
    """ε of tuning on one secret Poisson subset under a cap fixed in advance, then training on all of the data.

    Every tuning run read the same subset, each example in it independently
    with probability γ = ``fraction``, and was admitted by ``cap``, a Rényi
    filter fixed before any of them ran: whatever the tuning chose while
    watching (how many runs, which, when to stop), it is (ε', δ_k)-DP on the
    subset with ε' the cap at δ_k (:meth:`RenyiFilter.cap_at`). Amplification
    by subsampling (:func:`amplified_by_subset`) needs exactly that, an ε'
    fixed in advance, and gives (ε_tuning, γδ_k) for the whole data. An ε'
    read off the runs after the fact would not do: it depends on what they saw.
    The runs on all of the data after the tuning (``rest``: the final run) are
    composed with RDP at δ_k (PLD when only one run), and runs *before* the
    tuning (``before``: a private initial checkpoint's training) likewise as a
    part of their own. The parts follow each other adaptively and add up by
    basic composition: the total is (Σ ε, δ) at most, with δ split evenly,
    δ_k = δ/k over the k parts.

    Guarantee: valid only when every tuning run read the one subset and was
    admitted by ``cap`` before it read anything, the subset was chosen with
    randomness independent of the data and of anything published (or stored
    where others may read it), and the tuning read the data only through the
    subset (runs on all of the data are in ``rest``).

    Returns:
      ``{"tuning_cap_on_subset", "tuning", "before", "rest", "total"}`` (the ε of each part and of the whole).
    """
    rest = tuple(Mechanism.of(r) for r in rest if r[2] > 0)
    before = tuple(Mechanism.of(b) for b in before if b[2] > 0)
    share = delta / (3 if before else 2)

    def part(runs: tuple[Mechanism, ...]) -> float:
        eps = composed_epsilon(runs, share)
        return eps["pld"] if len(runs) == 1 else eps["rdp"]

    inner = cap.cap_at(share)
    outer, _ = amplified_by_subset(inner, share, fraction)
    first, after = (part(before) if before else 0.0), part(rest)
    return {"tuning_cap_on_subset": inner, "tuning": outer, "before": first, "rest": after,
            "total": first + outer + after}


def default_filter_order(epsilon: float, delta: float) -> float:
    """A Rényi order for a filter capped at (ε, δ), fixed from public values before any trial runs.

    For a composition of Gaussian mechanisms whose total reaches ε at δ, the
    order that gives the smallest ε is close to 1 + 2·ln(1/δ)/ε; subsampled
    Gaussians behave alike at these orders.
    """
    return 1.0 + 2.0 * math.log(1.0 / delta) / epsilon


@dataclass(frozen=True)
class RenyiFilter:
    """A privacy filter over DP-SGD trials at one Rényi order (Feldman & Zrnic 2021).

    Guarantee: if every trial is admitted only when :meth:`admits` holds for
    the trials admitted so far plus itself, each with its (q, σ, T) fixed
    before it runs, the whole adaptive sequence — trial choices, count and
    early stopping included — is (α, ρ)-RDP with a ρ whose conversion is ε at
    δ, hence (ε, δ)-DP. The order is fixed in advance: choosing the best order
    after the fact is only valid for a composition fixed in advance.
    """

    epsilon: float
    delta: float
    order: float

    def spent(self, trials: Iterable[Mechanism]) -> float:
        """ε at δ of the trials (q, σ, T), by the single-order RDP conversion of this filter."""
        events = [privacy.dpsgd_event(q, s, int(t)) for q, s, t in trials if t > 0]
        if not events:
            return 0.0
        if any(s == 0 for q, s, t in trials if t > 0):
            return math.inf
        # The next integer order is always computed: where dp-accounting's series fails at a fractional
        # order, it bounds it (Rényi divergence grows with the order); the conversion stays at this order.
        acc = privacy.FilledRdpAccountant(orders=[self.order, math.floor(self.order) + 1.0])
        rdp = acc.compose(dp_event.ComposedDpEvent(events)).rdp[0]
        return float(compute_epsilon([self.order], [rdp], self.delta)[0])

    def cap_at(self, delta: float) -> float:
        """The largest ε at ``delta`` of any trials this filter admits (at its own δ, that is its cap).

        Admitted means a Rényi divergence at the filter's order of at most
        the ρ whose conversion at the filter's δ is the cap; this converts
        that ρ at ``delta``. Fixed in advance like the cap itself.
        """
        a = self.order
        if a <= 1.01:  # dp-accounting converts nothing at these orders: the filter admits (almost) nothing
            return math.inf
        # compute_epsilon's conversion ε = ρ + log(1 − 1/α) − log(δα)/(α − 1), solved for ρ; below the
        # KL threshold every ρ converts to 0.
        rho = max(self.epsilon - math.log1p(-1 / a) + math.log(self.delta * a) / (a - 1),
                  -math.log1p(-self.delta ** 2))
        return float(compute_epsilon([a], [rho], delta)[0])

    def admits(self, trials: Iterable[Mechanism]) -> bool:
        """Whether these trials together stay within the cap."""
        return self.spent(trials) <= self.epsilon
