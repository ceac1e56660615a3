"""What a study holds, read from its storage: summaries, trial records, the search's privacy guarantee.

No JAX and nothing that trains: :mod:`dptune.inspect` (dashboard, report,
export) and ``dptune study show`` read through this module. The names of the
trial attributes that the objective writes and these functions read are
defined once here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune.config.schema import is_import_path
from dptune.privacy import search_totals as search_privacy
from dptune.privacy.search_totals import RenyiFilter, TrialCount
from dptune.privacy.statement import COVERAGE, USER_CODE, Mechanism, Statement
from dptune.search import modes, record
from dptune.search.record import StudyRecord
from dptune.search.spends import FINISHED, resumed_spends, touched_data
from dptune.search.spends import attempt_origin as attempt_origin  # read here by older callers
from dptune.search.storage import open_storage

CONFIG_ATTR = record.CONFIG  # kept for importers of the old name


def fmt(v: Any, digits: int = 4, missing: str = "-") -> str:
    """A recorded value for people: floats to ``digits`` significant digits, None and NaN as ``missing``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class StudySummary:
    name: str
    epsilon_target: float
    delta: float
    accountant: str
    n_trials: int
    complete: int
    pruned: int
    rejected: int
    failed: int
    running: int
    trial_steps: int
    examples_processed: int
    best: dict[str, Any] | None
    search: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @property
    def non_private(self) -> bool:
        return self.search.get("mode") == "non_private"

    @property
    def private_search(self) -> bool:
        return self.search.get("mode") == "private_search"

    @property
    def budget_text(self) -> str:
        """The per-trial budget in words ("ε = 3 per trial (δ = 1e-05, pld)" or "non-private")."""
        if self.non_private:
            return "non-private (no clipping, no noise: no privacy)"
        return f"ε = {self.epsilon_target:.4g} per trial (δ = {self.delta:g}, {self.accountant})"

    def release(self) -> dict[str, Any]:
        """What may be published with the best model.

        For a private search the bound holds only while K stays secret, so the
        trial count, the trial numbers and anything that adds up over trials
        (trial-steps, examples) are left out; the rest of the summary is internal.
        For other studies the guarantee covers every trial, and this is the whole summary.
        """
        if not self.private_search:
            return self.as_dict()
        # The selection-adjusted interval counts every validation reading, which bounds K.
        internal = {"val_accuracy_interval_selection", "validation_readings", "number", "trial_id",
                    "datetime_start", "datetime_complete", "intermediate_values", *record.K_REVEALING}
        best = None if self.best is None else {k: v for k, v in self.best.items() if k not in internal}
        search = {k: v for k, v in self.search.items() if k not in PRIVATE_SEARCH_INTERNAL}
        return {"name": self.name, "epsilon_target": self.epsilon_target, "delta": self.delta,
                "accountant": self.accountant, "best": best, "search": search}


# Private-search figures that reveal K (or bound it): kept out of the release.
PRIVATE_SEARCH_INTERNAL = ("trials_drawn", "trials_run", "trials_touching_data", "internal_note")


def accuracy_interval(accuracy: float | None, n: int, comparisons: int = 1, level: float = 0.95) -> tuple[float, float]:
    """A Wilson score interval for an accuracy measured on ``n`` examples, Bonferroni-adjusted for selection.

    The best trial is the maximum of many noisy validation readings: its score
    is biased upwards (the winner's curse), by more the smaller the validation
    split and the more readings were compared. With ``comparisons`` = m, the
    interval is taken at level 1 − (1 − level)/m, so that it holds for all m
    readings at once and hence for the selected one.

    Args:
      accuracy: the measured accuracy in [0, 1].
      n: the number of validation examples it was measured on.
      comparisons: how many readings the selection took the best of (≥ 1).
      level: the coverage of the interval.

    Returns:
      (low, high), or (nan, nan) when ``n`` or ``accuracy`` is unknown.
    """
    if not n or n < 1 or accuracy is None or not math.isfinite(accuracy):
        return math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(1 - (1 - level) / (2 * max(1, comparisons)))
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_text(best: dict[str, Any], private_search: bool) -> str:
    """The winner's curse in words: the chosen validation score's 95% interval, alone and allowing for selection.

    A private search gets only the unadjusted interval: the number of readings would bound its secret K.
    """
    low, high = best.get("val_accuracy_interval") or (math.nan, math.nan)
    text = f"validation 95% interval {fmt(low)}–{fmt(high)} (Wilson, one reading)"
    if not private_search and best.get("val_accuracy_interval_selection"):
        slow, shigh = best["val_accuracy_interval_selection"]
        text += (f"; {fmt(slow)}–{fmt(shigh)} allowing for the selection among {best.get('validation_readings')} "
                 "readings (Bonferroni): expect the test accuracy lower than the headline validation score")
    return text


