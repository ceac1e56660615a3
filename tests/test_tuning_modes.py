"""Cheaper tuning (issue #20): each mode's ε is a direct dp-accounting computation of what ran; scaled proxies
keep σ/B and the steps; the final run uses the winner; unaccountable modes are refused at create; the subset is
secret."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

import dptune
from dptune.errors import ConfigError
from dptune.privacy import accounting as privacy
from dptune.randomness import SecretSeed
from dptune.search import modes, proxy
from dptune.search.results import summarize

EPS = 2.0


def _config(name: str, search: dict, *, dataset: str = "digits", batch: object = 256, **extra: object) -> dict:
    return {"name": name, "dataset": dataset, "privacy": {"epsilon": EPS},
            "budget": {"max_epochs": 1, "min_steps": 1}, "microbatch_size": 64, "private_seed": 7,
            "sampler": {"name": "random"}, "pruner": {"name": "none"}, "search": search,
            "search_space": {"batch_size": batch, "learning_rate": {"low": 0.5, "high": 2.0, "log": True},
                             "clip_norm": 1.0, "epochs": 1},
            **extra}


def _direct(runs: list[tuple[float, float, int]], delta: float) -> float:
    """ε of DP-SGD runs (q, σ, T) composed, straight from dp-accounting's events."""
    events = [dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), t)
              for q, s, t in runs]
    return RdpAccountant().compose(dp_event.ComposedDpEvent(events)).get_epsilon(delta)


def _run(tmp_path, config: dict, proxies: int = 2) -> optuna.Study:
    storage = f"sqlite:///{tmp_path}/s.db"
    study = dptune.create_study(config, storage=storage)
    dptune.optimize(study, n_trials=proxies)
    return dptune.finalize(study)


def _trials(study):
    trials = study.get_trials(deepcopy=False)
    return [t for t in trials if modes.is_proxy(t)], [t for t in trials if modes.is_final(t)]


