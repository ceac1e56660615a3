"""Cheaper tuning: tune on something cheaper than the released run, then one final run.

A study with ``search: {mode: …}`` runs *proxy* trials, each a cheaper stand-in
for a full DP-SGD run of the hyperparameters it sampled, then (``dptune study
finalize``, :func:`dptune.search.finalize.finalize`) ONE final run on the private
data with the best proxy's hyperparameters, transferred by the rule of the
mode. Only the final run's model is released (proxies save none).

Every trial samples the search space as an ordinary trial would and plans the
*full-scale* run: batch B, steps T = ⌈epochs/q⌉ at q = B/N, and σ calibrated so
that those T steps spend ``privacy.epsilon`` (or T derived from a sampled σ).
The modes differ in what the proxy runs instead:

* ``public`` (``dataset: D``): the full-scale run planned on D's N_D, trained
  with DP-SGD on D. It reads no private example: no privacy cost. Transfer:
  keep q and T (B = round(q·N)), the learning rate, C and the optimizer; σ
  calibrated to ``privacy.epsilon`` for (q, T) on the private data.
* ``scaled`` (``factor: k``; TAN, Sander et al. 2023, "TAN without a burn"):
  batch B/k and σ/k for the same T, so σ/B (the noise in the averaged
  gradient) is unchanged at 1/k of the compute. On the private data each proxy
  is DP-SGD at (q/k, σ/k, T) and costs its own, larger, ε (at most
  ``MAX_EPSILON``), composed into the search total; with ``dataset: D`` the
  proxies run on public D at no cost and under no cap meant for private data
  (:func:`scaled_proxy_budget`). Transfer: the planned full-scale run itself
  (B, σ, T).
* ``subset`` (``fraction: γ``; Koskela & Kulkarni 2023, "Practical differentially
  private hyperparameter tuning with subsampling"): DP-SGD at the full run's
  (q, σ, T) on ONE secret random subset of the private training split, each
  example in it independently with probability γ (so that removing one example
  changes nothing but its own membership), shared by every worker; the
  expected batch is γ·B. Amplification by subsampling needs the proxies' ε'
  fixed before they run, so it is claimed only with a cap:
  ``search_budget: {epsilon: ε', order: α}`` (α optional, as for ordinary
  studies) caps the proxies' composition, a Rényi filter fixed at create and
  enforced in the storage before each proxy (the final run is not counted in
  it). The cap at δ/2 is amplified to log(1 + γ(e^ε' − 1)) at γδ/2, and the
  final run adds its own ε at δ/2 (basic composition; a private initial
  checkpoint's training is a third part, δ/3 each); the plain composition of
  everything also holds, and the smaller is stated. Without a cap only the
  plain composition is stated. No proxy starts once a final run exists, and a
  final run reports no curve to the pruner or sampler. Transfer: the planned
  full-scale run (B, σ, T).

The search's ε is the RDP composition of every trial that read the private
training data (the proxies of ``scaled`` and ``subset``; the final run in all
modes) and a private initial checkpoint's recorded spend: a direct
``dp_accounting`` computation of what ran (:func:`guarantee`), with an order
dp-accounting cannot compute for one run bounded by the next order up
(:class:`dptune.privacy.accounting.FilledRdpAccountant`: a mix of proxies at
σ/k and a final run at σ keeps its low orders). A mode whose proxies could
not run anywhere in the space (every one would be rejected) is refused at
create (:func:`check_create`).

Each mode is one object (:class:`PublicProxies`, :class:`ScaledProxies`,
:class:`SubsetProxies`, made from the stored settings by :func:`proxy_mode`,
the one place that reads a mode's name): its create-time checks, what its
proxy trains in place of the planned full-scale run, its sentence in the
statement, the amplified bound it adds, and the final run's transfer.

This module is JAX-free at import (:mod:`dptune.search.results` reads through
it); running the proxies is :mod:`dptune.search.proxy`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from optuna.trial import FrozenTrial, TrialState

from dptune.config.schema import Choice, Range, ResolvedStudy
from dptune.errors import ConfigError, PrivacyError
from dptune.models.checkpoint import dataset_identity
from dptune.privacy import accounting as privacy
from dptune.privacy.mechanism import Mechanism
from dptune.search import record
from dptune.search.record import StudyRecord

if TYPE_CHECKING:
    from dptune.privacy.search_totals import RenyiFilter

# The storage keys, under the names older callers import (defined in dptune.search.record).
MODE_ATTR = record.SEARCH_MODE
PROXY_ATTR = record.PROXY
FULL_SCALE_ATTR = record.FULL_SCALE
FINAL_ATTR = record.FINAL
FINAL_PLAN_ATTR = record.FINAL_PLAN
FINAL_SOURCE_ATTR = record.FINAL_SOURCE
SUBSET_ATTR = record.SUBSET_ID
FIXED_SUBSET_PREFIX = "private_seed:"  # a subset id whose subset came from a fixed private_seed (no amplification)


def check_clipping(resolved: ResolvedStudy) -> None:
    """With ``clipping: normalize`` the clip norm only scales the update: refuse searching over it.

    Raises:
      ConfigError: ``search_space.clip_norm`` is a range or choices under ``clipping: normalize``.
    """
    if resolved.study.clipping != "normalize":
        return
    if isinstance(resolved.space.clip_norm, (Range, Choice)):
        raise ConfigError("search_space.clip_norm", "with clipping: normalize every example is scaled to norm C, "
                          "so C only scales the update (with the learning rate, η = lr·C); give it one value "
                          "(e.g. clip_norm: 1) and search the (effective) learning rate")


def _batch_values(spec: Any, n: int) -> list[tuple[str, float]]:
    if isinstance(spec, Range):
        return [("low", spec.low), ("high", n if spec.high == "full" else spec.high)]
    if isinstance(spec, Choice):
        return [("choices", n if c == "full" else float(c)) for c in spec.choices]
    return [("", n if spec == "full" else float(spec))]


def check_create(resolved: ResolvedStudy, n_private: int, delta: float | None,
                 public: tuple[str, int, tuple[int, ...], int] | None,
                 private_shape: tuple[tuple[int, ...], int]) -> dict[str, Any] | None:
    """Refuse a mode that cannot run or be accounted as configured; the study attribute that records it.

    Args:
      resolved: the study.
      n_private: N, the private training split's size.
      delta: the study's δ.
      public: (name, N_D, image shape, classes) of the mode's public dataset, if it names one.
      private_shape: (image shape, classes) of the private data.

    Returns:
      ``{"mode", "factor", "fraction", "dataset", "n_private", "n_plan"}`` or None without a mode.

    Raises:
      ConfigError: naming the field and why (e.g. a factor that does not divide every batch size, or one that
        leaves no proxy that could run at any end of the space).
    """
    check_clipping(resolved)
    mode = resolved.study.search
    if mode is None:
        return None
    settings = {"mode": mode.mode, "factor": mode.factor, "fraction": mode.fraction, "dataset": mode.dataset}
    n_plan = proxy_mode(settings).check(resolved, n_private, delta, public, private_shape)
    return {**settings, "n_private": n_private, "n_plan": n_plan}


class ScaledBatch:
    """A trial seen through the scaled mode: a sampled batch size is always a multiple of ``factor``.

    A batch range [low, high] is sampled as B/k in [⌈low/k⌉, ⌊high/k⌋]
    (Optuna records the proxy's batch B/k) and returned as B; choices and fixed
    values are multiples of k already (checked at create).
    """

    def __init__(self, trial: Any, factor: int):
        self.trial, self.factor = trial, factor

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int:
        if name != "batch_size":
            return int(self.trial.suggest_int(name, low, high, log=log))
        k = self.factor
        return k * int(self.trial.suggest_int(name, -(-low // k), high // k, log=log))

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return float(self.trial.suggest_float(name, low, high, log=log))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.trial.suggest_categorical(name, choices)


# The δ a proxy on public data may train under, tried after the study's own: no δ protects public data, and the
# trainer only needs a budget that admits every step of the proxy.
PUBLIC_PROXY_DELTAS = (1e-3, 1e-2, 0.1, 0.5)


def scaled_proxy_budget(q: float, sigma: float, steps: int, delta: float, accountant: str,
                        public: bool) -> tuple[float, float] | None:
    """The (ε, δ) a scaled proxy trains under, or None when no budget the trainer takes admits all its steps.

    On private data: its own ε at the study's δ (composed into the search's
    total), at most :data:`~dptune.privacy.accounting.MAX_EPSILON`. On public
    data it spends nothing and is composed nowhere: the trainer's largest ε,
    at the first δ (the study's, then :data:`PUBLIC_PROXY_DELTAS`) where its
    steps fit, so that no check meant for private data caps it.
    """
    if not public:
        eps = privacy.epsilon(q, sigma, steps, delta, accountant)
        return (eps, delta) if 0 < eps <= privacy.MAX_EPSILON else None
    for d in (delta, *(x for x in PUBLIC_PROXY_DELTAS if x > delta)):
        if privacy.epsilon(q, sigma, steps, d, accountant) <= privacy.MAX_EPSILON:
            return privacy.MAX_EPSILON, d
    return None


_PRIVACY_PARAMS = ("batch_size", "epochs", "noise_multiplier")


class _Corner:
    """A sampler that answers with an end of each range: the high end for the names in ``high``."""

    def __init__(self, high: Collection[str]):
        self.high = set(high)

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int:
        return high if name in self.high else low

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return high if name in self.high else low

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        ordered = list(choices)
        if name in _PRIVACY_PARAMS:
            ordered.sort(key=lambda c: math.inf if c == "full" else float(c))
        return ordered[-1] if name in self.high else ordered[0]


def _corner_plans(resolved: ResolvedStudy, n_plan: int, delta: float, factor: int) -> list[Any]:
    """The full-scale plans at the ends of the space's batch and epochs (or σ) ranges: at most four."""
    from dptune.search.space import Infeasible, plan_trial  # imports JAX: only at create
    from dptune.trainer.train import PrivacyBudget

    cfg = resolved.study
    assert cfg.privacy is not None and cfg.privacy.epsilon is not None  # a mode needs one (checked before)
    budget = PrivacyBudget(cfg.privacy.epsilon, delta, cfg.privacy.accountant)
    params = resolved.space.params()
    ranged = [n for n in _PRIVACY_PARAMS if isinstance(params.get(n), (Range, Choice))]
    plans = []
    for ends in itertools.product((False, True), repeat=len(ranged)):
        corner = _Corner([n for n, high in zip(ranged, ends, strict=True) if high])
        try:
            plans.append(plan_trial(ScaledBatch(corner, factor), resolved.space, n_plan, budget, cfg.budget))
        except (Infeasible, ConfigError, ValueError):
            continue  # the full-scale run cannot train there: the ordinary checks and trials say so
    return plans


def proxy_filter(cap: dict[str, Any], delta: float) -> RenyiFilter:
    """Subset tuning's cap on its proxies (``{"epsilon", "order"}``) as the Rényi filter that enforces it."""
    from dptune.privacy.search_totals import RenyiFilter, default_filter_order

    epsilon, order = float(cap["epsilon"]), cap.get("order")
    return RenyiFilter(epsilon, delta, float(order or default_filter_order(epsilon, delta)))


def final_plan(mode: dict[str, Any], winner: FrozenTrial, epsilon: float, delta: float,
               accountant: str) -> dict[str, Any]:
    """The final run's hyperparameters, steps and rate, transferred from the best proxy by the mode's rule.

    Planned on the private data (``n_plan`` = N): the very run the proxy stood in
    for (B, σ, T). Planned on a public dataset: q and T kept, B = round(q·N), σ
    calibrated so that T steps at B/N spend ``epsilon``. The learning rate, C,
    the optimizer, momentum, averaging and trainable layers are the proxy's.

    Returns:
      ``{"hparams": {…}, "steps": T, "sampling_rate": B/N}``.
    """
    def of(key: str) -> Any:
        return record.get(winner, key)

    n, full = int(mode["n_private"]), of(record.FULL_SCALE)
    steps = int(full[record.STEPS])
    batch, sigma = proxy_mode(mode).transfer(full, epsilon, delta, accountant)
    hparams = {record.BATCH_SIZE: batch, record.LEARNING_RATE: float(of(record.LEARNING_RATE)),
               record.CLIP_NORM: float(of(record.CLIP_NORM)), record.NOISE_MULTIPLIER: sigma,
               record.OPTIMIZER: of(record.OPTIMIZER), record.MOMENTUM: float(of(record.MOMENTUM)),
               record.EMA_DECAY: float(of(record.EMA_DECAY)), record.TRAINABLE: of(record.TRAINABLE)}
    return {"hparams": hparams, "steps": steps, "sampling_rate": batch / n}


is_final = record.is_final
is_proxy = record.is_proxy


def final_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The final run that finished (the last one, if a failed one was retried)."""
    done = [t for t in trials if is_final(t) and t.state == TrialState.COMPLETE]
    return done[-1] if done else None


def holding_final(trials: Sequence[FrozenTrial], below: int | None = None) -> FrozenTrial | None:
    """The final run that holds the study's one final run (numbered below ``below``), or None.

    A final run holds it while RUNNING or once COMPLETE. One that failed or
    was refused leaves the place free (a failed one stays counted); a WAITING
    copy (Optuna's heartbeat retry copies a stale trial's attributes) never
    trains, so it holds nothing.
    """
    held = [t for t in trials if is_final(t) and t.state in (TrialState.RUNNING, TrialState.COMPLETE)
            and (below is None or t.number < below)]
    return min(held, key=lambda t: t.number) if held else None


TIMING_ATTRS = record.TIMING_ATTRS


def without_timings(record: dict[str, Any]) -> dict[str, Any]:
    """A trial's record as a study with a mode releases it: without :data:`TIMING_ATTRS`."""
    return {k: v for k, v in record.items() if k not in TIMING_ATTRS}


def best_proxy(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The completed proxy with the best validation accuracy (ties: the earlier one)."""
    done = [t for t in trials if is_proxy(t) and t.state == TrialState.COMPLETE and t.value is not None
            and math.isfinite(t.value)]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _compute(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    total = record.total
    proxies = [t for t in trials if is_proxy(t)]
    finals = [t for t in trials if is_final(t)]
    processed, steps = record.EXAMPLES_PROCESSED, record.STEPS
    return {"proxy_examples": total(proxies, processed), "proxy_steps": total(proxies, steps),
            "final_examples": total(finals, processed), "final_steps": total(finals, steps),
            "examples_processed": total(trials, processed), "trial_steps": total(trials, steps)}


def describe(mode: dict[str, Any]) -> str:
    """The mode and its accounting in one sentence."""
    return proxy_mode(mode).describe()


def _subset_amplification(mode: dict[str, Any], proxies: Sequence[FrozenTrial],
                          rest: Sequence[Mechanism], prior: Sequence[Mechanism],
                          delta: float | None, cap: dict[str, Any] | None) -> dict[str, Any] | None:
    """Subset tuning's amplified total (``applicable``), or why its theorem does not apply; None for other modes."""
    return proxy_mode(mode).amplification(proxies, rest, prior, delta, cap)


def guarantee(study: StudyRecord | dict[str, Any], trials: Sequence[FrozenTrial],
              spends: Sequence[Mechanism], prior: Sequence[Mechanism],
              totals: dict[str, float], prior_text: str,
              split: tuple[Sequence[Mechanism], Sequence[Mechanism]],
              proxies: Sequence[FrozenTrial]) -> dict[str, Any]:
    """The search's guarantee for a study with a mode: the composition of what ran, the final run, the compute.

    ``spends``: (q, σ, T) of every trial that read the private training data;
    ``totals``: their RDP/PLD composition with ``prior``; ``split``: the same
    spends as (proxies, runs on all of the data); ``proxies``: the proxy
    trials that read the private data. For subset tuning the total is the
    smaller of the plain composition and, with a cap on the proxies fixed at
    create (``search_budget``), the amplified bound
    (:func:`dptune.privacy.search_totals.subset_tuning_epsilon`).
    """
    from dptune.privacy import search_totals

    rec = study if isinstance(study, StudyRecord) else StudyRecord.read(study)
    mode = rec.search_mode
    assert mode is not None  # called for a study with a mode
    delta = rec.delta
    final = final_trial(trials)
    winner = best_proxy(trials)
    proxy_eps = search_totals.composed_epsilon(split[0], delta)["rdp"] if delta else math.nan
    kind = proxy_mode(mode)
    amplified = kind.amplification(proxies, split[1], prior, delta, rec.search_budget)
    released = None
    if final is not None:
        keys = {"epsilon": record.EPSILON_SPENT, "val_accuracy": record.VAL_ACCURACY,
                "test_accuracy": record.TEST_ACCURACY, "from_trial": record.FINAL_SOURCE,
                "batch_size": record.BATCH_SIZE, "noise_multiplier": record.NOISE_MULTIPLIER, "steps": record.STEPS}
        released = {"trial": final.number, **{k: record.get(final, key) for k, key in keys.items()}}
    state = ("" if final is not None else
             " Not finalized: no model is released until `dptune study finalize` has run the final run.")
    if len(spends) + len(prior) == 1:
        # One DP-SGD run read the private data (its proxies read none): its own PLD bound holds; nothing composes.
        accountant = "pld" if totals["pld"] <= privacy.PLD_LIMIT else "rdp"  # above it PLD is not run
        total, how = totals["pld"], (f"The one run that trained on the private data ({accountant.upper()}): "
                                     f"ε = {totals['pld']:.4g}.")
    else:
        accountant = "rdp"
        total, how = totals["rdp"], (f"Composition of the {len(spends)} run(s) that trained on the private data, "
                                     f"each at the steps it took (RDP over dp-accounting's orders, an order it "
                                     f"cannot compute for a run bounded by the next order up): "
                                     f"ε = {totals['rdp']:.4g}, an accounting of what ran, not a cap fixed in "
                                     f"advance; proxies alone ε = {proxy_eps:.4g}.")
    total, how, amplified = kind.stated(amplified, total, how, bool(prior))
    text = f"{kind.describe()} {how}{prior_text} Releasing the final run's model is covered by this total." + state
    return {
        "mode": "composition", "search_mode": mode["mode"], "total_epsilon": total, "accountant": accountant,
        "total_epsilon_pld_if_nonadaptive": totals["pld"], "delta": delta,
        "per_trial_epsilon": rec.epsilon_target, "trials_touching_data": len(spends),
        "proxy_epsilon": proxy_eps, "subset_amplification": amplified, "final": released,
        "finalized": final is not None,
        "best_proxy": None if winner is None else {"trial": winner.number, "value": winner.value},
        "compute": _compute(trials), "settings": {k: v for k, v in mode.items() if v is not None},
        "guarantee": text,
    }


# -- the modes, one object each -----------------------------------------------------------------------------------

SUBSET_SECRET = "subset.secret"  # the file, in the study's private folder, holding subset tuning's secret


class ProxyRun(NamedTuple):
    """What a proxy trains in place of its planned full-scale run: the plan, its data, its budget, its rate."""

    plan: Any  # a dptune.search.space.TrialPlan
    data: Any  # a dptune.data.datasets.Dataset
    budget: Any  # a dptune.trainer.train.PrivacyBudget
    sampling_rate: float | None  # given to the trainer (a subset's size is secret; a public proxy's N is not δ's)


class ModeData(Protocol):
    """What a mode's proxy reads its data and budget from (:class:`dptune.search.proxy.ModeRunner`)."""

    private: Any
    public: Any
    budget: Any
    subset_id: str | None

    def subset(self) -> Any: ...


@dataclass(frozen=True)
class ProxyMode:
    """A cheaper-tuning mode, from its stored settings (``search_mode``: mode, factor, fraction, dataset, sizes).

    The defaults are what the modes share: proxies on the named public dataset (else the private training
    split), no amplification, and the final run transferred by where it was planned (:meth:`transfer`).
    """

    settings: Mapping[str, Any]
    name: ClassVar[str]

    def check(self, resolved: ResolvedStudy, n_private: int, delta: float | None,
              public: tuple[str, int, tuple[int, ...], int] | None,
              private_shape: tuple[tuple[int, ...], int]) -> int:
        """Refuse what this mode cannot run or account (:func:`check_create`); the N its runs are planned for."""
        cfg = resolved.study
        if cfg.privacy is None:
            raise ConfigError("search.mode", "needs privacy: {epsilon: …}, the final run's budget (a non-private "
                              "study or a private search has no private final run to transfer to)")
        self._check_budget(cfg.search_budget)
        n_plan = n_private
        if self.settings.get("dataset") is not None:
            assert public is not None  # loaded by the caller for every mode that names a dataset
            n_plan = self._check_public(cfg, delta, public, private_shape)
        self._check_settings(resolved, n_private, n_plan)
        if delta is not None:
            self._check_proxies_run(resolved, n_plan, delta)
        return n_plan

    def _check_budget(self, search_budget: Any) -> None:
        if search_budget is not None:
            raise ConfigError("search_budget", f"not with search.mode {self.name}: the mode's total is the "
                              "composition of its proxy trials and its final run, stated after the search (subset "
                              "tuning takes it as the cap on its proxies)")

    def _check_public(self, cfg: Any, delta: float | None, public: tuple[str, int, tuple[int, ...], int],
                      private_shape: tuple[tuple[int, ...], int]) -> int:
        """The public dataset's checks: another dataset, the private data's shape, δ below 1/N_D; returns N_D."""
        name, n_public, shape, classes = public
        if dataset_identity(self.settings["dataset"]) == dataset_identity(cfg.dataset):
            raise ConfigError("search.dataset", f"must be another, public dataset, not the private {cfg.dataset!r} "
                              "(trials on it would spend privacy the search does not account)")
        if (shape, classes) != private_shape:
            raise ConfigError("search.dataset", f"{name!r} has images {shape} and {classes} classes, the private "
                              f"data {private_shape[0]} and {private_shape[1]}; set image_size so that they match")
        if delta is not None and delta >= 1 / n_public:
            raise ConfigError("search.dataset", f"{name!r} has {n_public} training examples: δ = {delta:g} is not "
                              f"below 1/N there; use a larger public dataset or set privacy.delta")
        return n_public

    def _check_settings(self, resolved: ResolvedStudy, n_private: int, n_plan: int) -> None:
        """The mode's own settings against the space (none by default)."""

    def _check_proxies_run(self, resolved: ResolvedStudy, n_plan: int, delta: float) -> None:
        """Refuse a mode whose proxies would all be rejected (a proxy that costs nothing always runs)."""

    def sampler(self, trial: Any) -> Any:
        """What the trial's hyperparameters are sampled through."""
        return trial

    def data(self, source: ModeData) -> Any:
        """The data a proxy's full-scale run is planned on: the named public dataset, else the private split."""
        return source.public if self.settings.get("dataset") else source.private

    def proxy(self, source: ModeData, full: Any, data: Any, attrs: dict[str, Any]) -> ProxyRun:
        """What the proxy trains in place of the planned full-scale run ``full`` (adding to ``attrs``)."""
        return ProxyRun(full, data, source.budget, None)

    def describe(self) -> str:
        raise NotImplementedError

    def amplification(self, proxies: Sequence[FrozenTrial], rest: Sequence[Mechanism],
                      prior: Sequence[Mechanism], delta: float | None,
                      cap: dict[str, Any] | None) -> dict[str, Any] | None:
        """An amplified bound beside the plain composition, or why none holds; None where the mode has none."""
        return None

    def stated(self, amplified: dict[str, Any] | None, total: float, how: str,
               prior: bool) -> tuple[float, str, dict[str, Any] | None]:
        """The total the statement rests on, its sentence, and the amplification record (none by default)."""
        return total, how, amplified

    def transfer(self, full: Mapping[str, Any], epsilon: float, delta: float, accountant: str) -> tuple[int, float]:
        """The final run's (B, σ) from the winner's full-scale run (:func:`final_plan`).

        Planned on the private data: the very run the proxy stood in for. Planned on a public dataset: q and T
        kept, B = round(q·N), σ calibrated so that T steps at B/N spend ``epsilon``.
        """
        n = int(self.settings["n_private"])
        if int(self.settings["n_plan"]) == n:
            return int(full[record.BATCH_SIZE]), float(full[record.NOISE_MULTIPLIER])
        batch = min(n, max(1, round(float(full[record.SAMPLING_RATE]) * n)))
        return batch, privacy.noise_for_epsilon(batch / n, int(full[record.STEPS]), epsilon, delta, accountant)

    def after_final(self, folder: str) -> None:
        """What the study's private folder drops once a final run has been claimed (nothing by default)."""

    def _where(self) -> str:
        dataset = self.settings.get("dataset")
        return f"the public dataset {dataset!r}" if dataset else "the private training split"


class PublicProxies(ProxyMode):
    """``public``: the full-scale run planned and trained with DP-SGD on a public dataset, at no privacy cost."""

    name = "public"

    def describe(self) -> str:
        return (f"Hyperparameters tuned with DP-SGD on {self._where()}, which holds no private example and costs no "
                "privacy; transferred keeping q = B/N and the steps, σ calibrated to the budget.")


class ScaledProxies(ProxyMode):
    """``scaled`` (TAN): batch B/k and σ/k for the same steps, on the private data or a public dataset."""

    name = "scaled"

    @property
    def factor(self) -> int:
        return int(self.settings.get("factor") or 1)

    def _check_settings(self, resolved: ResolvedStudy, n_private: int, n_plan: int) -> None:
        """``factor`` divides every batch size of the space (a range must hold a multiple of it)."""
        space, k = resolved.space, int(self.settings.get("factor") or 0)
        for where, v in _batch_values(space.batch_size, n_plan):
            label = f"{where} = " if where else ""
            if where in ("", "choices") and int(v) % k:
                raise ConfigError("search.factor", f"{k} does not divide search_space.batch_size {label}{v:g}: "
                                  "the proxies run at batch B/k with σ/k, which must be a whole batch")
        if isinstance(space.batch_size, Range):
            low, high = (float(v) for _, v in _batch_values(space.batch_size, n_plan))
            if math.ceil(low / k) > math.floor(high / k):
                raise ConfigError("search.factor", f"no multiple of {k} lies in search_space.batch_size "
                                  f"[{low:g}, {high:g}]")

    def _check_proxies_run(self, resolved: ResolvedStudy, n_plan: int, delta: float) -> None:
        cfg = resolved.study
        assert cfg.privacy is not None
        k, public = self.factor, self.settings.get("dataset") is not None
        probe = PUBLIC_PROXY_DELTAS[-1] if public else delta  # the most lenient δ the proxy was tried at
        costs = []
        for plan in _corner_plans(resolved, n_plan, delta, k):
            q, sigma = plan.hparams.batch_size // k / n_plan, plan.hparams.noise_multiplier / k
            if scaled_proxy_budget(q, sigma, plan.steps, delta, cfg.privacy.accountant, public) is not None:
                return
            costs.append((privacy.epsilon(q, sigma, plan.steps, probe, cfg.privacy.accountant),
                          plan.hparams.batch_size))
        if costs:
            eps, batch = min(costs)
            where = (f"the trainer takes no budget for all of its steps on {self.settings['dataset']!r}" if public
                     else "each proxy on the private data would spend")
            raise ConfigError("search.factor", f"{k} leaves no proxy that can run: at batch B/{k} and σ/{k} {where} "
                              f"more than the maximum ε = {privacy.MAX_EPSILON:g} (at the cheapest end of "
                              f"search_space, B = {batch}: ε = {eps:.4g} at δ = {probe:g}); lower the factor")

    def sampler(self, trial: Any) -> Any:
        return ScaledBatch(trial, self.factor)

    def proxy(self, source: ModeData, full: Any, data: Any, attrs: dict[str, Any]) -> ProxyRun:
        """DP-SGD at (B/k, σ/k, T), under its own ε on private data or a budget that admits it on public data.

        Raises:
          Infeasible: no budget the trainer takes admits all of its steps.
        """
        from dptune.search.space import Infeasible  # imports JAX: only where a proxy trains

        k, steps, base = self.factor, full.steps, source.budget
        hp = dataclasses.replace(full.hparams, batch_size=full.hparams.batch_size // k,
                                 noise_multiplier=full.hparams.noise_multiplier / k)
        q, public = hp.batch_size / len(data.train), data is source.public
        try:
            allowed = scaled_proxy_budget(q, hp.noise_multiplier, steps, base.delta, base.accountant, public)
        except PrivacyError as e:
            raise Infeasible(f"the proxy at batch {hp.batch_size}, σ = {hp.noise_multiplier:.4g} for {steps} "
                             f"steps cannot be accounted ({e})") from None
        if allowed is None:
            d = PUBLIC_PROXY_DELTAS[-1] if public else base.delta
            eps = privacy.epsilon(q, hp.noise_multiplier, steps, d, base.accountant)
            raise Infeasible(f"the proxy at batch {hp.batch_size}, σ = {hp.noise_multiplier:.4g} for {steps} "
                             f"steps cannot be trained: its ε = {eps:.4g} at δ = {d:g} is above the maximum "
                             f"{privacy.MAX_EPSILON:g} the trainer takes")
        # On private data the proxy's own ε, on public data a budget that admits all of its steps: what the
        # trainer may spend. A public proxy's rate is given, so the trainer checks no δ against its N.
        budget = dataclasses.replace(base, epsilon=allowed[0], delta=allowed[1])
        if public:
            attrs[record.DELTA_OF_TRIAL] = allowed[1]
        plan = dataclasses.replace(full, hparams=hp, sampling_rate=q, derived=f"scaled_1/{k}")
        return ProxyRun(plan, data, budget, q if public else None)

    def describe(self) -> str:
        k = self.settings["factor"]
        cost = ("no privacy (public data)" if self.settings.get("dataset") else
                "each proxy counted at its own (q/k, σ/k, T)")
        return (f"Scaled proxies (TAN, Sander et al. 2023) on {self._where()}: batch B/{k} and σ/{k}"
                f" for the same steps (σ/B unchanged), {cost}; the final run is the winner's full-scale (B, σ, T).")


class SubsetProxies(ProxyMode):
    """``subset``: the full run's (q, σ, T) on one secret random subset, each example in it w.p. γ."""

    name = "subset"

    @property
    def fraction(self) -> float:
        return float(self.settings["fraction"])

    def _check_budget(self, search_budget: Any) -> None:
        """Subset tuning takes a ``search_budget`` as the cap on its proxies (checked by :meth:`_check_proxies_run`)."""

    def _check_settings(self, resolved: ResolvedStudy, n_private: int, n_plan: int) -> None:
        gamma = float(self.settings.get("fraction") or 0)
        if gamma * n_private < 1:
            raise ConfigError("search.fraction", f"{gamma:g} of {n_private} training examples is less than one "
                              "example")

    def _check_proxies_run(self, resolved: ResolvedStudy, n_plan: int, delta: float) -> None:
        """Refuse a cap on the proxies that admits none of them, at any end of the space."""
        cfg = resolved.study
        if cfg.search_budget is None:
            return
        filt = proxy_filter(cfg.search_budget.model_dump(), delta)
        one = [filt.spent([Mechanism(p.sampling_rate, p.hparams.noise_multiplier, p.steps)])
               for p in _corner_plans(resolved, n_plan, delta, 1)]
        if one and min(one) > filt.epsilon:
            raise ConfigError("search_budget.epsilon", f"{filt.epsilon:g} admits no proxy: one proxy at the full "
                              f"run's (q, σ, T) spends ε = {min(one):.4g} by the filter's Rényi order "
                              f"{filt.order:.3g} at the cheapest end of search_space; raise it")

    def proxy(self, source: ModeData, full: Any, data: Any, attrs: dict[str, Any]) -> ProxyRun:
        """The full run's q, σ and T on the study's secret subset: the expected batch is γ·B."""
        gamma = self.fraction
        subset = source.subset()
        hp = dataclasses.replace(full.hparams, batch_size=max(1, round(gamma * full.hparams.batch_size)))
        attrs[record.SUBSET_ID] = source.subset_id
        plan = dataclasses.replace(full, hparams=hp, derived=f"subset_{gamma:g}")
        return ProxyRun(plan, subset, source.budget, full.sampling_rate)

    def describe(self) -> str:
        return (f"Subset tuning (Koskela & Kulkarni 2023): proxies train on one secret random "
                f"{self.settings['fraction']:g} of the private training split, each as DP-SGD at the full run's "
                "(q, σ, T); the final run is the winner's full-scale run.")

    def amplification(self, proxies: Sequence[FrozenTrial], rest: Sequence[Mechanism],
                      prior: Sequence[Mechanism], delta: float | None,
                      cap: dict[str, Any] | None) -> dict[str, Any] | None:
        """The amplified total (``applicable``), or why the theorem does not apply; None without a δ."""
        from dptune.privacy import search_totals

        if not delta:
            return None
        ids = {record.get(t, record.SUBSET_ID) for t in proxies}
        if len(ids) > 1 or None in ids:
            return {"applicable": False, "reason": (f"the proxies read {len(ids)} different subsets (or one without "
                                                    "a recorded subset), so the subsampling is not one draw")}
        if any(str(i).startswith(FIXED_SUBSET_PREFIX) for i in ids):
            # A seed someone chose and wrote down (a study file, older storages) recomputes the subset for whoever
            # has it; amplification needs a subset chosen by randomness nobody else knows.
            return {"applicable": False, "reason": "the subset was derived from the study's fixed private_seed "
                                                   "(chosen and written down, not drawn from the OS)"}
        if cap is None:
            # The proxies' own composition depends on what they saw (how many ran, which, how long); the theorem
            # subsamples a mechanism whose ε' was fixed before it ran.
            return {"applicable": False, "reason": "no cap on the proxies was fixed before they ran "
                                                   "(search_budget), and amplification holds only for an ε' fixed "
                                                   "in advance"}
        if not all(record.get(t, record.FILTER_ADMITTED) for t in proxies):
            return {"applicable": False, "reason": "a proxy read the subset without the cap's filter admitting it"}
        filt = proxy_filter(cap, delta)
        parts = search_totals.subset_tuning_epsilon(filt, rest, self.fraction, delta, before=prior)
        return {"applicable": True, "cap_epsilon": filt.epsilon, "cap_order": filt.order, **parts}

    def stated(self, amplified: dict[str, Any] | None, total: float, how: str,
               prior: bool) -> tuple[float, str, dict[str, Any] | None]:
        """The smaller of the plain and the amplified total, and a sentence that says which one it is."""
        if amplified is None:
            return total, how, None
        used = bool(amplified["applicable"]) and amplified["total"] < total
        if used:
            total, how = amplified["total"], (
                f"The proxies all read one secret subset, each example in it with probability "
                f"{self.settings['fraction']:g}, and each started only within a cap fixed at create (a Rényi filter "
                f"at order {amplified['cap_order']:.3g}, ε' = {amplified['cap_epsilon']:g} at δ): whatever they "
                f"saw, the tuning is ε' = {amplified['tuning_cap_on_subset']:.4g} on the subset at its share of δ, "
                f"amplified by the subsampling to {amplified['tuning']:.4g} (Balle et al. 2018); the run(s) on all "
                f"of the data after it add {amplified['rest']:.4g}"
                + (f" and the initial checkpoint's training {amplified['before']:.4g}" if prior else "")
                + f" (basic composition, δ split evenly): ε = {amplified['total']:.4g} in all "
                f"(plain composition: {how[:-1]}).")
        elif amplified["applicable"]:
            how += (f" Amplification of the proxies' cap by the subsampling would give ε = {amplified['total']:.4g}, "
                    "not below this: the plain composition is the figure stated.")
        else:
            how += f" No amplification by the subsampling is claimed: {amplified['reason']}."
        # Which figure the statement rests on: an applicable bound that is not the stated total is not claimed.
        return total, how, {**amplified, "claimed": used, "used_in_statement": used,
                            "stated_figure": "amplified" if used else "plain composition"}

    def after_final(self, folder: str) -> None:
        """Delete the subset's secret: once a final run is claimed no proxy reads the subset again."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, SUBSET_SECRET))


class PlannedProxies(SubsetProxies):
    """A total budget's proxies: K runs of one planned mechanism on one secret subset, then the planned final run.

    Made at create from the plan (:mod:`dptune.privacy.total_budget`), never from a study file's ``search``: the
    proxies' (q, σ_p, T) and the final run's σ_f are fixed before any run reads the data, and only what does not
    change the privacy (learning rate, clip norm, optimizer…) transfers from the best proxy.
    """

    name = "total"

    def describe(self) -> str:
        s = self.settings
        return (f"Planned before the search: {s['proxies']} proxies, each DP-SGD at q = {s['sampling_rate']:.4g}, "
                f"σ = {s['proxy_noise_multiplier']:.4g}, T = {s['steps']} on one secret random "
                f"{self.fraction:g} of the private training split, then one final run on all of it at the same q "
                f"and T with σ = {s['final_noise_multiplier']:.4g}, the best proxy's learning rate, clip norm and "
                "optimizer transferred.")

    def amplification(self, proxies: Sequence[FrozenTrial], rest: Sequence[Mechanism],
                      prior: Sequence[Mechanism], delta: float | None,
                      cap: dict[str, Any] | None) -> dict[str, Any] | None:
        """None: the plan's total is the regime's (:class:`dptune.search.regimes.TotalBudget`), fixed at create."""
        return None

    def transfer(self, full: Mapping[str, Any], epsilon: float, delta: float, accountant: str) -> tuple[int, float]:
        """The planned final run: the batch every proxy stood in for, and the planned σ_f (never recalibrated)."""
        return int(full[record.BATCH_SIZE]), float(self.settings["final_noise_multiplier"])


def planned_mode(plan: Mapping[str, Any], n_private: int, batch_size: int) -> dict[str, Any]:
    """The ``search_mode`` settings of a total budget's plan: what its proxies and final run need at run time."""
    keys = ("proxies", "fraction", "sampling_rate", "steps", "proxy_noise_multiplier", "final_noise_multiplier")
    return {"mode": PlannedProxies.name, "factor": None, "dataset": None, **{k: plan[k] for k in keys},
            "batch_size": batch_size, "n_private": n_private, "n_plan": n_private}


_MODES: dict[str, type[ProxyMode]] = {m.name: m for m in (PublicProxies, ScaledProxies, SubsetProxies,
                                                          PlannedProxies)}


def proxy_mode(settings: Mapping[str, Any]) -> ProxyMode:
    """The mode object of a study's ``search_mode`` settings (as stored, or a study file's before create).

    Raises:
      ConfigError: ``search.mode`` names no mode.
    """
    kind = _MODES.get(str(settings["mode"]))
    if kind is None:
        raise ConfigError("search.mode", f"{settings['mode']!r} is not one of {', '.join(_MODES)}")
    return kind(settings)