def shown(study: optuna.Study, row: dict[str, Any]) -> dict[str, Any]:
    """A trial's record (or export row) as the study may show it: a mode study's without timings
    (:data:`dptune.search.modes.TIMING_ATTRS`: they follow the realised batches, on a secret subset too)."""
    return modes.without_timings(row) if StudyRecord.of(study).search_mode is not None else row


def shown_record(study: optuna.Study, t: FrozenTrial) -> dict[str, Any]:
    """:func:`trial_record` as the study may show it (:func:`shown`)."""
    return shown(study, trial_record(t))


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    """A flat, JSON-ready description of one trial."""
    return {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": dict(t.params),
        **{k: v for k, v in t.user_attrs.items()},
        "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
    }


def coverage(study: optuna.Study) -> str:
    """One plain sentence on which examples the study's ε protects."""
    public = StudyRecord.of(study).validation_dataset
    if public:
        return (f"The ε covers the training examples only: validation examples come from the separate dataset "
                f"{public!r}, treated as public, and the test examples used to report are not protected by it.")
    return COVERAGE


def search_guarantee(study: optuna.Study) -> dict[str, Any]:
    """The ε of releasing the best trial's model after the search as it ran.

    Ordinary studies: the composition of every trial that touched the training
    data (RDP), each at the steps it took; a trial that failed or is still
    running counts at its planned steps, an upper bound. With ``search_budget``
    a privacy filter enforced the cap before each trial: the cap is the
    guarantee. Private searches: the repeat-and-select bound, valid once all
    of the K drawn trials have run and no more than K touched the data; if more
    did, the bound is void and the composition of all of them is given instead.
    Every mode composes a private ``init_checkpoint``'s recorded spend.
    """
    trials = study.get_trials(deepcopy=False)
    rec = StudyRecord.of(study)
    delta, private, prior = rec.delta, rec.private_search, list(rec.prior)
    prior_text = (f" It includes the recorded training of the initial checkpoint on the same data "
                  f"({len(prior)} earlier run(s)).") if prior else ""
    if rec.non_private:
        return {"mode": "non_private", "total_epsilon": math.inf, "delta": None, "per_trial_epsilon": None,
                "guarantee": "None: a non-private baseline (no clipping, no noise); its models must not be released "
                             "as private."}
    touched = [t for t in trials if touched_data(t)]
    spends = resumed_spends(trials, touched)
    totals = (search_privacy.composed_epsilon(prior + spends, delta) if delta
              else {"rdp": math.nan, "pld": math.nan})
    if private is not None:
        k = int(private["n_trials"])
        exceeded = len(touched) > k or any(t.number >= k for t in touched)
        settled = [t for t in trials if t.number < k and t.state in (*FINISHED, TrialState.FAIL)]
        complete = not exceeded and len(settled) == k
        validation = rec.validation_dataset
        base = {
            "mode": "private_search", "delta": delta, "per_trial_epsilon": private["per_trial_epsilon"],
            "sampling_rate": private["sampling_rate"], "noise_multiplier": private["noise_multiplier"],
            "steps": private["steps"], "complete": complete, "valid": not exceeded,
            "trials_drawn": k, "trials_run": len(touched), "trials_touching_data": len(touched),
            "validation_dataset": validation,
        }
        if exceeded:
            return {**base, "total_epsilon": totals["rdp"], "guarantee": (
                f"EXCEEDED, INVALID: {len(touched)} trials trained on the data, more than the secretly drawn number, "
                "so the repeat-and-select bound does not hold. The honest figure is the composition of every trial "
                f"that trained on the data (RDP): ε = {totals['rdp']:.4g}.{prior_text}")}
        total = search_privacy.search_epsilon(private["sampling_rate"], private["noise_multiplier"],
                                              int(private["steps"]), cast(float, delta), _trial_count_of(private),
                                              prior)
        held_out = (f"selection on the public dataset {validation!r}" if validation else
                    "selection on a validation split of the private dataset declared public (a study of an earlier "
                    "dptune; that split is not covered)")
        return {**base, "total_epsilon": total, "guarantee": (
            f"Papernot & Steinke 2022 (RDP): a secret number K of trials drawn from a {private['distribution']} "
            f"law of mean {private['mean_trials']:g}, hyperparameters drawn at random from secret randomness, every "
            f"trial the same DP-SGD mechanism, only the best released, {held_out}. The bound holds while K stays "
            "secret: the trial count, trial numbers and the study storage are internal."
            + prior_text + ("" if complete else " Incomplete: trials remain; run dptune optimize until the search "
                            "is complete before releasing the result."))}
    if rec.search_mode is not None:
        # The proxies apart from the runs on all of the data: subset tuning amplifies only the former.
        proxies = [t for t in touched if modes.is_proxy(t)]
        split = (resumed_spends(trials, proxies), resumed_spends(trials, [t for t in touched if not modes.is_proxy(t)]))
        return modes.guarantee(rec, trials, spends, prior, totals, prior_text, split, proxies)
    cap = rec.search_budget
    accounted = (f"Composition of the {len(spends)} trial(s) that trained on the data, each at the steps it took "
                 f"(RDP): ε = {totals['rdp']:.4g}.{prior_text}")
    if cap is not None:
        admitted = [r for t in touched if (r := record.filter_request(t)) is not None]
        filt = RenyiFilter(cap["epsilon"], cast(float, delta), cap["order"])
        return {
            "mode": "filter", "total_epsilon": cap["epsilon"], "accounted_epsilon": totals["rdp"],
            "filter_epsilon": filt.spent(prior + admitted),
            "filter_order": cap["order"], "delta": delta, "per_trial_epsilon": rec.epsilon_target,
            "trials_touching_data": len(touched),
            "guarantee": (
                f"Pre-committed: a privacy filter (Feldman & Zrnic 2021, Rényi order {cap['order']:.3g}) started a "
                f"trial only if the whole search stayed within ε = {cap['epsilon']:g}, so releasing the best model "
                f"(and anything else from the search) is ({cap['epsilon']:g}, {delta:g})-DP whatever was chosen while "
                f"watching. {accounted}"),
        }
    return {
        "mode": "composition",
        "total_epsilon": totals["rdp"],
        "total_epsilon_pld_if_nonadaptive": totals["pld"],
        "delta": delta,
        "per_trial_epsilon": rec.epsilon_target,
        "trials_touching_data": len(touched),
        "guarantee": (
            f"{accounted} Releasing the best model after the search is covered by this total, not by the per-trial "
            "ε. It was computed after the search, over trials whose number and lengths depended on what was seen: "
            "an accounting of what ran, not a guarantee fixed in advance (set search_budget in the study file to "
            "enforce a cap before each trial)."
        ),
    }


