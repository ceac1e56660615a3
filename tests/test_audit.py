"""dptune audit: one-run lower bounds on ε never exceed the claim, and do exceed it when the mechanism is broken.

Every audit here runs the real training path (train_and_evaluate → train_step →
dp_step) on 100 digits examples with the cnn model. The white-box setting used
throughout: N = 100, B = 100 (q = 1, full-batch DP-GD), σ = 8, C = 1, T = 10
steps, m = 200 Dirac canaries, δ = 1e-5: claimed ε = 1.535 (PLD); the largest
bound 200 canaries could show is ≈ 3.48.
"""

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from jax_privacy.auditing import CanaryScoreAuditor, Explicit

import dptune.cli as cli
from dptune import faults
from dptune.config import schema as config
from dptune.data.datasets import ArraySplit, load_dataset
from dptune.data.sampling import poisson_batch
from dptune.errors import ConfigError, PrivacyError
from dptune.privacy import accounting as privacy
from dptune.privacy.search_totals import RenyiFilter
from dptune.search import audit, results, study
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig

DELTA = 1e-5
CAP = PrivacyBudget(100.0, DELTA)  # the audits below set σ and T; the cap never binds
WB = Hyperparams(batch_size=100, learning_rate=0.1, clip_norm=1.0, noise_multiplier=8.0, optimizer="sgd")
STEPS, M = 10, 200


@pytest.fixture(scope="module")
def small():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, train=ArraySplit(ds.train.images[:100], ds.train.labels[:100]))


@pytest.fixture
def fault_switch(monkeypatch):
    monkeypatch.setenv(faults.ENV, faults.ENV_VALUE)


def white_box(data, hp=WB, seed=0, clipping="bookkeeping", microbatch=100):
    cfg = RunConfig(microbatch_size=microbatch, clipping=clipping, private_seed=seed, eval_every=1000)
    return audit.run_audit(data, hp, STEPS, config=cfg, budget=CAP, threat_model="white-box", canaries=M)


# -- statistics ---------------------------------------------------------------------

def test_statistics_agree_with_jax_privacy_and_the_paper():
    rng = np.random.default_rng(7)
    m = 300
    included = rng.random(m) < 0.5
    scores = rng.normal(size=m) + 1.5 * included
    lib = CanaryScoreAuditor(scores[included], scores[~included])
    # The hand-written bound of the paper (Steinke et al. 2023, Thm. 5.2) equals the library's at a fixed threshold.
    checked = 0
    for thr in (0.5, 1.0, 1.5, 2.0, 2.5):
        r, v = int((scores >= thr).sum()), int((scores[included] >= thr).sum())
        ours = audit.one_run_bound(m, r, v, DELTA, 0.05)
        theirs = lib.epsilon_one_run(0.05, DELTA, threshold_strategy=Explicit(thr))
        assert ours == pytest.approx(theirs, abs=1e-4)
        checked += ours > 0
    assert checked >= 3
    # δ = 0: the p-value is the binomial tail itself.
    p = 1 / (1 + math.exp(-1.0))
    from scipy.stats import binom

    assert audit.one_run_p_value(m, 50, 40, 1.0, 0.0) == pytest.approx(binom.sf(39, 50, p))

    stats = audit.statistics(scores, included, DELTA)
    assert stats.epsilon_lower_bound == pytest.approx(lib.epsilon_one_run(0.05, DELTA))
    assert stats.epsilon_lower_bound_fdp == pytest.approx(lib.epsilon_one_run_fdp(0.05, DELTA))
    assert stats.tpr_at_low_fpr == pytest.approx(lib.tpr_at_given_fpr(0.01))
    assert stats.auroc == pytest.approx(lib.attack_auroc())
    assert 0 < stats.epsilon_lower_bound < stats.max_lower_bound
    assert stats.canaries == m and stats.included == included.sum()


def test_max_lower_bound_is_a_perfect_attacks_bound():
    m, k = 60, 31
    brute = max(audit.one_run_bound(m, r, r, DELTA, 0.05) for r in range(1, k + 1))
    assert audit.max_lower_bound(m, k, DELTA) == pytest.approx(brute)
    perfect = CanaryScoreAuditor(np.arange(k) + 100.0, np.arange(m - k, dtype=float))
    assert perfect.epsilon_one_run(0.05, DELTA) <= brute + 1e-9  # the printed bound pays for choosing a threshold
    assert perfect.epsilon_one_run(0.05, DELTA, threshold_strategy=Explicit(99.5)) == pytest.approx(
        audit.one_run_bound(m, k, k, DELTA, 0.05), abs=1e-4)
    # More canaries, more power.
    assert audit.max_lower_bound(1000, 500, DELTA) > audit.max_lower_bound(200, 100, DELTA) > brute