@pytest.mark.slow
def test_scaled_proxies_keep_sigma_over_b_and_steps_and_the_final_run_is_the_winner(tmp_path):
    study = _run(tmp_path, _config("scaled", {"mode": "scaled", "factor": 4}))
    n, delta = study.user_attrs["split"]["train"], study.user_attrs["delta"]
    steps = math.ceil(1 / (256 / n))
    sigma = privacy.noise_for_epsilon(256 / n, steps, EPS, delta, "pld")
    proxies, finals = _trials(study)
    assert len(proxies) == 2 and len(finals) == 1
    for t in proxies:
        a = t.user_attrs
        assert a["batch_size"] == 64 and a["steps"] == steps == a[modes.FULL_SCALE_ATTR]["steps"]
        assert a["noise_multiplier"] == pytest.approx(sigma / 4, rel=1e-12)
        assert a["noise_multiplier"] / a["batch_size"] == pytest.approx(sigma / 256, rel=1e-12)
        assert a["touched_data"] is True
        assert a["examples_processed"] == 64 * steps
    winner = max((t for t in proxies if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    f = finals[0].user_attrs
    assert f[modes.FINAL_SOURCE_ATTR] == winner.number
    assert (f["batch_size"], f["steps"]) == (256, steps)
    assert f["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    assert f["learning_rate"] == winner.user_attrs["learning_rate"]
    assert f["epsilon_spent"] <= EPS + 1e-9
    # The search's ε: the two proxies at (64/N, σ/4, T) and the final run at (256/N, σ, T), composed.
    runs = [(64 / n, t.user_attrs["noise_multiplier"], steps) for t in proxies] + [(256 / n, f["noise_multiplier"],
                                                                                   steps)]
    summary = summarize(study)
    g = summary.search
    assert g["search_mode"] == "scaled" and g["finalized"]
    assert g["total_epsilon"] == pytest.approx(_direct(runs, delta), rel=1e-9)
    assert g["total_epsilon"] > f["epsilon_spent"]  # the proxies on private data cost more than the final run
    assert g["final"]["test_accuracy"] == f["test_accuracy"]
    assert summary.best is not None and summary.best["number"] == finals[0].number
    assert g["compute"]["proxy_examples"] == 2 * 64 * steps and g["compute"]["final_examples"] == 256 * steps
    # Finalized: more proxies would only add to the ε of what was released.
    with pytest.raises(dptune.StudyError, match="finalized"):
        dptune.optimize(study, n_trials=1)


@pytest.mark.slow
def test_subset_trials_are_the_full_mechanism_on_a_secret_subset_and_compose(tmp_path, cli):
    study = _run(tmp_path, _config("subset", {"mode": "subset", "fraction": 0.5}))
    n, delta = study.user_attrs["split"]["train"], study.user_attrs["delta"]
    steps = math.ceil(1 / (256 / n))
    sigma = privacy.noise_for_epsilon(256 / n, steps, EPS, delta, "pld")
    proxies, finals = _trials(study)
    for t in proxies:
        a = t.user_attrs
        # The full run's q and σ, an expected batch of γ·B, each counted at (q, σ, T).
        assert a["sampling_rate"] == 256 / n and a["batch_size"] == 128 and a["steps"] == steps
        assert a["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
        assert a["examples_processed"] == 128 * steps
    f = finals[0].user_attrs
    assert (f["batch_size"], f["steps"]) == (256, steps)
    runs = [(256 / n, sigma, steps)] * 3
    assert summarize(study).search["total_epsilon"] == pytest.approx(_direct(runs, delta), rel=1e-6)
    # Shown where people look: study show (--json) and the report.
    import json

    from dptune.inspect import report

    out = cli("study", "show", "subset", "--storage", f"sqlite:///{tmp_path}/s.db", "--json")
    shown = json.loads(out.stdout)["search"]
    assert shown["search_mode"] == "subset" and shown["final"]["test_accuracy"] == f["test_accuracy"]
    assert shown["compute"]["proxy_examples"] == 2 * 128 * steps
    assert "Search mode subset" in report.render([study])


@pytest.mark.slow
def test_public_proxies_cost_nothing_and_transfer_q_and_steps(tmp_path):
    config = _config("public", {"mode": "public", "dataset": "digits"}, dataset="mnist5k", image_size=8)
    study = _run(tmp_path, config)
    n, delta = study.user_attrs["split"]["train"], study.user_attrs["delta"]
    proxies, finals = _trials(study)
    n_public = study.user_attrs[modes.MODE_ATTR]["n_plan"]
    assert n_public != n
    for t in proxies:
        assert t.user_attrs["touched_data"] is False and t.user_attrs["sampling_rate"] == 256 / n_public
    steps = math.ceil(1 / (256 / n_public))
    f = finals[0].user_attrs
    batch = round(256 / n_public * n)
    assert (f["batch_size"], f["steps"]) == (batch, steps)
    sigma = privacy.noise_for_epsilon(batch / n, steps, EPS, delta, "pld")
    assert f["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    g = summarize(study).search
    assert g["proxy_epsilon"] == 0.0
    # One run read the private data: its own ε (PLD), straight from dp-accounting.
    pld = PLDAccountant(value_discretization_interval=1e-4)
    direct = pld.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(batch / n, dp_event.GaussianDpEvent(sigma)), steps)).get_epsilon(delta)
    assert g["total_epsilon"] == pytest.approx(direct, rel=1e-3)  # both discretise pessimistically
    assert g["total_epsilon"] <= EPS + 1e-9 < _direct([(batch / n, sigma, steps)], delta)


@pytest.mark.parametrize("search, extra, field", [
    ({"mode": "scaled", "factor": 3}, {}, "search.factor"),  # 3 does not divide B = 256
    ({"mode": "scaled", "factor": 512}, {"batch": {"low": 64, "high": 256}}, "search.factor"),
    ({"mode": "public", "dataset": "digits"}, {}, "search.dataset"),  # the private dataset itself
    ({"mode": "subset", "fraction": 1.0}, {}, "fraction"),
    ({"mode": "subset", "fraction": 0.5}, {"search_budget": {"epsilon": 5}}, "search_budget"),
    ({"mode": "scaled"}, {}, "factor"),
])
def test_a_mode_that_cannot_be_accounted_is_refused_at_create(tmp_path, search, extra, field):
    config = _config("refused", search, **extra)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        dptune.create_study(config, storage=f"sqlite:///{tmp_path}/r.db")
    assert not (tmp_path / "r.db").exists()


@pytest.mark.slow  # three CLI processes
def test_the_cli_refuses_in_one_line_with_exit_2_and_writes_nothing(tmp_path, cli):
    (tmp_path / "space.yaml").write_text("{batch_size: 256, learning_rate: 1.0, clip_norm: 1.0, epochs: 1}\n")
    (tmp_path / "s.yaml").write_text(
        "name: s\ndataset: digits\nprivacy: {epsilon: 2}\nsearch: {mode: scaled, factor: 3}\n"
        "search_space: space.yaml\n")
    out = cli("study", "create", "--config", "s.yaml", "--storage", "sqlite:///s.db", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "search.factor" in out.stderr and "256" in out.stderr
    assert not (tmp_path / "s.db").exists()
    # finalize is for a study with a mode; an ordinary study's best trial is its result.
    (tmp_path / "o.yaml").write_text("name: o\ndataset: digits\nprivacy: {epsilon: 2}\nsearch_space: space.yaml\n")
    assert cli("study", "create", "--config", "o.yaml", "--storage", "sqlite:///s.db", cwd=tmp_path).returncode == 0
    out = cli("study", "finalize", "o", "--storage", "sqlite:///s.db", cwd=tmp_path)
    assert out.returncode == 2 and "no search mode" in out.stderr


def test_the_subset_is_chosen_by_the_secret_not_by_the_public_seed():
    from dptune.config.schema import resolve
    from dptune.data.datasets import load_dataset
    from dptune.trainer.train import PrivacyBudget

    data = load_dataset("digits")
    budget = PrivacyBudget(EPS, 1e-5)

    def positions(seed: int, private_seed: int | None) -> np.ndarray:
        resolved = resolve(_config("sub", {"mode": "subset", "fraction": 0.3}, seed=seed, private_seed=private_seed))
        runner = proxy.ModeRunner(resolved, data, budget, {"mode": "subset", "fraction": 0.3}, "sub")
        runner.subset()
        assert runner.subset_positions is not None
        return runner.subset_positions

    same = positions(0, 7)
    assert np.array_equal(same, positions(123, 7))  # the public seed plays no part
    assert not np.array_equal(same, positions(0, 8))  # the secret decides
    assert not np.array_equal(positions(0, None), positions(0, None))  # by default full entropy from the OS
    assert abs(len(same) / len(data.train) - 0.3) < 0.06
    a = proxy.secret_subset(1000, 0.3, SecretSeed.from_int(1))
    assert np.array_equal(a, proxy.secret_subset(1000, 0.3, SecretSeed.from_int(1)))
    assert not np.array_equal(a, proxy.secret_subset(1000, 0.3, SecretSeed.from_int(2)))
