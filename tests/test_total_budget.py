"""A total budget: the plan's ε is dp-accounting's for every run it allows, no run past the plan trains (two
workers on one study included), a total too small is refused at create, and the statement names the total."""

from __future__ import annotations

import math
import threading

import optuna
import pytest
import yaml
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

import dptune
import dptune.cli as cli
from dptune.privacy.mechanism import Mechanism
from dptune.privacy.total_budget import MAX_NOISE_MULTIPLIER, BudgetTooSmall, Shape, plan_total
from dptune.search import audit, modes, proxy, record, results
from dptune.search.record import StudyRecord
from dptune.search.regimes import regime_of

K = 2


def _event(q: float, sigma: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def _config(name: str, total: float) -> dict:
    return {"name": name, "dataset": "digits",
            "privacy": {"total_epsilon": total, "proxies": K, "subset_fraction": 0.3},
            "budget": {"max_epochs": 1, "min_steps": 1}, "microbatch_size": 64,
            "sampler": {"name": "random"}, "pruner": {"name": "none"},
            "search_space": {"batch_size": 256, "learning_rate": {"low": 0.5, "high": 2.0, "log": True},
                             "clip_norm": 1.0, "epochs": 1}}


@pytest.mark.parametrize("prior", [(), (Mechanism(0.1, 1.5, 20),)])
def test_the_plans_total_is_dp_accountings_composition_of_every_run_it_allows(prior):
    shape = Shape(sampling_rate=0.25, steps=8, proxies=3, fraction=0.2, tuning_share=0.15, delta=1e-5,
                  prior=prior)
    plan = plan_total(3.0, shape)
    q, t, part = plan["sampling_rate"], plan["steps"], 1e-5 / (3 if prior else 2)
    # The tuning: 3 copies of the proxies' mechanism composed (PLD) on the subset, amplified by the subsampling.
    inner = PLDAccountant().compose(
        dp_event.SelfComposedDpEvent(_event(q, plan["proxy_noise_multiplier"], t), 3)).get_epsilon(part / 0.2)
    tuning = math.log1p(0.2 * math.expm1(inner))
    final = PLDAccountant().compose(_event(q, plan["final_noise_multiplier"], t)).get_epsilon(part)
    before = RdpAccountant().compose(_event(*prior[0])).get_epsilon(part) if prior else 0.0
    assert tuning + final + before <= 3.0
    assert tuning + final + before == pytest.approx(plan["parts"]["total"], rel=2e-3)
    assert plan["parts"]["tuning"] == pytest.approx(tuning, rel=2e-3) and tuning <= 0.15 * 3.0 + 1e-9
    # Nothing is left on the table: the final run takes what the tuning leaves.
    assert plan["parts"]["total"] == pytest.approx(3.0, rel=1e-2)


def test_a_total_below_the_smallest_names_it_and_the_smallest_works():
    shape = Shape(sampling_rate=0.25, steps=8, proxies=3, fraction=0.2, tuning_share=0.15, delta=1e-5)
    with pytest.raises(BudgetTooSmall) as e:
        plan_total(0.05, shape)
    assert f"{e.value.smallest:g}" in str(e.value)
    plan = plan_total(e.value.smallest, shape)
    assert max(plan["proxy_noise_multiplier"], plan["final_noise_multiplier"]) <= MAX_NOISE_MULTIPLIER


def test_too_small_a_total_is_refused_at_create_with_exit_2_and_no_storage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = _config("tiny", 0.05)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    code = cli.main(["study", "create", "--config", "tiny.yaml", "--storage", f"sqlite:///{tmp_path}/t.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "privacy.total_epsilon" in err and "smallest total that works is" in err
    assert not (tmp_path / "t.db").exists() and not (tmp_path / "studies").exists()


@pytest.fixture(scope="module")
def finalized(tmp_path_factory):
    """One study under a total budget, tuned by two workers at once on a journal storage, then finalized."""
    folder = tmp_path_factory.mktemp("total")
    storage = f"journal:///{folder / 'shared.journal'}"
    dptune.create_study(_config("total", 3.0), storage=storage)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            dptune.optimize("total", storage, n_trials=K + 1)  # each asks for more than the plan holds
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return dptune.finalize("total", storage), storage


@pytest.mark.slow  # one study, tuned by two workers and finalized, shared by these tests
def test_no_run_past_the_plan_trains_with_two_workers(finalized):
    study, storage = finalized
    trials = study.get_trials(deepcopy=False)
    touched = [t for t in trials if record.touched_data(t)]
    proxies = [t for t in touched if modes.is_proxy(t)]
    assert sorted(t.number for t in proxies) == list(range(K))
    assert len([t for t in touched if modes.is_final(t)]) == 1 and len(touched) == K + 1
    assert all(record.is_skipped(t) for t in trials if t.number >= K and not modes.is_final(t))
    plan = study.user_attrs[record.TOTAL_BUDGET]
    for t in proxies:
        assert record.get(t, record.NOISE_MULTIPLIER) == pytest.approx(plan["proxy_noise_multiplier"])
    final = modes.final_trial(trials)
    assert final is not None
    assert record.get(final, record.NOISE_MULTIPLIER) == pytest.approx(plan["final_noise_multiplier"])
    with pytest.raises(proxy.FinalizeRefused):  # the plan holds one final run
        dptune.finalize("total", storage)


@pytest.mark.slow  # one study, tuned by two workers and finalized, shared by these tests
def test_the_statement_and_study_show_name_the_total_tuning_included(finalized, capsys):
    study, storage = finalized
    g = results.search_guarantee(study)
    assert g["valid"] and g["total_epsilon"] == 3.0 and g["mode"] == "total_budget"
    text = results.privacy_statement(study).text()
    assert "Guarantee: (3, 1e-05)-differential privacy" in text and "tuning included" in text
    assert f"{K} proxies" in text and "final run" in text
    assert cli.main(["study", "show", "total", "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "tuning included: 3" in out and f"over {K} proxies" in out


@pytest.mark.slow  # one study, tuned by two workers and finalized, shared by these tests
def test_a_proxy_past_the_plan_on_the_data_voids_the_bound(finalized):
    study, _ = finalized
    copy = optuna.create_study()
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    trials = study.get_trials(deepcopy=False)
    p = study.user_attrs[record.TOTAL_BUDGET]
    extra = optuna.trial.create_trial(value=0.5, user_attrs={
        record.TOUCHED_DATA: True, record.PROXY: True, record.SAMPLING_RATE: p["sampling_rate"],
        record.NOISE_MULTIPLIER: p["proxy_noise_multiplier"], record.STEPS: p["steps"]})
    g = regime_of(StudyRecord.of(copy)).guarantee([*trials, extra])
    assert not g.valid and "EXCEEDED, INVALID" in g.text and g.epsilon > 3.0


def _copy_with(study: optuna.Study, plan_changes: dict, mode_changes: dict | None = None) -> StudyRecord:
    copy = optuna.create_study()
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    plan = {**study.user_attrs[record.TOTAL_BUDGET], **plan_changes}
    copy.set_user_attr(record.TOTAL_BUDGET, plan)
    if mode_changes is not None:
        copy.set_user_attr(record.SEARCH_MODE, {**study.user_attrs[record.SEARCH_MODE], **mode_changes})
    return StudyRecord.of(copy)


@pytest.mark.slow  # one study, tuned by two workers and finalized, shared by these tests
def test_the_total_is_recomputed_from_the_plans_mechanisms_not_read_from_the_record(finalized):
    study, _ = finalized
    p = study.user_attrs[record.TOTAL_BUDGET]
    # A plan whose noise would cost far more than its stated total (an edited or foreign record): no run has
    # to disagree with it for the bound to be refused.
    weak = _copy_with(study, {"proxy_noise_multiplier": 0.6, "final_noise_multiplier": 0.6},
                      {"proxy_noise_multiplier": 0.6, "final_noise_multiplier": 0.6})
    g = regime_of(weak).guarantee([])
    assert not g.valid and "EXCEEDED, INVALID" in g.text and "does not hold" in g.text
    # The runs read the search mode's copy of the plan: a γ there other than the plan's is not the plan.
    wider = _copy_with(study, {}, {"fraction": min(0.9, 3 * p["fraction"])})
    g = regime_of(wider).guarantee(study.get_trials(deepcopy=False))
    assert not g.valid and "fraction" in g.text


@pytest.mark.slow  # one study, tuned by two workers and finalized, shared by these tests
def test_an_audit_of_a_planned_study_is_refused_before_it_writes(finalized):
    study, storage = finalized
    before = len(study.get_trials(deepcopy=False))
    with pytest.raises(dptune.PrivacyError, match="total budget"):
        audit.audit_study("total", storage)
    assert len(dptune.load_study("total", storage).get_trials(deepcopy=False)) == before


def test_a_proxy_on_another_subset_is_refused_before_it_reads():
    """A second machine without the study's private folder draws another subset: its proxy never trains."""
    earlier = optuna.trial.create_trial(value=0.5, user_attrs={record.PROXY: True, record.SUBSET_ID: "a1"})
    proxy._same_subset([earlier], "a1")  # the same subset: admitted
    proxy._same_subset([], "b2")  # the first proxy names the subset
    for mine in ("b2", None):
        with pytest.raises(proxy.Infeasible, match="artifacts folder"):
            proxy._same_subset([earlier], mine)