def test_statistics_need_both_sides():
    with pytest.raises(ConfigError, match="canaries"):
        audit.statistics(np.zeros(5), np.ones(5, bool), DELTA)


# -- the real mechanism: never above the claim ----------------------------------------

@pytest.mark.parametrize("clipping,seed,batch", [
    ("bookkeeping", 0, 100), ("bookkeeping", 1, 50), ("bookkeeping", 4, 100),
    # The vmap path compiles its own step (slow on a loaded 2-core machine); the 2-device test runs it too.
    pytest.param("vmap", 2, 100, marks=pytest.mark.slow), pytest.param("vmap", 3, 50, marks=pytest.mark.slow),
])
def test_white_box_bound_stays_below_the_claim(small, clipping, seed, batch):
    hp = dataclasses.replace(WB, batch_size=batch)
    r = white_box(small, hp, seed, clipping)
    q = batch / 100
    assert r.claimed_epsilon == pytest.approx(privacy.epsilon(q, 8.0, STEPS, DELTA))
    assert r.training_examples == 100 and r.sampling_rate == q  # the canaries are not data: N stays
    assert r.claimed_epsilon < r.max_lower_bound  # the audit could have shown a violation
    assert r.epsilon_lower_bound <= r.claimed_epsilon
    assert r.epsilon_lower_bound_fdp <= r.claimed_epsilon
    assert r.clipping == clipping and not r.exceeds_claim


def test_white_box_canaries_join_each_step_at_rate_q(small, monkeypatch):
    """Included canaries are sampled like examples (Poisson, rate q), not present at every step."""
    counts = []
    split = audit.DiracCanaries.split

    def spy(self, indices, n, step):
        kept = split(self, indices, n, step)
        counts.append((self.members, len(self._sampled)))
        return kept

    monkeypatch.setattr(audit.DiracCanaries, "split", spy)
    r = white_box(small, dataclasses.replace(WB, batch_size=30), seed=5)
    assert len(counts) == STEPS
    members = counts[0][0]
    assert members == r.included
    total = sum(c for _, c in counts)
    mean, sd = 0.3 * members * STEPS, math.sqrt(0.3 * 0.7 * members * STEPS)
    assert abs(total - mean) < 5 * sd  # Binomial(k·T, q), not k·T


@pytest.mark.parametrize("seed", [0, 1])
def test_black_box_bound_stays_below_the_claim_and_counts_the_canaries_in_n(small, seed):
    hp = Hyperparams(batch_size=50, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0, optimizer="sgd")
    cfg = RunConfig(microbatch_size=100, clipping="bookkeeping", private_seed=seed, eval_every=1000)
    r = audit.run_audit(small, hp, STEPS, config=cfg, budget=CAP, threat_model="black-box", canaries=M)
    # The canaries are training examples: N' = N + included, q' = B/N', and the claim is for what ran.
    assert r.training_examples == 100 + r.included
    assert r.sampling_rate == pytest.approx(50 / r.training_examples)
    assert r.claimed_epsilon == pytest.approx(privacy.epsilon(r.sampling_rate, 2.0, STEPS, DELTA))
    assert r.claimed_epsilon < r.max_lower_bound
    assert r.epsilon_lower_bound <= r.claimed_epsilon and r.epsilon_lower_bound_fdp <= r.claimed_epsilon


@pytest.mark.slow
def test_two_devices_both_paths_and_black_box():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = Path(__file__).parent / "helpers" / "audit_two_devices.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["threat_model"], r["clipping"]) for r in rows][:2] == [("white-box", "bookkeeping"),
                                                                      ("white-box", "vmap")]
    for r in rows:
        assert r["devices"] == 2
        assert r["claimed_epsilon"] < r["max_lower_bound"]
        assert r["epsilon_lower_bound"] <= r["claimed_epsilon"], r


# -- broken mechanisms: above the claim -----------------------------------------------

