"""The privacy regimes as objects: one per study, each stating a typed Guarantee read without mode names."""

from __future__ import annotations

import math

import optuna
import pytest

from dptune.privacy import search_totals
from dptune.privacy.mechanism import Mechanism
from dptune.search import record, regimes, results
from dptune.search.record import StudyRecord
from dptune.search.regimes import NonPrivate, PerTrial, PrivateSearch, Skip, Tuning, regime_of

DELTA = 1e-5
RUN = Mechanism(0.01, 1.1, 300)


def _study(attrs: dict, runs: int = 2) -> optuna.Study:
    study = optuna.create_study()
    for key, value in {record.CONFIG: {"study": {}}, record.DELTA: DELTA, **attrs}.items():
        study.set_user_attr(key, value)
    for _ in range(runs):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
            record.TOUCHED_DATA: True, record.SAMPLING_RATE: RUN.sampling_rate,
            record.NOISE_MULTIPLIER: RUN.noise_multiplier, record.STEPS: RUN.steps,
            record.FILTER_REQUEST: list(RUN)}))
    return study


PRIVATE = {"n_trials": 2, "distribution": "poisson", "mean_trials": 2.0, "eta": None, "sampling_rate": 0.01,
           "noise_multiplier": 1.1, "steps": 300, "per_trial_epsilon": 1.0, "total_epsilon": 5.0}


@pytest.mark.parametrize(("attrs", "kind"), [
    ({record.NON_PRIVATE: True}, NonPrivate),
    ({record.EPSILON_TARGET: 3.0, record.ACCOUNTANT: "pld"}, PerTrial),
    ({record.PRIVATE_SEARCH: PRIVATE}, PrivateSearch),
    ({record.SEARCH_MODE: {"mode": "scaled", "factor": 2}, record.EPSILON_TARGET: 3.0}, Tuning),
])
def test_each_study_has_one_regime(attrs: dict, kind: type) -> None:
    assert type(regime_of(StudyRecord.read(attrs))) is kind


def test_the_composition_is_the_accounting_of_what_ran() -> None:
    s = _study({record.EPSILON_TARGET: 3.0, record.ACCOUNTANT: "rdp"})
    g = regime_of(StudyRecord.of(s)).guarantee(s.get_trials())
    expected = search_totals.composed_epsilon([RUN, RUN], DELTA)
    assert g.epsilon == expected["rdp"] and g.private and not g.capped and not g.secret_count
    assert g.lists_runs and not g.bound and g.remaining is None and g.accountant == "rdp"
    assert results.search_guarantee(s) == g.as_dict()


def test_a_filter_states_its_cap_and_what_it_still_admits() -> None:
    cap = {"epsilon": 8.0, "order": search_totals.default_filter_order(8.0, DELTA)}
    s = _study({record.EPSILON_TARGET: 3.0, record.ACCOUNTANT: "rdp", record.SEARCH_BUDGET: cap})
    g = regime_of(StudyRecord.of(s)).guarantee(s.get_trials())
    used = search_totals.RenyiFilter(8.0, DELTA, cap["order"]).spent([RUN, RUN])
    assert g.epsilon == 8.0 and g.capped and g.bound and g.lists_runs
    assert g.remaining == pytest.approx(8.0 - used) and g.figures["filter_epsilon"] == used


def test_a_private_search_keeps_its_count_internal() -> None:
    s = _study({record.PRIVATE_SEARCH: PRIVATE})
    regime = regime_of(StudyRecord.of(s))
    g = regime.guarantee(s.get_trials())
    expected = search_totals.search_epsilon(0.01, 1.1, 300, DELTA, search_totals.TrialCount("poisson", 2.0))
    assert g.epsilon == expected and g.secret_count and g.valid and g.complete and g.bound and not g.lists_runs
    released = g.released()
    assert g.mechanism == RUN and "total_epsilon" in released and not {"trials_drawn", "trials_run"} & set(released)
    assert regime.plan(1).fixed == (1.1, 300)
    with pytest.raises(Skip):
        regime.plan(2)


def test_a_private_search_run_past_k_is_void_and_composed() -> None:
    s = _study({record.PRIVATE_SEARCH: PRIVATE}, runs=3)
    g = regime_of(StudyRecord.of(s)).guarantee(s.get_trials())
    assert not g.valid and g.lists_runs and not g.bound
    assert g.epsilon == search_totals.composed_epsilon([RUN] * 3, DELTA)["rdp"]


def test_a_non_private_study_claims_nothing() -> None:
    s = _study({record.NON_PRIVATE: True})
    g = regime_of(StudyRecord.of(s)).guarantee(s.get_trials())
    assert not g.private and math.isinf(g.epsilon) and results.privacy_statement(s) is None


def test_an_amplified_subset_total_names_the_accountant_of_each_part():
    # The proxies' cap is RDP; a single run on all of the data is composed with PLD, several with RDP.
    one, two = [Mechanism(0.1, 1.0, 10)], [Mechanism(0.1, 1.0, 10), Mechanism(0.2, 1.0, 5)]
    assert regimes._amplified_accountant(one, ()) == (
        "rdp (proxies' cap, amplified by subsampling) + pld (runs on all of the data)")
    assert regimes._amplified_accountant(two, one).endswith(
        "+ rdp (runs on all of the data) + pld (the initial checkpoint's training)")
    assert "initial checkpoint" not in regimes._amplified_accountant(one, [Mechanism(0.1, 1.0, 0)])
