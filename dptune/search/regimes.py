"""The privacy regimes a study runs under, as objects, and the one typed :class:`Guarantee` they state.

A study runs under exactly one regime, fixed at create and read back from its
record by :func:`regime_of`, the one place that tells them apart:

* :class:`NonPrivate`: no clipping, no noise, no guarantee.
* :class:`PerTrial`: every trial calibrated to the study's ε; the search's
  total is the composition of every trial that read the data, or, with a
  ``search_budget``, a Rényi filter's cap enforced before each trial.
* :class:`PrivateSearch`: a secret number K of trials of one calibrated
  mechanism, only the best released (Papernot & Steinke 2022).
* :class:`Tuning`: a cheaper-tuning mode (public, scaled or subset proxies,
  then one final run; :mod:`dptune.search.modes`).

Each regime answers four questions: what it records at create
(:meth:`Regime.check`), what a trial trains under (:meth:`Regime.plan`),
whether a planned trial may start (:meth:`Regime.admit`), and what releasing
the search's result costs over the records (:meth:`Regime.guarantee`). No JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune.errors import ConfigError, PrivacyError
from dptune.privacy import accounting, search_totals, total_budget
from dptune.privacy.mechanism import Mechanism
from dptune.privacy.search_totals import RenyiFilter, TrialCount
from dptune.search import modes, record
from dptune.search.record import StudyRecord
from dptune.search.spends import FINISHED, resumed_spends, touched_data

# Private-search figures that reveal K (or bound it): kept out of a release.
SECRET_COUNT_FIGURES = ("trials_drawn", "trials_run", "trials_touching_data", "internal_note")


@dataclass(frozen=True)
class Guarantee:
    """What releasing a search's result costs, and the figures behind it.

    ``figures`` is the guarantee as stored and printed (``dptune study show
    --json``, a model's metadata): the same keys for every study of a regime.
    The typed fields are what the summary, the statement, the release and the
    lineage read, so that none of them needs the regime's name.
    """

    epsilon: float
    delta: float | None
    text: str
    figures: Mapping[str, Any]
    private: bool = True
    # The accountant that produced ``epsilon``, as the statement names it.
    accountant: str = "rdp"
    per_trial_epsilon: float | None = None
    # The one mechanism every trial ran (a private search), for the statement.
    mechanism: Mechanism | None = None
    # A private search: K, the trial count and numbers are secret; the bound holds while they stay so.
    secret_count: bool = False
    # A cap enforced before each trial (a privacy filter), not a total computed after the fact.
    capped: bool = False
    valid: bool = True
    complete: bool = True
    # What a cap still admits (None without a cap).
    remaining: float | None = None
    # A cheaper-tuning mode's name (its proxies and final run are in ``figures``), else None.
    tuning: str | None = None
    # A total budget planned at create (proxies, final run, split) and enforced by the plan: a bound fixed in advance.
    planned: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.figures)

    def released(self) -> dict[str, Any]:
        """The figures that may be published with the result (a private search's K stays out)."""
        hidden = SECRET_COUNT_FIGURES if self.secret_count else ()
        return {k: v for k, v in self.figures.items() if k not in hidden}

    @property
    def bound(self) -> bool:
        """Whether ``epsilon`` is a bound fixed in advance (a lineage carries it instead of the runs alone)."""
        return self.capped or (self.secret_count and self.valid) or (self.planned and self.valid)

    @property
    def lists_runs(self) -> bool:
        """Whether a lineage may list the runs (not while their number is a valid private search's secret K)."""
        return not (self.secret_count and self.valid)


@dataclass(frozen=True)
class Terms:
    """What a trial trains under: its budget (ε, δ, accountant) and, if fixed, its (σ, T)."""

    budget: tuple[float, float, str] | None
    fixed: tuple[float, int] | None = None


@dataclass(frozen=True)
class CreateContext:
    """What a regime needs at create to check itself and say what it records."""

    delta: float | None
    prior: Sequence[Mechanism]
    dataset: str
    epsilon: float | None = None
    accountant: str | None = None
    cap: tuple[float, float | None] | None = None  # search_budget: (ε, order or None)
    draw_private_search: Callable[[], dict[str, Any]] | None = None
    plan_total: Callable[[], dict[str, Any]] | None = None  # a total budget's plan (raises if it cannot be met)


class Regime(Protocol):
    """One privacy regime: its create-time check, a trial's terms, admission, and the search's guarantee."""

    rec: StudyRecord
    private: bool  # False: no clipping, no noise, nothing claimed
    # The number of trials is secret (a private search): trial numbers, counts, per-trial progress and anything
    # that differs from trial to trial by its number stay internal.
    secret_count: bool

    def check(self, ctx: CreateContext) -> dict[str, Any]: ...

    @property
    def terms(self) -> Terms: ...

    def plan(self, trial_number: int) -> Terms: ...

    def admit(self, trial: optuna.Trial, run: Mechanism) -> str | None: ...

    def guarantee(self, trials: Sequence[FrozenTrial]) -> Guarantee: ...


class Skip(Exception):  # noqa: N818 - a control-flow signal, like optuna.TrialPruned
    """A trial that this regime does not run at all (a private search's trial past K)."""


@dataclass(frozen=True)
class _Spent:
    """The runs that read the data and their composition with a private initial checkpoint's."""

    touched: list[FrozenTrial]
    spends: list[Mechanism]
    totals: dict[str, float]
    prior_text: str

    @classmethod
    def of(cls, rec: StudyRecord, trials: Sequence[FrozenTrial]) -> _Spent:
        touched = [t for t in trials if touched_data(t)]
        spends = resumed_spends(trials, touched)
        totals = (search_totals.composed_epsilon([*rec.prior, *spends], rec.delta) if rec.delta
                  else {"rdp": math.nan, "pld": math.nan})
        prior_text = (f" It includes the recorded training of the initial checkpoint on the same data "
                      f"({len(rec.prior)} earlier run(s)).") if rec.prior else ""
        return cls(touched, spends, totals, prior_text)


@dataclass
class NonPrivate:
    """A non-private baseline: nothing is clipped or noised, and nothing is claimed."""

    rec: StudyRecord = field(default_factory=lambda: StudyRecord.read({}))
    private = False
    secret_count = False

    def check(self, ctx: CreateContext) -> dict[str, Any]:
        return record.regime_attrs(non_private=True)

    @property
    def terms(self) -> Terms:
        return Terms(None)

    def plan(self, trial_number: int) -> Terms:
        return self.terms

    def admit(self, trial: optuna.Trial, run: Mechanism) -> str | None:
        return None

    def guarantee(self, trials: Sequence[FrozenTrial]) -> Guarantee:
        text = "None: a non-private baseline (no clipping, no noise); its models must not be released as private."
        figures = {"mode": "non_private", "total_epsilon": math.inf, "delta": None, "per_trial_epsilon": None,
                   "guarantee": text}
        return Guarantee(math.inf, None, text, figures, private=False, accountant="none")


@dataclass
class PerTrial:
    """Every trial calibrated to the study's ε; a ``search_budget`` caps the whole search with a Rényi filter."""

    rec: StudyRecord
    private = True
    secret_count = False

    def filter(self) -> RenyiFilter | None:
        cap = self.rec.search_budget
        if cap is None or self.rec.delta is None:
            return None
        return RenyiFilter(cap["epsilon"], self.rec.delta, cap["order"])

    def check(self, ctx: CreateContext) -> dict[str, Any]:
        """The per-trial budget and the cap, refusing a cap that the initial checkpoint has already spent.

        Raises:
          ConfigError: ``search_budget.epsilon`` is spent by the initial checkpoint's recorded training.
        """
        assert ctx.delta is not None and ctx.epsilon is not None  # the schema requires a budget
        stored_cap = None
        if ctx.cap is not None:
            epsilon, order = ctx.cap
            order = order or search_totals.default_filter_order(epsilon, ctx.delta)
            filt = RenyiFilter(epsilon, ctx.delta, order)
            if not filt.admits(ctx.prior):
                raise ConfigError("search_budget.epsilon", f"{epsilon:g} is already spent by the init_checkpoint's "
                                  f"recorded training on {ctx.dataset!r} ({filt.spent(ctx.prior):.4g} at order "
                                  f"{order:.3g})")
            stored_cap = {"epsilon": epsilon, "order": order}
        return record.regime_attrs(epsilon_target=ctx.epsilon, accountant=ctx.accountant, search_budget=stored_cap)

    @property
    def terms(self) -> Terms:
        assert self.rec.epsilon_target is not None and self.rec.delta is not None
        return Terms((self.rec.epsilon_target, self.rec.delta, self.rec.accountant or "rdp"))

    def plan(self, trial_number: int) -> Terms:
        return self.terms

    def admit(self, trial: optuna.Trial, run: Mechanism) -> str | None:
        """The ``search_budget`` filter's decision (:func:`admit`); without a cap every trial starts."""
        filt = self.filter()
        return None if filt is None else admit(trial, run, filt, self.rec.prior)

    def guarantee(self, trials: Sequence[FrozenTrial]) -> Guarantee:
        spent = _Spent.of(self.rec, trials)
        totals, delta = spent.totals, self.rec.delta
        accounted = (f"Composition of the {len(spent.spends)} trial(s) that trained on the data, each at the steps "
                     f"it took (RDP): ε = {totals['rdp']:.4g}.{spent.prior_text}")
        filt = self.filter()
        if filt is None:
            text = (f"{accounted} Releasing the best model after the search is covered by this total, not by the "
                    "per-trial ε. It was computed after the search, over trials whose number and lengths depended "
                    "on what was seen: an accounting of what ran, not a guarantee fixed in advance (set "
                    "search_budget in the study file to enforce a cap before each trial).")
            figures = {"mode": "composition", "total_epsilon": totals["rdp"],
                       "total_epsilon_pld_if_nonadaptive": totals["pld"], "delta": delta,
                       "per_trial_epsilon": self.rec.epsilon_target, "trials_touching_data": len(spent.touched),
                       "guarantee": text}
            return Guarantee(totals["rdp"], delta, text, figures, per_trial_epsilon=self.rec.epsilon_target)
        admitted = [r for t in spent.touched if (r := record.filter_request(t)) is not None]
        used = filt.spent([*self.rec.prior, *admitted])
        text = (f"Pre-committed: a privacy filter (Feldman & Zrnic 2021, Rényi order {filt.order:.3g}) started a "
                f"trial only if the whole search stayed within ε = {filt.epsilon:g}, so releasing the best model "
                f"(and anything else from the search) is ({filt.epsilon:g}, {filt.delta:g})-DP whatever was chosen "
                f"while watching. {accounted}")
        figures = {"mode": "filter", "total_epsilon": filt.epsilon, "accounted_epsilon": totals["rdp"],
                   "filter_epsilon": used, "filter_order": filt.order, "delta": delta,
                   "per_trial_epsilon": self.rec.epsilon_target, "trials_touching_data": len(spent.touched),
                   "guarantee": text}
        return Guarantee(filt.epsilon, delta, text, figures, per_trial_epsilon=self.rec.epsilon_target,
                         capped=True, remaining=max(0.0, filt.epsilon - used))


@dataclass
class PrivateSearch:
    """A secret number K of trials, each the one calibrated mechanism, only the best released."""

    rec: StudyRecord
    private = True
    secret_count = True

    @property
    def settings(self) -> dict[str, Any]:
        assert self.rec.private_search is not None
        return self.rec.private_search

    @property
    def mechanism(self) -> Mechanism:
        p = self.settings
        return Mechanism(float(p["sampling_rate"]), float(p["noise_multiplier"]), int(p["steps"]))

    def check(self, ctx: CreateContext) -> dict[str, Any]:
        assert ctx.draw_private_search is not None  # the driver draws K from secret randomness
        return record.regime_attrs(private_search=ctx.draw_private_search())

    def plan(self, trial_number: int) -> Terms:
        """Every trial runs the calibrated mechanism, its own ε (RDP) the trainer's cap.

        Raises:
          Skip: the trial is numbered K or later. Optuna numbers trials atomically in the storage, so however
            many workers or machines share the study, only trials 0 … K−1 ever reach the data.
        """
        if trial_number >= int(self.settings["n_trials"]):
            raise Skip("every trial of the private search has started")
        return self.terms

    @property
    def terms(self) -> Terms:
        p, delta = self.settings, self.rec.delta
        assert delta is not None
        return Terms((p["per_trial_epsilon"], delta, "rdp"), (p["noise_multiplier"], p["steps"]))

    def admit(self, trial: optuna.Trial, run: Mechanism) -> str | None:
        return None

    def guarantee(self, trials: Sequence[FrozenTrial]) -> Guarantee:
        p, delta = self.settings, self.rec.delta
        spent = _Spent.of(self.rec, trials)
        k, touched = int(p["n_trials"]), spent.touched
        exceeded = len(touched) > k or any(t.number >= k for t in touched)
        settled = [t for t in trials if t.number < k and t.state in (*FINISHED, TrialState.FAIL)]
        complete = not exceeded and len(settled) == k
        validation = self.rec.validation_dataset
        base = {"mode": "private_search", "delta": delta, "per_trial_epsilon": p["per_trial_epsilon"],
                "sampling_rate": p["sampling_rate"], "noise_multiplier": p["noise_multiplier"], "steps": p["steps"],
                "complete": complete, "valid": not exceeded, "trials_drawn": k, "trials_run": len(touched),
                "trials_touching_data": len(touched), "validation_dataset": validation}
        if exceeded:
            total = spent.totals["rdp"]
            text = (f"EXCEEDED, INVALID: {len(touched)} trials trained on the data, more than the secretly drawn "
                    "number, so the repeat-and-select bound does not hold. The honest figure is the composition of "
                    f"every trial that trained on the data (RDP): ε = {total:.4g}.{spent.prior_text}")
        else:
            assert delta is not None
            m = self.mechanism
            total = search_totals.search_epsilon(m.sampling_rate, m.noise_multiplier, m.steps, delta,
                                                 TrialCount(p["distribution"], p["mean_trials"], p.get("eta")),
                                                 self.rec.prior)
            text = self._bound_text(validation, complete, spent.prior_text)
        figures = {**base, "total_epsilon": total, "guarantee": text}
        return Guarantee(total, delta, text, figures, per_trial_epsilon=p["per_trial_epsilon"],
                         mechanism=self.mechanism, secret_count=True, valid=not exceeded, complete=complete)

    def _bound_text(self, validation: str | None, complete: bool, prior_text: str) -> str:
        p = self.settings
        held_out = (f"selection on the public dataset {validation!r}" if validation else
                    "selection on a validation split of the private dataset declared public (a study of an earlier "
                    "dptune; that split is not covered)")
        return (f"Papernot & Steinke 2022 (RDP): a secret number K of trials drawn from a {p['distribution']} "
                f"law of mean {p['mean_trials']:g}, hyperparameters drawn at random from secret randomness, every "
                f"trial the same DP-SGD mechanism, only the best released, {held_out}. The bound holds while K "
                "stays secret: the trial count, trial numbers and the study storage are internal."
                + prior_text + ("" if complete else " Incomplete: trials remain; run dptune optimize until the "
                                "search is complete before releasing the result."))


@dataclass
class Tuning(PerTrial):
    """A cheaper-tuning mode: proxies (public, scaled or subset), then one final run on all of the data.

    What differs between the modes (their create checks, proxies, statement, amplification and transfer) is the
    mode object's (:func:`dptune.search.modes.proxy_mode`); as a regime, a mode is a per-trial budget (the final
    run's) whose guarantee composes every run that read the private data.
    """

    def _composed(self, trials: Sequence[FrozenTrial]) -> tuple[_Spent, list[list[Mechanism]], dict[str, Any]]:
        """What ran, the proxies' spends apart from the runs on all of the data, and the mode's figures."""
        spent = _Spent.of(self.rec, trials)
        # The proxies apart from the runs on all of the data: subset tuning amplifies only the former.
        proxies = [t for t in spent.touched if record.is_proxy(t)]
        split = (resumed_spends(trials, proxies),
                 resumed_spends(trials, [t for t in spent.touched if not record.is_proxy(t)]))
        g = modes.guarantee(self.rec, trials, spent.spends, list(self.rec.prior), spent.totals, spent.prior_text,
                            split, proxies)
        return spent, list(split), g

    def guarantee(self, trials: Sequence[FrozenTrial]) -> Guarantee:
        mode = self.rec.search_mode
        assert mode is not None
        _, split, g = self._composed(trials)
        amplified = g.get("subset_amplification") or {}
        claimed = bool(amplified.get("claimed")) and g["total_epsilon"] == amplified.get("total")
        accountant = _amplified_accountant(split[1], self.rec.prior) if claimed else g["accountant"]
        return Guarantee(g["total_epsilon"], g["delta"], g["guarantee"], g, accountant=accountant,
                         per_trial_epsilon=g["per_trial_epsilon"], tuning=mode["mode"])


@dataclass
class TotalBudget(Tuning):
    """A total ε for the released model, tuning included, planned at create and enforced by the plan.

    K proxies of one mechanism on a secret subset, then one final run (:mod:`dptune.privacy.total_budget`); a
    proxy numbered K or later is skipped, so however many workers share the study, at most K proxies read the
    data (Optuna numbers trials atomically), and finalize trains at most one final run.
    """

    @property
    def settings(self) -> dict[str, Any]:
        assert self.rec.total_budget is not None
        return self.rec.total_budget

    def check(self, ctx: CreateContext) -> dict[str, Any]:
        assert ctx.plan_total is not None  # the driver plans from the data's size and the space
        return record.regime_attrs(total_budget=ctx.plan_total())

    def _own(self, m: Mechanism) -> tuple[float, float, str]:
        """A run's own budget for the trainer: exactly its planned steps (RDP), at the study's δ."""
        delta = self.rec.delta
        assert delta is not None
        return (accounting.epsilon(m.sampling_rate, m.noise_multiplier, m.steps, delta, "rdp"),
                delta, "rdp")

    @property
    def terms(self) -> Terms:
        m = total_budget.proxy_mechanism(self.settings)
        return Terms(self._own(m), (m.noise_multiplier, m.steps))

    @property
    def final_terms(self) -> tuple[float, float, str]:
        return self._own(total_budget.final_mechanism(self.settings))

    def plan(self, trial_number: int) -> Terms:
        """A proxy's terms (the planned mechanism).

        Raises:
          Skip: the proxy is numbered K or later: the plan holds K proxies, whatever the workers.
        """
        if trial_number >= int(self.settings["proxies"]):
            raise Skip("every proxy of the total budget's plan has started")
        return self.terms

    def admit(self, trial: optuna.Trial, run: Mechanism) -> str | None:
        return None

    def guarantee(self, trials: Sequence[FrozenTrial]) -> Guarantee:
        p, delta = self.settings, self.rec.delta
        spent, _, g = self._composed(trials)
        beyond = _beyond_plan(p, self.rec.search_mode or {}, spent.touched)
        if not beyond:
            try:
                parts = total_budget.verified(p, self.rec.prior, delta)
            except PrivacyError as e:
                beyond = f"the stored plan does not hold ({e})"
        if beyond:
            total, accountant = spent.totals["rdp"], "rdp"
            text = (f"EXCEEDED, INVALID: {beyond}, beyond the total budget's plan, so its bound does not hold. The "
                    f"honest figure is the composition of every run that trained on the data (RDP): "
                    f"ε = {total:.4g}.{spent.prior_text}")
        else:
            total, accountant = float(p["total_epsilon"]), _planned_accountant(self.rec.prior)
            text = _planned_text({**p, "parts": parts}, delta, g["finalized"], spent.prior_text)
        figures = {**g, "mode": "total_budget", "total_epsilon": total, "accountant": accountant,
                   "planned": {k: v for k, v in p.items()}, "valid": not beyond, "guarantee": text}
        return Guarantee(total, delta, text, figures, accountant=accountant,
                         mechanism=total_budget.final_mechanism(p), valid=not beyond,
                         complete=bool(g["finalized"]), tuning="total", planned=True)


def _beyond_plan(plan: Mapping[str, Any], mode: Mapping[str, Any], touched: Sequence[FrozenTrial]) -> str | None:
    """What ran on the data that the plan does not hold (None: nothing)."""
    k, proxy, final = (int(plan["proxies"]), total_budget.proxy_mechanism(plan),
                       total_budget.final_mechanism(plan))
    # The runs read their settings from the search mode's copy of the plan (the subset's γ among them).
    differ = sorted(key for key in plan if key in mode and mode[key] != plan[key])
    if differ:
        return f"the search mode's {', '.join(differ)} differ from the plan's"
    proxies = [t for t in touched if record.is_proxy(t)]
    finals = [t for t in touched if record.is_final(t)]
    if len(proxies) > k or any(t.number >= k for t in proxies):
        return f"{len(proxies)} proxies trained on the data (numbers up to {max(t.number for t in proxies)})"
    if len(finals) > 1:
        return f"{len(finals)} final runs trained on the data"
    if len(proxies) + len(finals) < len(touched):
        return "a run that is neither a planned proxy nor the final run (an audit?) trained on the data"
    subsets = {record.get(t, record.SUBSET_ID) for t in proxies}
    if len(subsets) > 1 or None in subsets:
        return "the proxies read more than one subset (or one without a recorded subset)"
    for t, planned in [*((t, proxy) for t in proxies), *((t, final) for t in finals)]:
        m = record.spend_of(t, finished=False) or record.own_run(t)
        if (not math.isclose(m.sampling_rate, planned.sampling_rate) or
                not math.isclose(m.noise_multiplier, planned.noise_multiplier) or m.steps > planned.steps):
            return f"trial {t.number} ran ({m.sampling_rate:.4g}, {m.noise_multiplier:.4g}, {m.steps}), not the plan's"
    return None


def _planned_accountant(prior: Sequence[Mechanism]) -> str:
    """PLD for the proxies and the final run; a private initial checkpoint's training adds an RDP part."""
    return "pld + rdp" if [r for r in prior if r[2] > 0] else "pld"


def _planned_text(p: Mapping[str, Any], delta: float | None, finalized: bool, prior_text: str) -> str:
    parts = p["parts"]
    prior = f", the initial checkpoint's training {parts['prior']:.4g}" if parts.get("prior") else ""
    return (f"({p['total_epsilon']:g}, {delta:g})-DP for the released model, tuning included: a total budget "
            f"planned at create, before any run read the data, and enforced by the plan. Split: tuning "
            f"{parts['tuning']:.4g} ({p['tuning_share']:g} of the total; {p['proxies']} proxies, each DP-SGD at "
            f"q = {p['sampling_rate']:.4g}, σ = {p['proxy_noise_multiplier']:.4g}, T = {p['steps']} on one secret "
            f"random {p['fraction']:g} of the training split: ε' = {parts['tuning_on_subset']:.4g} on the subset "
            f"(PLD, adaptive composition of one fixed mechanism), amplified by the subsampling), final run "
            f"{parts['final']:.4g} (DP-SGD at q = {p['sampling_rate']:.4g}, σ = {p['final_noise_multiplier']:.4g}, "
            f"T = {p['steps']} on all of the data, PLD){prior}; the parts add up (basic composition, δ split "
            f"evenly) to {parts['total']:.4g} ≤ {p['total_epsilon']:g}. Proxies past the first {p['proxies']} are "
            "skipped whatever the number of workers, and one final run is trained; what the proxies tell (their "
            "count, hyperparameters and scores) is covered as far as the training examples go. The validation and "
            "test examples that rank the proxies, prune them and score the released model are not covered: they "
            "are treated as public." + prior_text
            + ("" if finalized else " Not finalized: no model is released until `dptune study finalize` has run."))


def _amplified_accountant(on_all_data: Sequence[Mechanism], prior: Sequence[Mechanism]) -> str:
    """The accountants behind an amplified subset total, part by part (:func:`search_totals.subset_tuning_epsilon`).

    The proxies' cap is a Rényi filter's (RDP); the runs on all of the data, and a private initial checkpoint's
    training, are each one part, composed with PLD when the part is a single run and with RDP otherwise.
    """
    def of(runs: Sequence[Mechanism]) -> str:
        return "pld" if len([r for r in runs if r[2] > 0]) == 1 else "rdp"

    text = f"rdp (proxies' cap, amplified by subsampling) + {of(on_all_data)} (runs on all of the data)"
    ran = [r for r in prior if r[2] > 0]  # runs of no step are no part of the total
    return text + (f" + {of(ran)} (the initial checkpoint's training)" if ran else "")


def admit(trial: optuna.Trial, request: Mechanism, filt: RenyiFilter, prior: Sequence[Mechanism] = ()) -> str | None:
    """The privacy filter: None if a run of ``request`` may start within the cap, else why not.

    Each trial writes its request before reading the others', so of two
    trials deciding at the same time at least the later reader counts the
    other: concurrent workers cannot both squeeze under the cap. Requests of
    trials still running are counted whether or not they were admitted yet
    (conservative); every admitted trial counts at its planned steps, which
    also covers pruning. Used for the search's trials and for audit runs
    (:mod:`dptune.search.audit`), which train on the same data.
    """
    trial.set_user_attr(record.FILTER_REQUEST, list(request))
    others = []
    for t in trial.study.get_trials(deepcopy=False):
        asked, admitted = record.filter_request(t), record.get(t, record.FILTER_ADMITTED)
        if t.number == trial.number or t.state == TrialState.WAITING or asked is None or admitted is False:
            continue
        if t.state == TrialState.RUNNING or admitted or record.get(t, record.TOUCHED_DATA):
            others.append(asked)
    runs = [*prior, *others, Mechanism(*request)]
    if not filt.admits(runs):
        reason = (f"search_budget: starting this trial would take the search to ε = "
                  f"{filt.spent(runs):.4g} > {filt.epsilon:g} (privacy filter at Rényi order "
                  f"{filt.order:.3g}); the search stops here")
        record.set_all(trial, {record.FILTER_ADMITTED: False, **record.rejected_attrs(reason)})
        return reason
    trial.set_user_attr(record.FILTER_ADMITTED, True)
    return None


def regime_of(rec: StudyRecord) -> Regime:
    """The regime a study was created under, from its record (older studies included)."""
    if rec.non_private:
        return NonPrivate(rec)
    if rec.total_budget is not None:
        return TotalBudget(rec)
    if rec.private_search is not None:
        return PrivateSearch(rec)
    if rec.search_mode is not None:
        return Tuning(rec)
    return PerTrial(rec)


def regime_for_config(cfg: Any) -> Regime:
    """The regime a study file (a :class:`~dptune.config.schema.StudyConfig`) asks for, before the study exists.

    A mode's regime checks itself as a per-trial budget does (its cap, if any, is the proxies').
    """
    empty = StudyRecord.read({})
    if cfg.non_private:
        return NonPrivate(empty)
    if cfg.privacy is not None and cfg.privacy.total:
        return TotalBudget(empty)
    if cfg.private_search:
        return PrivateSearch(empty)
    if cfg.search is not None:
        return Tuning(empty)
    return PerTrial(empty)


def study_guarantee(study: optuna.Study) -> Guarantee:
    """The guarantee of releasing a study's result after the search as it ran."""
    return regime_of(StudyRecord.of(study)).guarantee(study.get_trials(deepcopy=False))