@pytest.mark.parametrize("fault,microbatch", [
    ("noise_scaled_down", 100), ("no_clipping", 100),
    pytest.param("per_microbatch_noise", 1, marks=pytest.mark.slow),  # 100 microbatches a step: ~15 s
])
def test_white_box_audit_catches_the_fault(small, fault, microbatch, fault_switch):
    """Claimed ε = 1.535 (q = 1, σ = 8, T = 10, δ = 1e-5), m = 200, max ≈ 3.48.

    Effective mechanisms: noise 10× smaller (σ 0.8); canaries of raw norm 100·C
    left unclipped; noise σC/M added to each of M = 100 microbatches of one
    example (total σ/10). Measured lower bounds over private seeds 0–3:
    2.35–2.54, 3.06–3.16 and 2.18–2.46 against the claim 1.535; the real
    mechanism gives 0.0 for all four seeds.
    """
    with faults.inject(fault):
        r = white_box(small, seed=0, microbatch=microbatch)
    assert r.fault == fault
    assert r.claimed_epsilon == pytest.approx(privacy.epsilon(1.0, 8.0, STEPS, DELTA))
    assert r.epsilon_lower_bound > r.claimed_epsilon, r.text()
    assert r.exceeds_claim and "VIOLATION" in r.text()


def test_fixed_size_batch_fault_replaces_poisson_sampling(fault_switch):
    """The fault really samples without replacement: every member exactly once per epoch, batches of exactly B.

    The one-run Dirac attack (sum over steps) does not separate this from
    Poisson sampling: the gap between the two lies in δ-scale tails and
    worst-case datasets that m ≤ 1000 canaries cannot reach (see docs/guide/auditing.md).
    """
    rng = np.random.default_rng(0)
    with faults.inject("fixed_size_batches"):
        batches = [poisson_batch(rng, 100, 0.25) for _ in range(8)]
    assert all(len(b) == 25 for b in batches)
    for epoch in (batches[:4], batches[4:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(100))
    sizes = {len(poisson_batch(rng, 100, 0.25)) for _ in range(20)}
    assert len(sizes) > 1  # Poisson again outside the block


def test_faults_cannot_be_switched_on_by_accident(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    with pytest.raises(RuntimeError, match="tests only"):
        with faults.inject("noise_scaled_down"):
            pass
    monkeypatch.setenv(faults.ENV, "1")
    with pytest.raises(RuntimeError, match="tests only"):
        with faults.inject("no_clipping"):
            pass
    assert faults.active() is None
    assert faults.noise_multiplier(2.0) == 2.0 and faults.clip_for_sum(1.5) == 1.5
    # Nothing in the CLI or the study files reaches the switch.
    cli_files = sorted(Path(cli.__file__).parent.glob("*.py"))
    text = " ".join(Path(p).read_text() for p in (*cli_files, config.__file__, study.__file__))
    import re

    assert not re.search(r"\bfaults\b", text)


def test_production_path_reaches_faults_only_through_an_empty_seam():
    from dptune import seams
    from dptune.data import sampling
    from dptune.trainer import train

    assert not seams.active(train.train_step) and not seams.active(sampling.poisson_batch)
    for module in (train, sampling):
        assert not re.search(r"\bfaults\.", Path(module.__file__).read_text())


# -- studies: the audit is one more trial ------------------------------------------------

SPACE = {"batch_size": 300, "learning_rate": 0.5, "clip_norm": 1.0, "noise_multiplier": 2.0, "optimizer": "sgd"}
# sgd, microbatch 100 and book-keeping: the same compiled step as the white-box audits above.
STUDY = {"name": "aud", "dataset": "digits", "model": "cnn", "privacy": {"epsilon": 3.0, "delta": 1e-5},
         "budget": {"max_epochs": 1, "min_steps": 1}, "private_seed": 0, "microbatch_size": 100,
         "clipping": "bookkeeping", "search_space": "space.yaml"}


def _study(tmp_path, extra=None, admitted_steps=12):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **(extra or {})}))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    s = study.create_study(config.load_study(str(path)), storage)
    n = s.user_attrs["split"]["train"]
    attrs = {"batch_size": 300, "learning_rate": 0.5, "clip_norm": 1.0, "noise_multiplier": 2.0,
             "optimizer": "sgd", "momentum": 0.9, "sampling_rate": 300 / n, "steps": 3, "planned_steps": 3,
             "microbatch_size": 100, "seed": 0, "epsilon_target": 3.0, "accountant": "pld", "touched_data": True,
             # what the filter admitted for this trial (its request, at planned steps)
             "filter_request": [300 / n, 2.0, admitted_steps], "filter_admitted": True}
    s.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5, user_attrs=attrs))
    return s, storage