def _trial_count_of(private: dict[str, Any]) -> TrialCount:
    return TrialCount(private["distribution"], private["mean_trials"], private.get("eta"))


def privacy_statement(study: optuna.Study, summary: StudySummary | None = None) -> Statement | None:
    """The written statement of releasing the best model after this search (None for non-private studies)."""
    summary = summary or summarize(study)
    g = summary.search
    if summary.non_private:
        return None
    rec = StudyRecord.of(study)
    cfg, split = rec.study_config, rec.split or {}
    mechanism = None
    if g["mode"] == "private_search":
        mechanism = Mechanism(g["sampling_rate"], g["noise_multiplier"], int(g["steps"]))
    validation = coverage(study)
    assumptions = []
    public = (cfg.get("search") or {}).get("dataset")
    if any(is_import_path(cfg.get(k)) for k in ("model", "dataset", "loss")) or is_import_path(public):
        assumptions.append(USER_CODE)
    if public:
        checked = (rec.search_mode or {}).get("content_checked")
        assumptions.append(f"the public tuning dataset {public!r} holds none of the individuals of the training "
                           "data (" + ("dptune refused it only if it shared the name or an input identical to a "
                                       "training input" if checked else "not compared example by example (a record "
                                       "dataset, or another input shape); dptune refused it only if it shared the "
                                       "name") + ")")
    if cfg.get("validation_dataset"):
        assumptions.append(f"the validation dataset {cfg['validation_dataset']!r} holds none of the individuals of "
                           "the training data")
    if cfg.get("init_checkpoint"):
        assumptions.append("the initial checkpoint's recorded lineage is true and names its data as this study "
                           "does (a checkpoint without dptune metadata, or trained on differently named data that "
                           "holds the same individuals, is treated as trained on public data)")
        if cfg.get("unsafe_ignore_checkpoint_provenance"):
            assumptions.append("UNSAFE: the initial checkpoint's provenance was ignored on request, so what it "
                               "learnt from this data is not covered")
    accountant = "rdp" if g["mode"] in ("private_search", "composition", "filter") else summary.accountant
    if g.get("search_mode"):  # issue #20: what the mode's total was computed with
        amplified = g.get("subset_amplification") or {}
        accountant = ("rdp (proxies' cap, amplified by subsampling)" if amplified.get("claimed") and
                      g["total_epsilon"] == amplified.get("total") else g.get("accountant", accountant))
    return Statement(
        epsilon=g["total_epsilon"], delta=g["delta"], accountant=accountant,
        dataset=cfg.get("dataset"), dataset_size=split.get("train"), mechanism=mechanism,
        search=g["guarantee"],
        validation=validation,
        seed_fixed=rec.seed_fixed or cfg.get("private_seed") is not None,
        extra_assumptions=tuple(assumptions),
    )


