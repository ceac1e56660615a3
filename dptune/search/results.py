"""What a study holds, read from its storage: summaries, trial records, the search's privacy guarantee.

No JAX and nothing that trains: :mod:`dptune.inspect` (dashboard, report,
export) and ``dptune study show`` read through this module. The storage keys
are :mod:`dptune.search.record`'s; the guarantee is the study's regime's
(:mod:`dptune.search.regimes`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune.config.schema import is_import_path
from dptune.privacy.statement import COVERAGE, USER_CODE, Statement
from dptune.search import modes, record
from dptune.search.record import StudyRecord
from dptune.search.regimes import SECRET_COUNT_FIGURES, Guarantee, regime_of, study_guarantee

# Read here by older callers (the driver, the pool, the release).
from dptune.search.spends import FINISHED as FINISHED
from dptune.search.spends import attempt_origin as attempt_origin
from dptune.search.spends import resumed_spends as resumed_spends
from dptune.search.spends import touched_data as touched_data
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
    guarantee: Guarantee = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        out = self.__dict__.copy()
        del out["guarantee"]  # its figures are ``search``
        return out

    @property
    def non_private(self) -> bool:
        return not self.guarantee.private

    @property
    def private_search(self) -> bool:
        return self.guarantee.secret_count

    @property
    def budget_text(self) -> str:
        """The per-trial budget in words ("ε = 3 per trial (δ = 1e-05, pld)" or "non-private")."""
        if self.non_private:
            return "non-private (no clipping, no noise: no privacy)"
        if self.guarantee.planned:
            return (f"ε = {self.epsilon_target:.4g} in all for the released model, tuning included (δ = "
                    f"{self.delta:g}, planned at create)")
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
        search = self.guarantee.released()
        return {"name": self.name, "epsilon_target": self.epsilon_target, "delta": self.delta,
                "accountant": self.accountant, "best": best, "search": search}


PRIVATE_SEARCH_INTERNAL = SECRET_COUNT_FIGURES  # the name older callers import


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
    """The ε of releasing the best trial's model after the search as it ran, as stored and printed.

    The figures of :meth:`dptune.search.regimes.Regime.guarantee` for the study's regime: the
    composition of every trial that touched the training data (a trial that failed or is still running
    at its planned steps), a ``search_budget`` filter's cap, a private search's repeat-and-select bound
    (void, and the composition given instead, if more than K trials touched the data), or a mode's
    composition of its proxies and final run; every one composes a private ``init_checkpoint``'s spend.
    """
    return study_guarantee(study).as_dict()


def privacy_statement(study: optuna.Study, summary: StudySummary | None = None) -> Statement | None:
    """The written statement of releasing the best model after this search (None for non-private studies)."""
    summary = summary or summarize(study)
    g = summary.guarantee
    if not g.private:
        return None
    rec = StudyRecord.of(study)
    cfg, split = rec.study_config, rec.split or {}
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
    assert g.delta is not None  # a private guarantee has one
    return Statement(
        epsilon=g.epsilon, delta=g.delta, accountant=g.accountant,
        dataset=cfg.get("dataset"), dataset_size=split.get("train"), mechanism=g.mechanism,
        search=g.text,
        validation=validation,
        seed_fixed=rec.seed_fixed or cfg.get("private_seed") is not None,
        extra_assumptions=tuple(assumptions),
    )


def summarize(study: optuna.Study) -> StudySummary:
    """Counts, compute spent (trial-steps) and the best completed trial."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    rec = StudyRecord.of(study)
    guarantee = regime_of(rec).guarantee(trials)
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
        search=guarantee.as_dict(),
        guarantee=guarantee,
    )


def creation(study: optuna.Study, storage: str) -> dict[str, Any]:
    """What ``dptune study create`` reports of a new study; a private search's drawn K is left out (it is secret)."""
    rec = StudyRecord.of(study)
    private = rec.private_search
    return {"study_name": study.study_name, "storage": storage,
            "epsilon": rec.epsilon_target, "delta": rec.delta,
            "trials": None if private else len(study.trials),
            "private_search": None if private is None else {k: v for k, v in private.items() if k != "n_trials"},
            "total_budget": rec.total_budget}


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