def test_auditing_a_study_trial_counts_in_the_search_total(tmp_path):
    s, storage = _study(tmp_path)
    before = results.search_guarantee(s)["total_epsilon"]
    lines = []
    r = audit.audit_study("aud", storage, threat_model="white-box", canaries=50, progress=lines.append)
    assert lines and r.study["trial_audited"] == 0 and r.study["audit_trial"] == 1
    s = optuna.load_study(study_name="aud", storage=storage)
    g = results.search_guarantee(s)
    assert g["trials_touching_data"] == 2 and g["total_epsilon"] > before
    assert r.study["search_epsilon_after"] == pytest.approx(g["total_epsilon"])
    rec = s.trials[1]
    assert rec.user_attrs["audit_of"] == 0 and rec.state == optuna.trial.TrialState.PRUNED
    assert results.summarize(s).best["number"] == 0  # an audit never becomes the best trial
    assert "counts in the search total" in r.text()
    assert r.epsilon_lower_bound <= r.claimed_epsilon


@pytest.mark.parametrize("threat_model,canaries", [("white-box", 1), ("white-box", 10**9), ("black-box", 10**9)])
def test_an_audit_that_cannot_run_is_refused_before_anything_is_recorded(tmp_path, threat_model, canaries):
    s, storage = _study(tmp_path)
    before = results.search_guarantee(s)["total_epsilon"]
    with pytest.raises(ConfigError, match="canaries"):
        audit.audit_study("aud", storage, threat_model=threat_model, canaries=canaries)
    s = optuna.load_study(study_name="aud", storage=storage)
    assert len(s.trials) == 1 and results.search_guarantee(s)["total_epsilon"] == before


def test_an_audit_refused_by_its_secret_draw_reads_no_data_and_costs_nothing(tmp_path, monkeypatch):
    s, storage = _study(tmp_path)
    before = results.search_guarantee(s)["total_epsilon"]
    monkeypatch.setattr(audit, "inclusion", lambda secret, m: np.ones(m, bool))  # every canary on one side
    with pytest.raises(ConfigError, match="fell on one side"):
        audit.audit_study("aud", storage, threat_model="white-box", canaries=4)
    s = optuna.load_study(study_name="aud", storage=storage)
    record = s.trials[1]
    assert record.state == optuna.trial.TrialState.FAIL and not record.user_attrs["touched_data"]
    assert "fell on one side" in record.user_attrs["failed_reason"]
    assert results.search_guarantee(s)["total_epsilon"] == before


def test_filter_refuses_an_audit_beyond_the_search_budget(tmp_path):
    probe, _ = _study(tmp_path / "probe", {"search_budget": {"epsilon": 3.2}})
    filt = RenyiFilter(3.2, DELTA, probe.user_attrs["search_budget"]["order"])
    q = probe.trials[0].user_attrs["sampling_rate"]
    # The first trial was admitted with the most steps the cap allows: no audit run fits beside it.
    most = max(t for t in range(1, 400) if filt.admits([(q, 2.0, t)]))
    s, storage = _study(tmp_path, {"search_budget": {"epsilon": 3.2}}, admitted_steps=most)
    with pytest.raises(PrivacyError, match="search_budget: .*audit is refused"):
        audit.audit_study("aud", storage, canaries=50)
    s = optuna.load_study(study_name="aud", storage=storage)
    rec = s.trials[1]
    assert rec.user_attrs["filter_admitted"] is False and rec.user_attrs["touched_data"] is False
    assert results.search_guarantee(s)["trials_touching_data"] == 1


