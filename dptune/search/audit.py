"""Privacy auditing in one training run: an empirical lower bound on ε beside the claimed ε.

Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1) Training
Run": put m canaries next to the training data, include each independently
with probability ½, train once, and let an attack guess which canaries were
included. If the mechanism is (ε, δ)-DP, the number of correct guesses among r
guesses is stochastically dominated by Binomial(r, e^ε/(1+e^ε)) (plus a δ
term), so many correct guesses reject small ε; the largest ε rejected at 95%
confidence is a *lower bound* on the true ε of what ran. It must never exceed
the claim; when it does, the implementation is not as private as it says.
The statistics come from ``jax_privacy.auditing.CanaryScoreAuditor`` (the
one-run bound with a Bonferroni correction over thresholds, the f-DP variant of
Mahloujifar et al. 2024, TPR at low FPR, AUROC); :func:`one_run_bound` and
:func:`max_lower_bound` are written here because the library has no "best any
attack could show with m canaries" figure.

Two threat models, both through the real training path
(:func:`dptune.trainer.train.train_and_evaluate` → :func:`dptune.trainer.train.train_step` →
:mod:`dptune.trainer.dp_step`):

* **white-box** — Dirac gradient canaries. Canary i is a per-example gradient
  along one parameter coordinate c_i of raw norm ``DIRAC_SCALE``·C (100·C); dptune's
  clipping function (:func:`dptune.trainer.dp_step.clipped_sum`, sharded over the same
  devices and summed across them with the same ``psum``) brings it to norm C and
  the term joins the real clipped sum of the step *before* the noise. The real
  examples of the batch go through the configured clipping path (book-keeping
  or vmap). The adversary observes every noisy update; it scores canary i by
  the sum over steps of the update's component along −c_i (the sum telescopes
  to θ₀[c_i] − θ_T[c_i]).
  What it cannot see: a bug confined to the book-keeping path's own
  per-example norms (the canaries use the vmap path's clipping function; the
  book-keeping path is checked against it in tests/test_bookkeeping.py), and
  fixed-size batches accounted as Poisson (the two differ only in δ-scale
  tails and worst-case datasets that a sum attack with m ≤ 1000 canaries
  cannot reach; :mod:`dptune.faults` can inject it, tests show it changes the
  sampling, no audit here detects it).
* **black-box** — input-space canaries: out-of-distribution images (uniform
  noise from a public seed) with random labels, added to the training split; the
  score is minus the released model's loss on each canary.

Sampling — why the audit tests the accounted mechanism. The accountant
describes each example joining each step independently with probability q
(Poisson). An included canary must therefore join each step exactly like an
example: in both threat models the included canaries are members of the sampled
population, drawn by the same secret Poisson sampler in the same call
(:func:`dptune.data.sampling.poisson_batch` over N + k members). A canary present in
every step would audit a different (q = 1) mechanism, whose ε is far larger,
and the comparison with the claim would be meaningless. White-box: the real
examples keep q = B/N, the canaries get the same q, and the claim is ε(q, σ, T).
Black-box: the canaries are training examples, so the training set has
N' = N + k examples and q' = B/N'; the claim is the accountant's ε for what ran
(q', σ, T), as :func:`dptune.trainer.train.train_and_evaluate` computes it from the
real training-set size.

Secrets. Which canaries are included is drawn from a secret stream
(``SecretSeed.child("audit inclusion")`` of the run's full-entropy secret), the
same kind of randomness that picks batches and noise; the canaries themselves
(coordinates, images, labels) come from a public seed: the adversary may know
them, only the inclusion bits are what it guesses.

The audit trains on the private data with the trial's mechanism: for a study
it is one more trial of the search (:func:`audit_study` records it in the study
so every total counts it, and refuses it when a ``search_budget`` filter would
be exceeded or in a private search, whose bound would break).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

from dptune import faults
from dptune.choices import ThreatModel
from dptune.data.datasets import Dataset
from dptune.errors import ConfigError, PrivacyError
from dptune.models import checkpoint, freezing
from dptune.models.builtin import build_model
from dptune.privacy.mechanism import Mechanism
from dptune.progress import Reporter
from dptune.randomness import SecretSeed
from dptune.search import record
from dptune.search.record import StudyRecord
from dptune.trainer import dp_step
from dptune.trainer.run import check_model
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, TrainResult, train_and_evaluate

THREAT_MODELS: tuple[str, ...] = tuple(c.value for c in ThreatModel)
BLACK_BOX_MAX = 10_000  # black-box canaries allowed beyond the training-set size
DEFAULT_CANARIES = 1000
DEFAULT_CONFIDENCE = 0.95
LOW_FPR = 0.01
# Raw Dirac canaries are this many times C: clipping brings them to C (so the correct mechanism sees the same
# canary whatever the scale), while a path that skipped clipping would let them stand out of the data's gradients.
DIRAC_SCALE = 100.0
_CHUNK = 64  # canary gradients per compiled call (fixed shape)

Progress = Callable[[str], None]


# -- statistics ------------------------------------------------------------------

def one_run_p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[≥ ``correct`` right among ``guesses``] under (ε, δ)-DP with m canaries (Steinke et al. 2023, Thm. 5.2).

    β = P[Binomial(r, p) ≥ v] with p = e^ε/(1+e^ε), plus the δ term
    2mδ · max_{1≤i≤v} (P[Binomial(r, p) ≥ v − i] − β)/i.

    Args:
      m: canaries in the audit.
      guesses: r, canaries guessed "in".
      correct: v, of those truly included.
      epsilon: the ε of the null hypothesis.
      delta: its δ.

    Returns:
      The p-value (capped at 1).
    """
    if guesses <= 0 or correct <= 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(scipy.stats.binom.sf(correct - 1, guesses, p))
    if delta == 0:
        return beta
    i = np.arange(1, correct + 1)
    tail = scipy.stats.binom.sf(correct - i - 1, guesses, p) - beta
    return min(1.0, beta + 2 * m * delta * float(np.max(tail / i)))