def summarize(study: optuna.Study) -> StudySummary:
    """Counts, compute spent (trial-steps) and the best completed trial."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    rec = StudyRecord.of(study)
    rejected = sum(1 for t in trials if t.state == TrialState.PRUNED and record.is_rejected(t))
    skipped = sum(1 for t in trials if record.is_skipped(t))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = trial_record(max(complete, key=lambda t: cast(float, t.value))) if complete else None
    if rec.search_mode is not None:
        # What a mode releases is its final run, never a proxy.
        final = modes.final_trial(trials)
        # Timings would say how large the secret subset its proxies trained on was.
        best = None if final is None else shown_record(study, final)
    if best is not None:
        # The winner's curse: how far the chosen trial's validation score may be from its true accuracy.
        n_val = rec.n_validation
        score = best.get("val_accuracy") if best.get("value") is None else best["value"]
        # A mode's final run inherits the selection its proxies made on the same validation split: count theirs.
        readings = sum(max(1, len(t.intermediate_values)) for t in complete)
        best["val_accuracy_interval"] = list(accuracy_interval(score, n_val))
        best["val_accuracy_interval_selection"] = list(accuracy_interval(score, n_val, readings))
        best["validation_readings"] = readings
    return StudySummary(
        name=study.study_name,
        epsilon_target=math.nan if rec.epsilon_target is None else rec.epsilon_target,
        delta=rec.delta or math.nan,
        accountant=rec.accountant or "?",
        n_trials=len(trials) - skipped,
        complete=len(complete),
        pruned=states.count(TrialState.PRUNED) - rejected - skipped,
        rejected=rejected,
        failed=states.count(TrialState.FAIL),
        running=states.count(TrialState.RUNNING),
        trial_steps=record.total(trials, record.STEPS),
        examples_processed=record.total(trials, record.EXAMPLES_PROCESSED),
        best=best,
        search=search_guarantee(study),
    )


def creation(study: optuna.Study, storage: str) -> dict[str, Any]:
    """What ``dptune study create`` reports of a new study; a private search's drawn K is left out (it is secret)."""
    rec = StudyRecord.of(study)
    private = rec.private_search
    return {"study_name": study.study_name, "storage": storage,
            "epsilon": rec.epsilon_target, "delta": rec.delta,
            "trials": None if private else len(study.trials),
            "private_search": None if private is None else {k: v for k, v in private.items() if k != "n_trials"}}


def list_studies(storage: str) -> list[dict[str, Any]]:
    """One row per study in ``storage``."""
    rows = []
    for s in optuna.get_all_study_summaries(open_storage(storage, create=False), include_best_trial=True):
        rec = StudyRecord.of(s)
        private = rec.private_search
        rows.append({
            "name": s.study_name,
            # A private search's trial count is its secret K; its ε is the search total.
            "trials": None if private else s.n_trials,
            "best_value": s.best_trial.value if s.best_trial else None,
            "epsilon_target": private["total_epsilon"] if private else rec.epsilon_target,
            "dataset": rec.study_config.get("dataset"),
            "dptune": rec.is_dptune,
        })
    return rows