def test_an_audit_never_takes_a_queued_trial(tmp_path):
    """A queued retry carries its parent's attributes (a subset proxy's, say): an audit run recorded in it would
    count a run on all of the data as that proxy. The audit's record is a trial of its own."""
    probe, _ = _study(tmp_path / "probe", {"search_budget": {"epsilon": 3.2}})
    filt = RenyiFilter(3.2, DELTA, probe.user_attrs["search_budget"]["order"])
    q = probe.trials[0].user_attrs["sampling_rate"]
    most = max(t for t in range(1, 400) if filt.admits([(q, 2.0, t)]))
    s, storage = _study(tmp_path, {"search_budget": {"epsilon": 3.2}}, admitted_steps=most)
    s.enqueue_trial({}, user_attrs={"proxy_trial": True, "subset_id": "a"})
    with pytest.raises(PrivacyError, match="audit is refused"):
        audit.audit_study("aud", storage, canaries=50)
    s = optuna.load_study(study_name="aud", storage=storage)
    assert s.trials[1].state == optuna.trial.TrialState.WAITING and "audit_of" not in s.trials[1].user_attrs
    assert s.trials[2].user_attrs["audit_of"] == 0 and "proxy_trial" not in s.trials[2].user_attrs


def test_a_mode_study_audits_its_final_run_never_a_proxy(tmp_path):
    """The study releases its final run: that is what an audit re-runs (a public proxy's B over the private N could
    even exceed 1); before finalize there is nothing to audit, and the refusal writes nothing."""
    from dptune.search import modes

    config = {"name": "aud", "dataset": "digits", "privacy": {"epsilon": 3.0, "delta": DELTA},
              "search": {"mode": "scaled", "factor": 3}, "microbatch_size": 100, "clipping": "bookkeeping",
              "search_space": {**SPACE, "noise_multiplier": None, "epochs": 1}}
    config["search_space"] = {k: v for k, v in config["search_space"].items() if v is not None}
    storage = f"sqlite:///{tmp_path / 's.db'}"
    s = study.create_study(config, storage)
    n = s.user_attrs["split"]["train"]
    ran = {"batch_size": 100, "learning_rate": 0.5, "clip_norm": 1.0, "noise_multiplier": 2.0, "optimizer": "sgd",
           "momentum": 0.9, "sampling_rate": 100 / n, "steps": 3, "planned_steps": 3, "touched_data": True}
    s.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={**ran, modes.PROXY_ATTR: True}))
    with pytest.raises(ConfigError, match="not finalized"):
        audit.audit_study("aud", storage, canaries=50)
    assert len(optuna.load_study(study_name="aud", storage=storage).trials) == 1  # nothing written
    final = {**ran, "batch_size": 300, "sampling_rate": 300 / n, modes.FINAL_ATTR: True}
    s.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=final))  # worse than the proxy: still the one
    s = optuna.load_study(study_name="aud", storage=storage)
    assert audit._pick_trial(s, None).number == 1
    with pytest.raises(ConfigError, match="trial 0 is a proxy"):
        audit._pick_trial(s, 0)


# -- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize("args,field", [
    (["--threat-model", "grey"], "--threat-model"),
    (["--confidence", "1.5"], "--confidence"),
    (["--canaries", "1", "--dataset", "digits", "--steps", "1", "--noise-multiplier", "1"], "canaries"),
    (["--trial", "3"], "trial"),
    (["--study-name", "nope", "--storage", "sqlite:////nonexistent/x.db"], "study_name"),
    (["--study-name", "x", "--batch-size", "10"], "batch-size"),
    (["--dataset", "digits", "--batch-size", "100000"], "batch_size"),
])
def test_cli_bad_input_is_one_line_exit_2(args, field, capfd):
    code = None
    try:
        code = cli.main(["audit", *args])
    except SystemExit as e:
        code = e.code
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and field in err[0], err


def test_cli_audit_prints_the_claim_and_the_bound_as_json(capsys):
    code = cli.main(["audit", "--dataset", "digits", "--batch-size", "300", "--steps", "3", "--noise-multiplier", "8",
                     "--optimizer", "sgd", "--microbatch-size", "100", "--clipping", "bookkeeping",
                     "--canaries", "50", "--private-seed", "0", "--delta", "1e-5", "--json"])
    out = capsys.readouterr()
    assert code == 0
    import json

    r = json.loads(out.out)
    assert r["threat_model"] == "white-box" and r["canaries"] == 50 and r["steps"] == 3
    assert r["claimed_epsilon"] == pytest.approx(privacy.epsilon(r["sampling_rate"], 8.0, 3, 1e-5))
    assert r["epsilon_lower_bound"] <= r["claimed_epsilon"] and r["max_lower_bound"] > 0
    assert "auditing (white-box)" in out.err  # progress goes to stderr with --json