def one_run_bound(m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε whose (ε, δ) claim ``correct`` of ``guesses`` right guesses rejects at ``significance``.

    Args:
      m: canaries; guesses, correct: as in :func:`one_run_p_value`.
      delta: δ of the claims tested.
      significance: 1 − confidence.

    Returns:
      The lower bound on ε (0 when even ε = 0 is not rejected).
    """
    if one_run_p_value(m, guesses, correct, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, guesses, correct, hi, delta) <= significance:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, guesses, correct, mid, delta) <= significance:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-7:
            break
    return lo


def max_lower_bound(m: int, included: int, delta: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The largest lower bound any attack on this audit could print: a perfect attack's.

    A perfect attack guesses r ≤ ``included`` canaries, all rightly; the printed
    bound also pays a Bonferroni correction over thresholds, so the figure here
    (no correction, best r) is an upper limit on what an audit with m canaries
    can show. A lower bound far below it means "no leak found"; a small maximum
    means the audit had little power whatever the mechanism.

    Args:
      m: canaries; included: how many were included (the most right guesses).
      delta: δ of the claim; confidence: e.g. 0.95.

    Returns:
      The largest ε lower bound reachable.
    """
    significance = 1.0 - confidence
    best = 0.0
    for r in range(included, 0, -1):
        # With δ = 0 the p-value of r right out of r is p^r; its bound logit(α^{1/r}) caps the bound
        # with δ > 0 and shrinks with r, so the search can stop once it falls below the best.
        a = significance ** (1.0 / r)
        if math.log(a / (1.0 - a)) <= best:
            break
        best = max(best, one_run_bound(m, r, r, delta, significance))
    return best


@dataclass(frozen=True)
class AuditStatistics:
    """What the attack's scores show (scores: higher means "more likely included")."""

    epsilon_lower_bound: float
    epsilon_lower_bound_fdp: float
    tpr_at_low_fpr: float
    low_fpr: float
    auroc: float
    max_lower_bound: float
    canaries: int
    included: int
    confidence: float


def statistics(scores: np.ndarray, included: np.ndarray, delta: float,
               confidence: float = DEFAULT_CONFIDENCE, low_fpr: float = LOW_FPR) -> AuditStatistics:
    """One-run ε lower bounds (Steinke et al.; f-DP variant), TPR at ``low_fpr``, AUROC, and the maximum.

    Args:
      scores: one score per canary; higher means the attack thinks it was included.
      included: the secret inclusion bits.
      delta: δ of the claim audited.
      confidence: of the lower bounds (each separately).
      low_fpr: the false-positive rate at which TPR is reported.

    Returns:
      :class:`AuditStatistics`.

    Raises:
      ConfigError: fewer than one included or one excluded canary.
    """
    from jax_privacy.auditing import CanaryScoreAuditor

    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        # A diverged run gives no evidence for the canaries it lost: they rank lowest.
        finite = scores[np.isfinite(scores)]
        scores = np.where(np.isfinite(scores), scores, (finite.min() - 1.0) if finite.size else 0.0)
    included = np.asarray(included, dtype=bool)
    if included.all() or not included.any():
        raise ConfigError("canaries", f"need at least one included and one excluded canary "
                          f"({int(included.sum())} of {len(included)} included); use more canaries")
    auditor = CanaryScoreAuditor(scores[included], scores[~included])
    significance = 1.0 - confidence
    return AuditStatistics(
        epsilon_lower_bound=float(auditor.epsilon_one_run(significance, delta)),
        epsilon_lower_bound_fdp=float(auditor.epsilon_one_run_fdp(significance, delta)),
        tpr_at_low_fpr=float(auditor.tpr_at_given_fpr(low_fpr)),
        low_fpr=low_fpr,
        auroc=float(auditor.attack_auroc()),
        max_lower_bound=max_lower_bound(len(scores), int(included.sum()), delta, confidence),
        canaries=len(scores),
        included=int(included.sum()),
        confidence=confidence,
    )


# -- canaries ----------------------------------------------------------------------

def inclusion(secret: SecretSeed, m: int) -> np.ndarray:
    """The m secret inclusion bits, each 1 with probability ½, from the run's secret."""
    return secret.child("audit inclusion").sampler().random(m) < 0.5


class DiracCanaries:
    """White-box canaries as :func:`dptune.trainer.train.train_and_evaluate`'s ``audit`` hook.

    ``members`` included canaries join the sampled population (indices N … N+k−1
    of each Poisson draw); :meth:`add` puts the sampled ones' clipped Dirac
    gradients into the step's clipped sum before the noise; :meth:`observe`
    records the parameters along every canary's coordinate after each update.
    """

    def __init__(self, coords: np.ndarray, included: np.ndarray, clip_norm: float):
        self.coords = np.asarray(coords, dtype=np.int32)
        self.included = np.asarray(included, dtype=bool)
        self.member_coords = self.coords[self.included]
        self.members = int(self.included.sum())
        self.raw_norm = DIRAC_SCALE * clip_norm
        self.first: np.ndarray | None = None
        self.last: Any = None
        self.updates = 0
        self._sampled = np.zeros(0, dtype=np.int64)
        self._gather: Any = None

    def split(self, indices: np.ndarray, n: int, step: int) -> np.ndarray:
        """Keep the canaries of this step's Poisson draw; return the training examples' indices."""
        self._sampled = indices[indices >= n] - n
        return indices[indices < n]

    def add(self, fns: dp_step.StepFunctions, state: Any, acc: Any, step: int, clip_norm: float) -> Any:
        """``acc`` plus the clipped gradients of this step's sampled canaries (dptune's clipping, all devices)."""
        add, gather, chunk = _dirac_functions(fns, state.params)
        self._gather = gather
        if self.first is None:
            self.first = np.asarray(gather(state.params, self.coords), dtype=np.float64)
        sampled = self._sampled
        for start in range(0, len(sampled), chunk):
            part = sampled[start:start + chunk]
            coords = np.zeros(chunk, np.int32)
            coords[:len(part)] = self.member_coords[part]
            values = np.zeros(chunk, np.float32)
            values[:len(part)] = self.raw_norm
            mask = (np.arange(chunk) < len(part)).astype(np.float32)
            acc = add(acc, *fns.shard_batch(coords, values, mask), jnp.float32(clip_norm))
        return acc

    def observe(self, params: Any) -> None:
        """The adversary's view of one update: the parameters along every canary's coordinate."""
        self.last = self._gather(params, self.coords)
        self.updates += 1

    def scores(self) -> np.ndarray:
        """Σ_t −Δθ_t[c_i] for every canary (included or not): a Dirac gradient +C·e_c pushes θ[c] down."""
        if self.first is None or self.last is None:
            raise RuntimeError("no update was observed")
        return self.first - np.asarray(self.last, dtype=np.float64)


_DIRAC: dict[tuple[int, Any], tuple[Any, Any, int]] = {}


def _dirac_functions(fns: dp_step.StepFunctions, params: Any) -> tuple[Any, Any, int]:
    """(add, gather, chunk) compiled once per step functions and parameter layout, shared by every audit."""
    flat, unravel = ravel_pytree(params)
    layout = (jax.tree_util.tree_structure(params), tuple(p.shape for p in jax.tree_util.tree_leaves(params)))
    key = (id(fns), layout)
    if key not in _DIRAC:
        size = flat.size
        chunk = -(-_CHUNK // len(fns.devices)) * len(fns.devices)

        def local(coords: jax.Array, values: jax.Array, mask: jax.Array, clip: jax.Array) -> Any:
            rows = jnp.zeros((coords.shape[0], size), flat.dtype).at[jnp.arange(coords.shape[0]), coords].set(values)
            per_example = jax.vmap(unravel)(rows)
            return jax.lax.psum(dp_step.clipped_sum(per_example, mask, clip), "data")

        rep, batch = PartitionSpec(), PartitionSpec("data")
        summed = jax.shard_map(local, mesh=fns.mesh, in_specs=(batch, batch, batch, rep), out_specs=rep)

        def add(acc: Any, coords: jax.Array, values: jax.Array, mask: jax.Array, clip: jax.Array) -> Any:
            return jax.tree_util.tree_map(jnp.add, acc, summed(coords, values, mask, clip))

        gather = jax.jit(lambda p, coords: ravel_pytree(p)[0][coords])
        _DIRAC[key] = (jax.jit(add, out_shardings=fns.replicated), gather, chunk)
    return _DIRAC[key]


def dirac_coordinates(params: Any, trainable: str, m: int, seed: int) -> np.ndarray:
    """m distinct trainable parameter coordinates (flat indices), from a public seed."""
    leaf_mask = freezing.trainable_mask(params, trainable)
    mask, _ = ravel_pytree(jax.tree_util.tree_map(lambda p, k: jnp.full(p.shape, k), params, leaf_mask))
    candidates = np.flatnonzero(np.asarray(mask) > 0)
    if m > len(candidates):
        raise ConfigError("canaries", f"{m} white-box canaries need {m} trainable coordinates; the model has "
                          f"{len(candidates)}")
    return np.sort(np.random.default_rng([seed, 0xD1AC]).choice(candidates, size=m, replace=False))


def ood_canaries(image_shape: tuple[int, ...], num_classes: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """m black-box canaries: uniform-noise images in [-1, 1] with random labels, from a public seed."""
    rng = np.random.default_rng([seed, 0x0C0D])
    return (rng.uniform(-1.0, 1.0, size=(m, *image_shape)).astype(np.float32),
            rng.integers(0, num_classes, size=m).astype(np.int32))


class _WithCanaries:
    """The training split followed by the included canaries (already normalised images)."""

    def __init__(self, base: Any, images: np.ndarray, labels: np.ndarray):
        self.base, self.images, self.labels = base, images, labels

    def __len__(self) -> int:
        return len(self.base) + len(self.labels)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions)
        n = len(self.base)
        real = positions < n
        x = np.empty((len(positions), *self.images.shape[1:]), np.float32)
        y = np.empty(len(positions), np.int32)
        if real.any():
            x[real], y[real] = self.base.take(positions[real])
        x[~real], y[~real] = self.images[positions[~real] - n], self.labels[positions[~real] - n]
        return x, y


_LOSSES: dict[tuple[str, bool, int], Any] = {}


def _canary_losses(model_name: str, ws: bool, num_classes: int, params: Any,
                   images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    key = (model_name, ws, num_classes)
    if key not in _LOSSES:
        model = build_model(model_name, num_classes, weight_standardization=ws)
        _LOSSES[key] = jax.jit(lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y))
    losses = _LOSSES[key]
    # Fixed-size chunks (the last one padded) so that one compilation serves every audit.
    out = []
    for i in range(0, len(labels), 256):
        x, y = images[i:i + 256], labels[i:i + 256]
        pad = 256 - len(y)
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        y = np.concatenate([y, np.zeros(pad, y.dtype)]) if pad else y
        out.append(np.asarray(losses(params, x, y))[:256 - pad])
    return np.concatenate(out).astype(np.float64)


# -- the audit run -------------------------------------------------------------------

@dataclass
class AuditResult:
    """One audit: the claim, what the attack showed, and what ran."""

    threat_model: str
    claimed_epsilon: float
    delta: float
    accountant: str
    epsilon_lower_bound: float
    epsilon_lower_bound_fdp: float
    confidence: float
    canaries: int
    included: int
    tpr_at_low_fpr: float
    low_fpr: float
    auroc: float
    max_lower_bound: float
    steps: int
    sampling_rate: float
    noise_multiplier: float
    clip_norm: float
    batch_size: int
    training_examples: int
    clipping: str
    devices: int
    wall_seconds: float
    cpu_seconds: float
    fault: str | None = None
    study: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exceeds_claim(self) -> bool:
        """The (ε, δ) lower bound is above the claim: the mechanism that ran is not as private as claimed.

        The f-DP figure is not used here: it tests the claim that the trade-off
        curve is a Gaussian mechanism's with this (ε, δ), which DP-SGD with
        Poisson sampling (a mixture, not a Gaussian) need not satisfy even when
        its (ε, δ) claim holds.
        """
        return self.epsilon_lower_bound > self.claimed_epsilon

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exceeds_claim": self.exceeds_claim}

    def text(self) -> str:
        """A few lines for a person."""
        lines = [
            f"{self.threat_model} audit, {self.canaries} canaries ({self.included} included), "
            f"{self.steps} steps, q = {self.sampling_rate:.4g}, σ = {self.noise_multiplier:.4g}, "
            f"C = {self.clip_norm:g}, N = {self.training_examples}"
            + (f"  [TEST-ONLY FAULT: {self.fault}]" if self.fault else ""),
            f"claimed ε = {self.claimed_epsilon:.4g} at δ = {self.delta:g} ({self.accountant})",
            f"empirical lower bound ({self.confidence:.0%} confidence): ε ≥ {self.epsilon_lower_bound:.4g} "
            f"(Steinke et al. 2023), ε ≥ {self.epsilon_lower_bound_fdp:.4g} (f-DP, Mahloujifar et al. 2024)",
            f"attack: TPR {self.tpr_at_low_fpr:.3f} at FPR {self.low_fpr:g}, AUROC {self.auroc:.3f}",
            f"largest lower bound {self.canaries} canaries could show (a perfect attack): {self.max_lower_bound:.4g}",
        ]
        if self.exceeds_claim:
            lines.append("VIOLATION: the lower bound exceeds the claimed ε — what ran is not as private as claimed.")
        elif self.claimed_epsilon >= self.max_lower_bound:
            lines.append(f"No violation found, but this audit could not have shown one: {self.canaries} canaries "
                         f"show at most ε ≈ {self.max_lower_bound:.3g} < the claim; use more canaries.")
        else:
            lines.append("No violation found: the lower bound stays at or below the claimed ε.")
        lines += self.notes
        return "\n".join(lines)


def check_request(threat_model: str, canaries: int, confidence: float, num_examples: int) -> None:
    """Refuse an audit that cannot run, from its arguments alone (before anything is recorded or read).

    Raises:
      ConfigError: unknown threat model, m < 2, black-box canaries more than the training examples and
        :data:`BLACK_BOX_MAX` (they join the training split, in memory), confidence outside (0, 1).
    """
    if threat_model not in THREAT_MODELS:
        raise ConfigError("threat_model", f"unknown {threat_model!r}; allowed: {', '.join(THREAT_MODELS)}")
    if canaries < 2:
        raise ConfigError("canaries", f"must be >= 2, got {canaries}")
    most = max(num_examples, BLACK_BOX_MAX)
    if threat_model == "black-box" and canaries > most:
        # They are inputs held in memory and trained on beside the training examples.
        raise ConfigError("canaries", f"black-box canaries join the {num_examples} training examples; at most "
                                      f"{most:,}, got {canaries:,}")
    if not 0 < confidence < 1:
        raise ConfigError("confidence", f"must be in (0, 1), got {confidence}")


def white_box_room(model_name: str, num_classes: int, image_shape: tuple[int, ...], trainable: str,
                   canaries: int, canary_seed: int, *, weight_standardization: bool = False) -> None:
    """Refuse more white-box canaries than the model has trainable coordinates (a public fact of the model)."""
    from dptune.models.builtin import init_params

    model = build_model(model_name, num_classes, weight_standardization=weight_standardization)
    dirac_coordinates(init_params(model, image_shape, jax.random.key(0)), trainable, canaries, canary_seed)


def run_audit(
    dataset: Dataset,
    hparams: Hyperparams,
    steps: int,
    *,
    config: RunConfig,
    budget: PrivacyBudget,
    threat_model: str = "white-box",
    canaries: int = DEFAULT_CANARIES,
    canary_seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    progress: Progress | None = None,
    training: Callable[[], None] = lambda: None,
    events: Reporter | None = None,
) -> AuditResult:
    r"""Train once with m canaries through the real training path and audit the claim.

    Guarantee: the run is itself a DP-SGD run on ``dataset.train`` with the
    given mechanism (ε reported as ``claimed_epsilon``, computed for the
    training-set size and rate that really ran), so it costs that much privacy
    on the data; the canary inclusion bits are drawn from the run's secret.
    The returned lower bound holds with probability ≥ ``confidence`` over that
    secret inclusion, whatever the data: it is evidence, not a guarantee, and
    a bound above the claim means the implementation that ran is broken.

    Args:
      dataset: the data (its training split is the private data).
      hparams: the configuration audited.
      steps: steps to run (capped by ``budget`` like any run).
      config: as for :func:`dptune.trainer.train.train_and_evaluate` (must be private).
      budget: the (ε, δ) cap; δ is also the δ of the audited claim.
      threat_model: "white-box" (Dirac gradient canaries) or "black-box" (input canaries).
      canaries: m.
      canary_seed: public seed of the canaries' content (not of their inclusion).
      confidence: of the lower bound.
      progress: called with a line of text now and then.
      training: called once every refusal is past, just before the training data is first read.
      events: receives the audit run's :class:`dptune.progress.Event`\ s (steps, validations).

    Returns:
      :class:`AuditResult`.

    Raises:
      ConfigError: unknown threat model, m < 2, confidence outside (0, 1), non-private config.
      PrivacyError: as :func:`dptune.trainer.train.train_and_evaluate`.
    """
    config, included = _secret_run(dataset, hparams, steps, config, threat_model, canaries, canary_seed, confidence)
    say = progress or (lambda _line: None)
    planted = _plant(dataset, hparams, config, threat_model, included, canary_seed)
    n = len(planted.data.train)
    say(f"auditing ({threat_model}): {canaries} canaries, each included with probability ½ (secret); "
        f"training {steps} steps on N = {n} examples")

    def report(step: int, metrics: dict[str, float]) -> None:
        say(f"  step {step}/{steps}  val_acc {metrics['val_accuracy']:.4f}")

    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    training()
    result, scores = _train_and_score(planted, hparams, steps, config, budget, report, events)
    say("computing the lower bound")
    stats = statistics(scores, included, budget.delta, confidence)
    return _audit_result(result, stats, dataset, hparams, budget, threat_model, canaries, confidence, n,
                         white_box=planted.hook is not None, wall0=wall0, cpu0=cpu0)


def _secret_run(dataset: Dataset, hparams: Hyperparams, steps: int, config: RunConfig, threat_model: str,
                canaries: int, canary_seed: int, confidence: float) -> tuple[RunConfig, np.ndarray]:
    """The run's configuration and the secret inclusion bits, after every refusal that reads no data.

    Raises:
      ConfigError: as :func:`run_audit`, or when every canary fell on one side.
    """
    check_request(threat_model, canaries, confidence, len(dataset.train))
    if not config.private:
        raise ConfigError("private", "a non-private run claims no ε; there is nothing to audit")
    secret = config.secret or _audit_secret(config, dataset, hparams, steps, threat_model, canaries, canary_seed)
    # Canaries and faults hook into the microbatch loop (dptune.trainer.train.train_step); the compiled feeds
    # equal it to float tolerance (tests/test_feed.py). Forced here for both threat models: the
    # black-box canary wrapper is not an in-memory split a feed could copy.
    config = replace(config, secret=secret, save_checkpoint=None, feed="loop")
    included = inclusion(secret, canaries)
    if included.all() or not included.any():
        raise ConfigError("canaries", f"all {canaries} canaries fell on one side; use more canaries")
    return config, included


@dataclass
class _Planted:
    """The canaries where the run meets them: a gradient hook (white-box) or the training split (black-box)."""

    data: Dataset
    hook: DiracCanaries | None = None
    images: np.ndarray | None = None
    labels: np.ndarray | None = None


def _plant(dataset: Dataset, hparams: Hyperparams, config: RunConfig, threat_model: str, included: np.ndarray,
           canary_seed: int) -> _Planted:
    """The canaries of ``threat_model`` (their content public from ``canary_seed``), the included ones planted."""
    from dptune.models.builtin import init_params

    canaries = len(included)
    model = build_model(config.model, dataset.num_classes, weight_standardization=config.weight_standardization)
    params0 = init_params(model, dataset.image_shape, jax.random.key(config.seed))
    if threat_model == "white-box":
        coords = dirac_coordinates(params0, hparams.trainable, canaries, canary_seed)
        return _Planted(dataset, hook=DiracCanaries(coords, included, hparams.clip_norm))
    images, labels = ood_canaries(dataset.image_shape, dataset.num_classes, canaries, canary_seed)
    data = replace(dataset, train=_WithCanaries(dataset.train, images[included], labels[included]))
    return _Planted(data, images=images, labels=labels)


def _train_and_score(planted: _Planted, hparams: Hyperparams, steps: int, config: RunConfig, budget: PrivacyBudget,
                     report: Callable[[int, dict[str, float]], None],
                     events: Reporter | None) -> tuple[TrainResult, np.ndarray]:
    """Train once with the canaries planted; the attack's score of each canary (higher: guessed included)."""
    with tempfile.TemporaryDirectory(prefix="dptune-audit-") as tmp:
        if planted.hook is None:  # black-box: the attack sees only the released model
            config = replace(config, save_checkpoint=os.path.join(tmp, "released.msgpack"))
        result = train_and_evaluate(planted.data, hparams, steps, config=config, budget=budget, callback=report,
                                    audit=planted.hook, progress=events)
        if planted.hook is not None:
            return result, planted.hook.scores()
        assert config.save_checkpoint is not None and planted.images is not None and planted.labels is not None
        released = checkpoint.load(config.save_checkpoint)
        return result, -_canary_losses(config.model, config.weight_standardization, planted.data.num_classes,
                                       released, planted.images, planted.labels)


def _audit_result(result: TrainResult, stats: AuditStatistics, dataset: Dataset, hparams: Hyperparams,
                  budget: PrivacyBudget, threat_model: str, canaries: int, confidence: float, n: int, *,
                  white_box: bool, wall0: float, cpu0: float) -> AuditResult:
    """The claim that ran beside what the attack showed; the times are since ``wall0``/``cpu0``."""
    assert result.privacy is not None
    notes = [f"This audit trained on {dataset.name}'s training split: it spent ε = {result.privacy.epsilon:.4g} "
             f"(δ = {budget.delta:g}) on that data, which any total over it must count."]
    if white_box:
        notes.append("White-box canaries enter through dptune's clipping function and cross-device sum; the "
                     f"training examples through the {result.clipping} path.")
    notes.append(f"The audit ran on the {result.feed!r} feed (one dispatch per microbatch); trials and `dptune train` "
                 "take `feed: auto` (this loop on CPU, the resident or streamed feed on accelerators), which "
                 "tests/test_feed.py shows equal to it within 1e-6.")
    return AuditResult(
        threat_model=threat_model, claimed_epsilon=float(result.privacy.epsilon), delta=budget.delta,
        accountant=result.privacy.accountant,
        epsilon_lower_bound=stats.epsilon_lower_bound, epsilon_lower_bound_fdp=stats.epsilon_lower_bound_fdp,
        confidence=confidence, canaries=canaries, included=stats.included,
        tpr_at_low_fpr=stats.tpr_at_low_fpr, low_fpr=stats.low_fpr, auroc=stats.auroc,
        max_lower_bound=stats.max_lower_bound, steps=result.steps, sampling_rate=result.privacy.sampling_rate,
        noise_multiplier=result.privacy.noise_multiplier, clip_norm=hparams.clip_norm,
        batch_size=hparams.batch_size, training_examples=n, clipping=result.clipping, devices=result.devices,
        wall_seconds=time.perf_counter() - wall0, cpu_seconds=_cpu_seconds() - cpu0, fault=faults.active(),
        notes=notes,
    )


def _audit_secret(config: RunConfig, dataset: Dataset, hparams: Hyperparams, steps: int, threat_model: str,
                  canaries: int, canary_seed: int) -> SecretSeed:
    """The OS's secret, or a fixed seed keyed on the audit it serves, as a run's is
    (:func:`dptune.trainer.train.run_secret`: settings, data, code): one seed never runs two audits alike.

    Raises:
      ConfigError: a fixed seed on a dataset read record by record (not hashed), or on code without a file.
    """
    from dptune.data.datasets import RecordSplit
    from dptune.trainer import train as trainer

    if config.private_seed is None:
        return SecretSeed.from_os()
    if isinstance(dataset.train, RecordSplit):
        raise ConfigError("private_seed", f"a fixed seed needs data whose content dptune hashes, and "
                                          f"{dataset.name!r} is read record by record; leave private_seed unset")
    settings = trainer._public_settings(dataset, hparams, steps, config, None, trainer._devices(config))
    run = trainer.run_secret(config, settings)
    what = json.dumps([threat_model, canaries, canary_seed])
    return run.child("audit " + hashlib.sha256(what.encode()).hexdigest())


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- auditing a study's trial ----------------------------------------------------------

def _released_final(study: Any, trials: list[Any], mode: dict[str, Any]) -> Any:
    """A mode study's final run: what it releases, hence what an audit of the study must re-run."""
    from dptune.search import modes

    final = modes.final_trial(trials)
    if final is None:
        raise ConfigError("trial", f"study {study.study_name!r} (search mode {mode['mode']}) is not finalized: it "
                          "releases nothing yet; run dptune study finalize, then audit its final run")
    return final


def _pick_trial(study: Any, number: int | None) -> Any:
    from optuna.trial import TrialState

    from dptune.search import modes

    trials = study.get_trials(deepcopy=False)
    mode = StudyRecord.of(study).search_mode
    if number is None and mode is not None:
        return _released_final(study, trials, mode)
    if number is None:
        done = [t for t in trials if t.state == TrialState.COMPLETE and not record.is_audit(t)]
        if not done:
            raise ConfigError("trial", f"study {study.study_name!r} has no completed trial to audit")
        return max(done, key=lambda t: t.value)
    match = [t for t in trials if t.number == number]
    if not match:
        raise ConfigError("trial", f"study {study.study_name!r} has no trial {number} "
                          f"(trials 0 … {len(trials) - 1})")
    t = match[0]
    if record.is_audit(t):
        raise ConfigError("trial", f"trial {number} is itself an audit (of trial {record.get(t, record.AUDIT_OF)})")
    if mode is not None and modes.is_proxy(t):
        # A proxy ran another mechanism than its hyperparameters say on the private data (public data, a subset,
        # or B/k of a batch planned elsewhere): re-run there, its q could even exceed 1.
        raise ConfigError("trial", f"trial {number} is a proxy of search mode {mode['mode']}, not a run this study "
                          "releases; leave --trial out to audit the final run")
    if not record.get(t, record.STEPS) or not record.has(t, record.SAMPLING_RATE):
        raise ConfigError("trial", f"trial {number} did not train (state {t.state.name}); pick one that ran")
    return t


def audit_run(
    dataset: str = "mnist5k",
    *,
    data_dir: str | None = None,
    model: str = "cnn",
    batch_size: int | None = None,
    learning_rate: float = 2.0,
    clip_norm: float = 1.0,
    noise_multiplier: float | None = None,
    epsilon: float = 3.0,
    delta: float | None = None,
    accountant: str = "pld",
    steps: int | None = None,
    epochs: float | None = None,
    optimizer: str = "momentum",
    momentum: float = 0.9,
    microbatch_size: int = 256,
    clipping: str = "auto",
    devices: int | None = None,
    seed: int = 0,
    private_seed: int | None = None,
    **audit: Any,
) -> AuditResult:
    """Audit one run of explicit hyperparameters (``dptune audit`` without ``--study-name``).

    The run is planned as ``dptune train`` plans it: δ defaults below 1/N and is checked; σ,
    when not given, is calibrated so that the steps (``steps``, or ``epochs`` at q = B/N; default
    one epoch) spend ``epsilon``; the run stops at that budget. ``batch_size`` defaults to
    min(256, N).

    Args:
      dataset, data_dir, model: what trains.
      batch_size, learning_rate, clip_norm, noise_multiplier, steps, epochs, optimizer, momentum: the run.
      epsilon, delta, accountant: the budget the run is claimed to meet.
      microbatch_size, clipping, devices, seed, private_seed: as for a trial.
      **audit: ``threat_model``, ``canaries``, ``canary_seed``, ``confidence``, ``progress`` (:func:`run_audit`).

    Returns:
      The audit: the claimed ε beside the lower bound measured on the run.

    Raises:
      PrivacyError: a value out of range, or both ``steps`` and ``epochs``.
      DataError: the dataset cannot be read.
    """
    from dptune.data.datasets import load_dataset
    from dptune.privacy import accounting

    data = load_dataset(dataset, data_dir=data_dir, seed=seed)
    if ":" in model:
        from dptune.config.schema import run_settings

        check_model(run_settings({"model": model, "dataset": dataset, "clipping": clipping}), data)
    n = len(data.train)
    batch = batch_size if batch_size is not None else min(256, n)
    if not 1 <= batch <= n:
        raise PrivacyError(f"batch_size: must be in [1, {n}] (the training-set size), got {batch}")
    q = batch / n
    if steps is not None and epochs is not None:
        raise PrivacyError("steps: give --steps or --epochs, not both")
    if steps is None:
        e = 1.0 if epochs is None else epochs
        if not (e > 0 and math.isfinite(e)):
            raise PrivacyError(f"epochs: must be a finite number > 0, got {e}")
        steps = math.ceil(e / q)
    accounting.validate(epsilon=epsilon, accountant=accountant)
    d = accounting.default_delta(n) if delta is None else delta
    accounting.check_delta(d, n)
    sigma = noise_multiplier
    if sigma is None:
        sigma = accounting.noise_for_epsilon(q, steps, epsilon, d, accountant)
    hp = Hyperparams(batch_size=batch, learning_rate=learning_rate, clip_norm=clip_norm, noise_multiplier=sigma,
                     optimizer=optimizer, momentum=momentum)
    config = RunConfig(model=model, microbatch_size=microbatch_size, clipping=clipping,
                       eval_every=max(1, steps // 5), seed=seed, private_seed=private_seed, num_devices=devices)
    return run_audit(data, hp, steps, config=config,
                     budget=PrivacyBudget(epsilon, d, "pld" if accountant == "pld" else "rdp"), **audit)


def audit_study(
    study_name: str,
    storage: str | None = None,
    trial_number: int | None = None,
    *,
    threat_model: str = "white-box",
    canaries: int = DEFAULT_CANARIES,
    canary_seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    progress: Progress | None = None,
    events: Reporter | None = None,
) -> AuditResult:
    """Audit a study's trial (default: the best) by re-running its configuration with canaries.

    The audit run trains on the study's private data with the trial's
    mechanism, so it is recorded in the study as one more trial (state PRUNED,
    attribute ``audit_of``; it never becomes the best trial): every search
    total (:func:`dptune.search.results.search_guarantee`) composes it like any trial
    that touched the data. With a ``search_budget`` the privacy filter must
    admit it first, exactly as a trial; a private search (repeat-and-select
    over a secret number of trials) is refused, because one more run on the
    data voids its bound.

    Args:
      study_name, storage: the study.
      trial_number: the trial to audit; None for the best completed one (with a search mode: the final run).
      threat_model, canaries, canary_seed, confidence, progress, events: as :func:`run_audit`.

    Returns:
      :class:`AuditResult` with ``study`` filled in (the search's ε before and after).

    Raises:
      StudyError: no such study.
      ConfigError: no such trial, or one that did not train; a non-private study; a mode study's proxy, or one
        not finalized yet.
      PrivacyError: a private search, or the filter refuses the run.
    """
    from optuna.trial import TrialState

    from dptune.search import orphans, release
    from dptune.search import study as study_lib
    from dptune.search.regimes import study_guarantee
    from dptune.trainer.run import dataset_of

    s, resolved = study_lib.load(study_name, storage)
    cfg = resolved.study
    rec = StudyRecord.of(s)
    regime = _auditable(s, rec)
    orphans.reap_dead_workers(s)
    target = _pick_trial(s, trial_number)
    hp = Hyperparams(**record.hparams_of(target, Hyperparams.__dataclass_fields__))
    steps = int(record.get(target, record.STEPS))
    dataset = dataset_of(cfg)
    check_model(cfg, dataset)  # a user's model is checked again: its code may have changed since create
    delta = float(cast(float, rec.delta))
    before = study_guarantee(s)
    budget = PrivacyBudget(float(record.get(target, record.EPSILON_TARGET, 100.0)), delta,
                           "pld" if record.get(target, record.ACCOUNTANT) == "pld" else "rdp")
    check_request(threat_model, canaries, confidence, len(dataset.train))
    if threat_model == "white-box":
        white_box_room(cfg.model, dataset.num_classes, dataset.image_shape, hp.trainable, canaries, canary_seed,
                       weight_standardization=cfg.weight_standardization)
    q = hp.batch_size / len(dataset.train)
    # Black-box canaries enlarge N, so the run's q is at most this: a conservative request.
    trial_rec = _admitted(s, regime, target.number, threat_model, Mechanism(q, hp.noise_multiplier, steps))
    config = _audit_config(cfg, target, steps, f"study {study_name} {release.study_id(s, storage)} audit "
                                               f"{trial_rec.number}")
    record.set_all(trial_rec, record.audit_plan_attrs(q, hp.noise_multiplier, steps, hp.clip_norm, hp.batch_size))
    try:
        result = run_audit(dataset, hp, steps, config=config, budget=budget, threat_model=threat_model,
                           canaries=canaries, canary_seed=canary_seed, confidence=confidence, progress=progress,
                           training=lambda: trial_rec.set_user_attr(record.TOUCHED_DATA, True), events=events)
    except BaseException as e:
        # Once it has read the data it stays counted at its planned steps; a refusal before that costs nothing.
        trial_rec.set_user_attr(record.FAILED_REASON, f"{type(e).__name__}: {e}".strip())
        s.tell(trial_rec, state=TrialState.FAIL)
        raise
    return _recorded(s, study_name, target.number, trial_rec, result, before)


def _auditable(s: Any, rec: StudyRecord) -> Any:
    """The study's regime, if an audit run may be added to it.

    Raises:
      ConfigError: a non-private study (it claims no ε to audit).
      PrivacyError: a private search or a total budget (one more run on the data voids its bound), or a test-only
        fault is active.
    """
    from dptune.search.regimes import TotalBudget, regime_of

    regime = regime_of(rec)
    if not regime.private:
        raise ConfigError("study_name", f"{s.study_name!r} is a non-private baseline: it claims no ε to audit")
    if regime.secret_count:
        raise PrivacyError(f"study_name: {s.study_name!r} is a private search (a secret number of trials, only "
                           "the best released); an audit run is one more run on the data and would void that "
                           "bound. Audit the same hyperparameters with explicit flags on data you do not protect.")
    if isinstance(regime, TotalBudget):
        raise PrivacyError(f"study_name: {s.study_name!r} spends a total budget planned before it ran; an audit "
                           "run is one more run on the data and would void that plan. Audit the same "
                           "hyperparameters with explicit flags on data you do not protect.")
    if faults.active():
        raise PrivacyError(f"fault: the test-only fault {faults.active()!r} is active; it is never run on a study")
    return regime


def _admitted(s: Any, regime: Any, target: int, threat_model: str, request: Mechanism) -> Any:
    """The audit run's trial, created RUNNING in the storage and admitted by the study's regime.

    Numbered atomically in the storage, like any trial, and never a queued trial (whose copied attributes, a
    proxy's say, would count this run on all of the data as something else).

    Raises:
      PrivacyError: the ``search_budget`` filter refuses it (the trial is then PRUNED, having read nothing).
    """
    import optuna
    from optuna.trial import TrialState

    from dptune.search import orphans, proxy

    trial_rec = optuna.Trial(s, proxy.start_trial(s, record.audit_start_attrs(target, threat_model,
                                                                               orphans.worker_identity())))
    refusal = regime.admit(trial_rec, request)  # a search_budget's filter counts the audit like a trial
    if refusal is not None:
        s.tell(trial_rec, state=TrialState.PRUNED)
        raise PrivacyError(f"{refusal.replace('the search stops here', 'the audit is refused')}")
    return trial_rec


def _audit_config(cfg: Any, target: Any, steps: int, identity: str) -> RunConfig:
    """The audit run's configuration: the audited trial's, its secret keyed on the audit's own ``identity``."""
    from dptune.data.augment import Augmentation

    return RunConfig(
        model=cfg.model, weight_standardization=cfg.weight_standardization,
        microbatch_size=int(record.get(target, record.MICROBATCH_SIZE) or 128), clipping=cfg.clipping, private=True,
        init_checkpoint=cfg.init_checkpoint, reinitialize=tuple(cfg.reinitialize),
        augmentation=Augmentation(**cfg.augmentation.model_dump()), eval_every=max(1, steps // 5),
        seed=int(record.get(target, record.SEED, cfg.seed)),
        secret=None if cfg.private_seed is None else SecretSeed.from_int(cfg.private_seed).child(identity),
        unsafe_ignore_checkpoint_provenance=cfg.unsafe_ignore_checkpoint_provenance,
    )


def _recorded(s: Any, study_name: str, audited: int, trial_rec: Any, result: AuditResult, before: Any) -> AuditResult:
    """The audit run's outcome written to the study, and the search's ε before and after it in the result."""
    from optuna.trial import TrialState

    from dptune.search.regimes import study_guarantee

    record.set_all(trial_rec, record.audit_result_attrs(result))
    s.tell(trial_rec, state=TrialState.PRUNED)
    after = study_guarantee(s)
    result.study = {"name": study_name, "trial_audited": audited, "audit_trial": trial_rec.number,
                    "mode": after.figures["mode"], "search_epsilon_before": before.epsilon,
                    "search_epsilon_after": after.epsilon}
    if after.capped:
        counted = (f"the study's privacy filter admitted it; the search stays within its cap "
                   f"ε = {after.epsilon:g} (accounted ε now {after.figures['accounted_epsilon']:.4g})")
    else:
        counted = f"the search's total ε went from {before.epsilon:.4g} to {after.epsilon:.4g}"
    result.notes.append(f"This audit trained on the study's private data: it is recorded as trial {trial_rec.number} "
                        f"of {study_name!r} (audit of trial {audited}) and counts in the search total; "
                        f"{counted}.")
    return result
