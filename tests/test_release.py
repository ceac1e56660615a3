"""The released model: best-model artifacts, export/predict/load, in-trial checkpoints and resume.

Real storages, real worker processes (SIGKILLed by dptune's test-only hook),
real optuna-dashboard and Chromium.
"""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from dptune.config import schema as config
from dptune.data.datasets import load_dataset
from dptune.randomness import SecretSeed
from dptune.search import objective, release, results, study
from dptune.trainer import resume
from dptune.trainer.run import dataset_of
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate
from tests import trial_deaths
from tests.conftest import run_cli
from tests.test_bad_input import read_only

ROOT = Path(__file__).resolve().parent.parent
SPACE = {"batch_size": 300, "effective_learning_rate": {"low": 0.01, "high": 6.0}, "clip_norm": 1.0,
         "noise_multiplier": 2.0}


def make_config(tmp_path, name, **extra):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    cfg = {"name": name, "dataset": "digits", "privacy": {"epsilon": 8.0, "delta": 1e-5},
           "budget": {"max_steps": 6, "max_epochs": None, "min_steps": 1}, "pruner": {"name": "none"},
           "microbatch_size": 128, "private_seed": 0, "search_space": "space.yaml", **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cli(*args, env=None, timeout=300):
    return run_cli(*args, env=env, timeout=timeout)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- best model: kept, replaced, exported, loaded, predicted --------------------------------------

@pytest.mark.slow
def test_best_model_artifact_is_kept_replaced_exported_and_predicts_its_recorded_accuracy(tmp_path, request,
                                                                                         monkeypatch):
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    s = study.create_study(config.load_study(make_config(tmp_path, "best")), storage)
    # A poor trial first, then a better one: the stored model must follow the best.
    s.enqueue_trial({"effective_learning_rate": 0.01})
    study.optimize("best", storage, n_trials=1)
    s = study.load_study("best", storage)
    first = release.best_models(s)
    assert [e["trial"] for e in first] == [0]
    store = release.artifact_store(s, storage)
    first_file = os.path.join(store._base_path, first[0]["artifact_id"])
    assert os.path.exists(first_file)
    s.enqueue_trial({"effective_learning_rate": 2.0})
    study.optimize("best", storage, n_trials=1)
    s = study.load_study("best", storage)
    values = [t.value for t in s.trials]
    assert values[1] > values[0], values  # the enqueued order made trial 1 the better one
    kept = release.best_models(s)
    assert [e["trial"] for e in kept] == [1] and kept[0]["value"] == values[1]
    assert not os.path.exists(first_file)  # the superseded model is deleted, not just unlisted
    assert len(os.listdir(store._base_path)) == 1
    # Owner-only: the folder beside the storage, the artifact store, the model.
    folder = release.folder_of(s, storage)
    assert folder.startswith(str(tmp_path)) and mode(folder) == 0o700 and mode(store._base_path) == 0o700
    assert mode(os.path.join(store._base_path, kept[0]["artifact_id"])) == 0o600
    assert not os.listdir(os.path.join(folder, "pending"))

    out = tmp_path / "released"
    p = cli("study", "best", "best", "--storage", storage, "--export-model", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "wrote the released model" in p.stdout
    assert mode(out) == 0o700 and all(mode(out / f) == 0o600 for f in os.listdir(out))
    meta = json.loads((out / release.METADATA_FILE).read_text())
    summary = results.summarize(s)
    assert meta["trial"] == 1 and meta["search"]["total_epsilon"] == summary.search["total_epsilon"]
    assert meta["trial_privacy"]["epsilon"] == s.trials[1].user_attrs["epsilon_spent"]
    assert meta["hyperparameters"]["effective_learning_rate"] == 2.0 and meta["input_shape"] == [8, 8, 1]
    # The honest search total, in words: the study's own statement, not the trial's ε.
    assert (out / release.STATEMENT_FILE).read_text() == results.privacy_statement(s).text() + "\n"

    # The manual's example, as written, on this export.
    example = (ROOT / "docs" / "guide" / "released-model.md").read_text().split("```python\n", 1)[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(example, names)
    assert names["logits"].shape == (8, 10) and names["classes"].shape == (8,)
    model = release.load_model(str(out))
    data = release.dataset_for(model.metadata)
    assert abs(model.accuracy(data.validation) - s.trials[1].value) <= 1e-6
    logits = model(data.validation.take(np.arange(5))[0])
    assert logits.shape == (5, 10)

    p = cli("predict", "--model", str(out), "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    predicted = json.loads(p.stdout)
    assert abs(predicted["accuracy"] - s.trials[1].value) <= 1e-6 and predicted["examples"] == 180
    assert predicted["recorded_accuracy"] == s.trials[1].value
    # Another dataset is predicted only where the model takes its inputs (mnist5k is 28×28, the model 8×8).
    with pytest.raises(release.ReleaseError, match="dataset: 'mnist5k' has inputs"):
        release.dataset_for(model.metadata, "mnist5k")
    assert release.dataset_for(model.metadata, "digits").name == "digits"

    # Loading checks the metadata against the model it builds.
    meta["num_classes"] = 7
    (out / release.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(release.ReleaseError):
        release.load_model(str(out))
    p = cli("study", "best", "best", "--storage", storage, "--export-model", str(out))
    assert p.returncode == 2 and "not an empty folder" in p.stderr and p.stderr.count("\n") == 1
    # What a killed export left is swept by the next one; a folder that cannot be written is one line.
    stale = tmp_path / ".export-999999999-x"  # no process has this id (above Linux's pid_max)
    stale.mkdir()
    assert cli("study", "best", "best", "--storage", storage, "--export-model", str(tmp_path / "again")
               ).returncode == 0 and not stale.exists()
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro", request)
    p = cli("study", "best", "best", "--storage", storage, "--export-model", str(tmp_path / "ro" / "m"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "export_model: cannot write" in p.stderr, p.stderr
    assert os.listdir(tmp_path / "ro") == []


def test_best_model_under_racing_workers_ends_as_the_storage_says(tmp_path):
    """Two workers finish at once: however their keep/prune passes interleave, the best is kept, alone."""
    from dptune.models import checkpoint

    storage = f"sqlite:///{tmp_path / 'r.db'}"
    study.create_study(config.load_study(make_config(tmp_path, "race")), storage)
    s = study.load_study("race", storage)
    folder = release.folder_of(s, storage)
    params = {"w": np.ones(3, np.float32)}
    meta = {"model": "cnn", "image_shape": [8, 8, 1], "num_classes": 10}
    asked = [s.ask(), s.ask()]
    for t in asked:
        checkpoint.save(release.pending_path(folder, t.number), params, meta)
    # Worker 0 told 0.5 and saw itself best; before its upload landed, worker 1 told 0.9 and finished its pass.
    s.tell(asked[0], 0.5)
    s.tell(asked[1], 0.9)
    worse, better = s.get_trials()
    release.keep_best(s, better, storage)
    assert [e["trial"] for e in release.best_models(s)] == [1]
    release._upload(s, worse, release.pending_path(folder, 0), storage)  # worker 0's stale decision lands now
    assert sorted(e["trial"] for e in release.best_models(s)) == [0, 1]
    release.prune(s, storage)  # ... and worker 0's own pass, after its upload, removes it
    assert [e["trial"] for e in release.best_models(s)] == [1]
    assert len(os.listdir(release.artifact_store(s, storage)._base_path)) == 1
    # Deciding after both are told: the worse one uploads nothing.
    release.keep_best(s, worse, storage)
    assert [e["trial"] for e in release.best_models(s)] == [1]
    # Optuna's listing of the removed one is null, as optuna-dashboard's own delete leaves it.
    attrs = s._storage.get_study_system_attrs(s._study_id)
    assert sum(1 for k, v in attrs.items() if k.startswith("artifacts:") and json.loads(v) is not None) == 1


# -- in-trial checkpoints -------------------------------------------------------------------

def _run(data, ckpt, steps=6):
    hp = Hyperparams(batch_size=300, learning_rate=2.0, noise_multiplier=2.0)
    cfg = RunConfig(microbatch_size=128, secret=SecretSeed.from_int(7), resume=ckpt, eval_every=1)
    return train_and_evaluate(data, hp, steps, config=cfg, budget=PrivacyBudget(8.0, 1e-5))


@pytest.mark.slow
def test_truncated_checkpoint_is_ignored_with_a_warning_and_the_previous_one_resumed(tmp_path):
    data = load_dataset("digits", seed=0)
    identity = {"run": "x"}
    full = _run(data, None)  # no checkpoints: the uninterrupted run

    folder = str(tmp_path / "ck")
    first = resume.Checkpointer(folder, identity, every_steps=2)
    _run(data, first)
    assert first.saved_steps == [2, 4]  # none at the last step
    assert mode(folder) == 0o700 and all(mode(p) == 0o600 for _, p in first.files())
    newest = first.files()[0][1]
    with open(newest, "rb") as f:
        data_bytes = f.read()
    with open(newest, "wb") as f:
        f.write(data_bytes[: len(data_bytes) // 2])  # a crash mid-write that a plain write would leave
    again = resume.Checkpointer(folder, identity, every_steps=1000)
    with pytest.warns(resume.CheckpointWarning, match="checksum"):
        point = again.latest()
    assert point.step == 2
    resumed = _run(data, again)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert resumed.steps == 6 and resumed.epsilon == full.epsilon
    # Same secret, same sampler state, noise folded by step: the replay is the uninterrupted run, bit for bit.
    assert resumed.val_accuracy == full.val_accuracy and resumed.history == full.history

    # A checkpoint of another configuration is never resumed.
    other = resume.Checkpointer(folder, {"run": "y"}, every_steps=1000)
    with pytest.warns(resume.CheckpointWarning, match="another run"):
        assert other.latest() is None


def test_a_corrupt_byte_fails_the_checksum(tmp_path):
    body = resume.encode({"step": 3}, b"payload")
    assert resume.decode(body) == ({"step": 3}, b"payload")
    broken = bytearray(body)
    broken[len(body) // 2] ^= 1
    with pytest.raises(ValueError):
        resume.decode(bytes(broken))


def test_private_files_are_owner_only_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        folder = resume.private_dir(str(tmp_path / "a" / "b" / "c"))
        resume.write_private(os.path.join(folder, "secret"), b"x")
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", folder):
        assert mode(p) == 0o700
    assert mode(os.path.join(folder, "secret")) == 0o600


# -- a worker killed mid-trial, and the resumed retry ----------------------------------------------

@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint_and_the_search_counts_its_steps_once(tmp_path):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    extra = {"checkpoints": {"every_steps": 2}, "eval_every_epochs": 0.2, "budget": {
        "max_steps": 8, "max_epochs": None, "min_steps": 1}}
    storage = f"journal:///{tmp_path / 'k.journal'}"
    study.create_study(config.load_study(make_config(tmp_path, "kill", **extra)), storage)
    # Trial 0 checkpoints at steps 2 and 4, reports steps 5 and 6, and is SIGKILLed right after step 6.
    p = cli("optimize", "--study-name", "kill", "--storage", storage, "--n-trials", "1", "--workers", "1",
            env=trial_deaths.env(kill="0:6"))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    s = study.load_study("kill", storage)
    dead = s.trials[0]
    assert dead.state == TrialState.RUNNING and dead.user_attrs["checkpoint_step"] == 4
    assert dead.user_attrs["progress_steps"] == 6 and sorted(map(int, dead.user_attrs["replay_digests"])) == list(
        range(1, 7))
    # The secret state needed to resume: owner-only, beside the storage, holding the run's secret.
    ck_folder = release.checkpoint_folder(release.folder_of(s, storage), 0)
    files = sorted(os.listdir(ck_folder))
    assert files == ["step-000000002.ckpt", "step-000000004.ckpt"]
    assert mode(ck_folder) == 0o700 and mode(os.path.dirname(ck_folder)) == 0o700
    assert all(mode(os.path.join(ck_folder, f)) == 0o600 for f in files)
    header, _ = resume.decode(open(os.path.join(ck_folder, files[-1]), "rb").read())
    assert header["accountant"]["steps"] == 4 and len(bytes.fromhex(header["secret"])) == 32

    p = cli("optimize", "--study-name", "kill", "--storage", storage, "--n-trials", "1", "--workers", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    s = study.load_study("kill", storage)
    dead, retry = s.trials[0], s.trials[1]
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["resumed_from"] == {"trial": 0, "step": 4, "randomness": "replayed"}
    assert retry.user_attrs["ran_steps"] == [4, 8]  # it resumed at the checkpointed step and finished
    # Its parameters at the steps the dead attempt reported after the checkpoint are those, bit for bit
    # (checked before it reported them; "replayed" above says the check passed): one run, not two.
    assert {k: retry.user_attrs["replay_digests"][k] for k in ("5", "6")} == {
        k: dead.user_attrs["replay_digests"][k] for k in ("5", "6")}
    assert retry.user_attrs["steps"] == 8
    # The curve is whole: the restored evaluations and the replayed ones are the dead attempt's outputs.
    assert len(retry.intermediate_values) == 8
    assert all(retry.intermediate_values[k] == dead.intermediate_values[k] for k in dead.intermediate_values)
    assert not os.path.exists(ck_folder)  # deleted once the trial finished

    q, sigma, delta = retry.user_attrs["sampling_rate"], retry.user_attrs["noise_multiplier"], 1e-5
    from dptune.privacy import accounting as privacy

    assert retry.user_attrs["epsilon_spent"] == pytest.approx(privacy.epsilon(q, sigma, 8, delta, "pld"))
    # What ran: one DP-SGD run of 8 steps (the dead attempt's 6 replayed exactly), composed once.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 8)
    truth = RdpAccountant().compose(event).get_epsilon(delta)
    total = results.search_guarantee(s)["total_epsilon"]
    assert total == pytest.approx(truth, rel=1e-9)
    twice = RdpAccountant().compose(event).compose(event).get_epsilon(delta)
    assert total < twice  # not the failed attempt's planned steps plus the retry's



def test_search_total_counts_a_diverged_replay_apart():
    """If the replay had differed, the dead attempt's steps after the checkpoint count as a run of their own."""
    from optuna.trial import create_trial


    base = {"sampling_rate": 0.25, "noise_multiplier": 2.0, "planned_steps": 8, "touched_data": True}
    dead = create_trial(state=TrialState.FAIL, params={}, distributions={},
                        user_attrs={**base, "progress_steps": 6, "checkpoint_step": 4})
    dead.number = 0
    for randomness, expected in (("replayed", [(0.25, 2.0, 8)]), ("fresh", [(0.25, 2.0, 8), (0.25, 2.0, 2)])):
        retry = create_trial(state=TrialState.COMPLETE, value=0.5, params={}, distributions={}, user_attrs={
            **base, "steps": 8, "retry_of": 0, "resumed_from": {"trial": 0, "step": 4, "randomness": randomness}})
        retry.number = 1
        assert results.resumed_spends([dead, retry], [dead, retry]) == expected
    # Not resumed (yet): the dead attempt counts at its planned steps.
    waiting = create_trial(state=TrialState.COMPLETE, value=0.5, params={}, distributions={},
                           user_attrs={**base, "steps": 8, "retry_of": 0})
    waiting.number = 1
    assert results.resumed_spends([dead, waiting], [dead, waiting]) == [(0.25, 2.0, 8), (0.25, 2.0, 8)]


# -- the dashboard shows and serves the best model ------------------------------------------------

@pytest.mark.slow
def test_dashboard_lists_and_serves_the_best_model(tmp_path):
    from tests.browser import chromium, screenshot, wait_for, wait_for_dashboard
    from tests.test_inspect import _free_port

    storage = f"sqlite:///{tmp_path / 'd.db'}"
    study.create_study(config.load_study(make_config(tmp_path, "dash")), storage)
    s = study.optimize("dash", storage, n_trials=1)
    entry = release.best_models(s)[0]
    # Optuna's own listing names the model as dptune does.
    assert [m.filename for m in optuna.artifacts.get_all_artifact_meta(s)] == ["best-model-trial-0.msgpack"]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dptune.cli", "dashboard", "--study-name", "dash",
                             "--storage", storage, "--port", str(port)], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_dashboard(url, proc)
        # The download the dashboard offers is the stored model, byte for byte.
        body = urllib.request.urlopen(f"{url}/artifacts/{s._study_id}/{entry['artifact_id']}", timeout=10).read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        params, meta = release.read_model_bytes(body)
        assert meta["trial"] == 0 and meta["val_accuracy"] == s.trials[0].value
        driver = chromium()
        try:
            driver.get(f"{url}/dashboard/studies/{s._study_id}")
            wait_for(driver, lambda d: entry["filename"] in d.page_source, what="the best model among the artifacts")
            from selenium.webdriver.common.by import By

            shown = driver.find_element(By.XPATH, f"//*[contains(text(), '{entry['filename']}')]")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", shown)
            time.sleep(1)  # the scroll and the card's image render asynchronously
            assert shown.is_displayed()
            screenshot(driver, "dashboard_artifact.png")
        finally:
            driver.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("section,message", [({"artifacts": {"keep": 2}}, "artifacts.keep"),
                                             ({"checkpoints": {"every_steps": 10}}, "checkpoints")])
def test_private_search_keeps_one_model_and_takes_no_checkpoints(tmp_path, section, message):
    base = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "studies",
                                            "mnist5k_private_eps8.yaml")))
    base["search_space"] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "search_spaces",
                                                        base["search_space"]))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**base, **section}))
    with pytest.raises(config.ConfigError, match=message):
        config.load_study(str(path))


def test_time_based_checkpoints_are_due_after_their_interval(tmp_path):
    c = resume.Checkpointer(str(tmp_path / "c"), {}, every_seconds=3600.0)
    assert c.active and not c.due(1) and not c.due(2)
    c._last_save -= 3600.0
    assert c.due(3)
    off = resume.Checkpointer(str(tmp_path / "o"), {})
    assert not off.active and not off.due(1000)


@pytest.mark.slow
def test_a_replay_that_differs_stops_before_it_reports_and_restarts_with_fresh_randomness(tmp_path):
    data = load_dataset("digits", seed=0)
    folder = str(tmp_path / "ck")
    _run(data, resume.Checkpointer(folder, {"run": "x"}, every_steps=2))
    seen = []

    def callback(step, metrics):
        seen.append(step)

    hp = Hyperparams(batch_size=300, learning_rate=2.0, noise_multiplier=2.0)
    c = resume.Checkpointer(folder, {"run": "x"}, every_steps=1000, expected_digests={5: "0" * 64})
    cfg = RunConfig(microbatch_size=128, secret=SecretSeed.from_int(7), resume=c, eval_every=1)
    with pytest.raises(resume.ReplayDiverged):
        train_and_evaluate(data, hp, 6, config=cfg, budget=PrivacyBudget(8.0, 1e-5), callback=callback)
    assert seen == []  # step 5 was checked before its evaluation was reported: nothing of the replay got out
    replayed = _run(data, resume.Checkpointer(folder, {"run": "x"}, every_steps=1000))
    c.fresh_randomness = "test"
    c._looked = False  # read the folder again
    fresh = train_and_evaluate(data, hp, 6, config=cfg, budget=PrivacyBudget(8.0, 1e-5))
    assert fresh.history[:4] == replayed.history[:4]  # restored
    assert fresh.history[4:] != replayed.history[4:]  # new batches and noise from the checkpoint on


@pytest.mark.slow
def test_a_heartbeat_retry_forgets_its_parents_resume_record_and_counts_apart(tmp_path):
    """Optuna's heartbeat retry copies the dead trial's user attributes: none of the resume record may carry over."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    storage = f"sqlite:///{tmp_path / 'h.db'}"
    study.create_study(config.load_study(make_config(tmp_path, "hb", checkpoints={"every_steps": 2})), storage)
    s = study.load_study("hb", storage)
    dead = s.ask({"effective_learning_rate": optuna.distributions.FloatDistribution(0.01, 6.0)})
    for k, v in {"sampling_rate": 300 / 1258, "noise_multiplier": 2.0, "planned_steps": 6, "touched_data": True,
                 "resumed_from": {"trial": 99, "step": 4, "randomness": "replayed"}, "progress_steps": 5}.items():
        dead.set_user_attr(k, v)
    s._storage.set_trial_state_values(dead._trial_id, TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(max_retry=2)(s, s.get_trials()[0])
    s = study.optimize("hb", storage, n_trials=1)
    retry = s.trials[1]
    assert retry.state == TrialState.COMPLETE and results.attempt_origin(retry) == 0
    assert retry.user_attrs["resumed_from"] is None and retry.user_attrs["ran_steps"] == [0, 6]
    # No checkpoint of trial 0 existed: a fresh run, so the dead attempt counts apart, at its planned steps.
    assert results.resumed_spends(s.trials, s.trials) == [(300 / 1258, 2.0, 6), (300 / 1258, 2.0, 6)]


@pytest.mark.slow
def test_resume_through_the_streamed_input_pipeline_replays_the_same_run(tmp_path):
    """With records decoded by grain workers ahead of the loop, the resumed loader starts at the checkpoint."""
    from dptune.data import pipeline

    rng = np.random.default_rng(0)
    images = np.kron(rng.integers(0, 256, (200, 2, 2, 1)), np.ones((1, 4, 4, 1))).astype(np.uint8)
    pipeline.write_arrayrecord(str(tmp_path / "r"), "train", images[:160], np.arange(160) % 10, num_classes=10,
                               image_format="png")
    pipeline.write_arrayrecord(str(tmp_path / "r"), "test", images[160:], np.arange(40) % 10, num_classes=10,
                               image_format="png")
    data = load_dataset("arrayrecord:" + str(tmp_path / "r"), validation_fraction=0.25)
    hp = Hyperparams(batch_size=40, learning_rate=1.0, noise_multiplier=2.0)

    def run(ckpt):
        cfg = RunConfig(microbatch_size=16, secret=SecretSeed.from_int(3), resume=ckpt, eval_every=1,
                        feed="streamed", loader_workers=2)
        return train_and_evaluate(data, hp, 6, config=cfg, budget=PrivacyBudget(8.0, 1e-5))

    full = run(None)
    assert full.feed == "streamed"
    run(resume.Checkpointer(str(tmp_path / "ck"), {"run": "p"}, every_steps=3))
    resumed = run(resume.Checkpointer(str(tmp_path / "ck"), {"run": "p"}, every_steps=1000))
    assert resumed.history == full.history and resumed.steps == 6


# -- found by a privacy review: replay start point, retry chains, foreign checkpoints, save-time metadata ----------

@pytest.mark.slow
def test_a_diverged_replay_restarts_from_the_very_checkpoint_it_replayed(tmp_path):
    """The cleanup may not delete the point being replayed, and a divergence restarts from it, in memory."""
    data = load_dataset("digits", seed=0)
    folder = str(tmp_path / "ck")
    full = _run(data, resume.Checkpointer(folder, {"run": "x"}, every_steps=3), steps=5)  # dead attempt: file at 3
    assert [s for s, _ in resume.Checkpointer(folder, {"run": "x"}).files()] == [3]
    # The retry checkpoints at every step (a slower machine, every_minutes); the dead attempt's digest at 5 differs.
    c = resume.Checkpointer(folder, {"run": "x"}, every_steps=1, expected_digests={7: "0" * 64})
    hp = Hyperparams(batch_size=300, learning_rate=2.0, noise_multiplier=2.0)
    cfg = RunConfig(microbatch_size=128, secret=SecretSeed.from_int(8), resume=c, eval_every=1)
    with pytest.raises(resume.ReplayDiverged) as diverged:
        train_and_evaluate(data, hp, 7, config=cfg, budget=PrivacyBudget(8.0, 1e-5))
    # Saved at 4, 5, 6 before the check at 7 failed: KEEP=2, yet the replayed file stays while unverified.
    assert diverged.value.step == 7 and [s for s, _ in c.files()] == [6, 5, 3]
    assert c.started_from.step == 3
    os.unlink(c.started_from.path)  # even if the file were gone, the restart would not depend on it
    point = c.restart_fresh(str(diverged.value))
    assert point is not None and point.step == 3 and [s for s, _ in c.files()] == []
    fresh = train_and_evaluate(data, hp, 7, config=cfg, budget=PrivacyBudget(8.0, 1e-5))
    assert c.started_from is point  # where the study records the restart (resumed_from.step, ran_steps)
    assert fresh.history[:3] == full.history[:3]  # restored from step 3, not trained again from step 0
    assert fresh.history[3:5] != full.history[3:5]
    # Fresh randomness comes from the OS: two restarts from one checkpoint never share their noise.
    other = resume.Checkpointer(folder, {"run": "x"})
    other.started_from = point
    other.restart_fresh("again")
    assert other.resume_secret(point).bits != c.resume_secret(point).bits != point.secret.bits


def test_the_checkpoint_interval_starts_after_the_first_step_not_before_compilation(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(resume.time, "monotonic", lambda: clock[0])
    c = resume.Checkpointer(str(tmp_path / "c"), {}, every_seconds=60.0)
    clock[0] += 600.0  # compilation took longer than the interval
    assert not c.due(1)  # the first step: the interval starts here, no checkpoint at once
    clock[0] += 59.0
    assert not c.due(2)
    clock[0] += 1.0
    assert c.due(3)


def _checkpointing_objective(tmp_path, name):
    storage = f"sqlite:///{tmp_path / (name + '.db')}"
    study.create_study(config.load_study(make_config(tmp_path, name, checkpoints={"every_steps": 10})), storage)
    s, resolved = study.load(name, storage)
    obj = objective.Objective(resolved, dataset_of(resolved.study), 1e-5)
    return s, storage, obj


def test_a_retry_of_a_retry_checks_the_digests_of_every_attempt_its_run_continued(tmp_path):
    """A reports to 300 and dies; B replays A from 100, checkpoints at 140, dies; C resumes B's 140."""
    from types import SimpleNamespace

    s, storage, obj = _checkpointing_objective(tmp_path, "chain")
    a = s.ask()
    a.set_user_attr("replay_digests", {str(k): f"A{k}" for k in range(110, 301, 10)})
    b = s.ask()
    b.set_user_attr("retry_of", 0)
    b.set_user_attr("resumed_from", {"trial": 0, "step": 100, "randomness": "replayed"})
    b.set_user_attr("replay_digests", {str(k): f"A{k}" for k in range(110, 151, 10)})
    c_trial = s.ask()
    c_trial.set_user_attr("retry_of", 0)
    plan = SimpleNamespace(hparams=Hyperparams(batch_size=10, learning_rate=1.0), steps=400, sampling_rate=0.1)
    folder = str(tmp_path / "private")
    identity = obj._checkpointer(c_trial, plan, RunConfig(), folder).identity
    ck = release.checkpoint_folder(folder, 0)
    resume.private_dir(ck)
    header = {"step": 140, "identity": identity, "secret": "00" * 32, "secret_fixed": False, "history": [],
              "examples": 0, "trial": 1}
    resume.write_private(os.path.join(ck, "step-000000140.ckpt"), resume.encode(header, b""))
    c = obj._checkpointer(c_trial, plan, RunConfig(), folder)
    assert c.latest().step == 140
    # Every output A released after 140 is an output of the run C continues: all are checked.
    assert sorted(c.expected_digests) == list(range(150, 301, 10))
    # A "fresh" link cuts the chain: B's run after 100 was not A's.
    b.set_user_attr("resumed_from", {"trial": 0, "step": 100, "randomness": "fresh"})
    c = obj._checkpointer(c_trial, plan, RunConfig(), folder)
    assert sorted(c.expected_digests) == [150]


def test_a_leftover_of_another_study_is_never_resumed_nor_drops_a_trial_from_the_total(tmp_path):
    from optuna.trial import create_trial

    # Links to a larger-numbered trial, or to another trial's attempt, are not followed.
    base = {"sampling_rate": 0.1, "noise_multiplier": 2.0, "planned_steps": 100, "touched_data": True}
    unrelated = create_trial(state=TrialState.FAIL, params={}, distributions={},
                             user_attrs={**base, "sampling_rate": 0.5, "noise_multiplier": 0.8, "planned_steps": 1000})
    for number, link in ((5, 5), (2, 2)):
        unrelated.number = number
        t3 = create_trial(state=TrialState.COMPLETE, value=0.5, params={}, distributions={}, user_attrs={
            **base, "steps": 100, "resumed_from": {"trial": link, "step": 40, "randomness": "replayed"}})
        t3.number = 3
        assert sorted(results.resumed_spends([t3, unrelated], [t3, unrelated])) == [(0.1, 2.0, 100), (0.5, 0.8, 1000)]

    # A study deleted and created again under its name gets another folder and another identity.
    s, storage, obj = _checkpointing_objective(tmp_path, "again")
    first_id, first_folder = release.study_id(s), release.folder_of(s, storage)
    from types import SimpleNamespace

    plan = SimpleNamespace(hparams=Hyperparams(batch_size=10, learning_rate=1.0), steps=400, sampling_rate=0.1)
    trial = s.ask()
    assert obj._checkpointer(trial, plan, RunConfig(), first_folder).identity["study"] == first_id
    optuna.delete_study(study_name="again", storage=storage)
    s2, _, _ = _checkpointing_objective(tmp_path, "again")
    assert release.study_id(s2) != first_id and release.folder_of(s2, storage) != first_folder
    # Studies sharing an artifacts.path each get their own folder under it, named after them.
    shared = str(tmp_path / "shared")
    folders = [release.study_folder(f"sqlite:///{tmp_path / db}", "X", i, shared, create=False)
               for db, i in (("a.db", "aa" * 8), ("b.db", "bb" * 8))]
    assert folders[0] != folders[1] and all(f.startswith(os.path.join(shared, "X") + os.sep) for f in folders)
    # A study created before ids were stored derives a stable one from the storage's id and its trial 0.
    legacy_url = f"sqlite:///{tmp_path / 'l.db'}"
    legacy = optuna.create_study(storage=legacy_url, study_name="old")
    legacy.ask()
    first = release.study_id(legacy, legacy_url)
    assert release.study_id(legacy) == first and len(first) == 32


def test_a_private_searchs_stored_metadata_does_not_depend_on_when_the_best_was_saved(tmp_path):
    """What the guarantee said at save time (complete or not) would reveal the secret K: not stored, not exported."""
    from optuna.trial import create_trial

    from dptune.models import checkpoint

    ps = {"n_trials": 3, "distribution": "poisson", "mean_trials": 3, "eta": None, "sampling_rate": 0.01,
          "noise_multiplier": 1.5, "steps": 100, "per_trial_epsilon": 1.0, "total_epsilon": 4.0}
    attrs = {"private_search": ps, "delta": 1e-5, "dptune_config": {
        "study": {"validation_dataset": "digits", "dataset": "mnist", "artifacts": {"keep": 1}}}}
    trial_attrs = {"sampling_rate": 0.01, "noise_multiplier": 1.5, "planned_steps": 100, "touched_data": True,
                   "steps": 100, "delta": 1e-5, "epsilon_spent": 1.0, "accountant": "rdp"}
    ck = {"model": "cnn", "image_shape": [8, 8, 1], "num_classes": 10}

    def at(n_done, storage=None):
        st = optuna.create_study(direction="maximize", storage=storage, study_name="ps")
        for k, v in attrs.items():
            st.set_user_attr(k, v)
        for i in range(n_done):
            st.add_trial(create_trial(state=TrialState.COMPLETE, value=0.9 if i == 0 else 0.1, params={},
                                      distributions={}, user_attrs=trial_attrs))
        return st, release.model_metadata(st, st.trials[0], ck)

    assert at(1)[1] == at(3)[1]
    assert at(1)[1]["search_guarantee_at_save"] == {"mode": "private_search"}
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    st, _ = at(3, storage)
    checkpoint.save(release.pending_path(release.folder_of(st, storage), 0), {"w": np.ones(3, np.float32)}, ck)
    assert release.keep_best(st, st.trials[0], storage) is not None
    meta = release.export_model(st, storage, str(tmp_path / "out"))
    assert "search_guarantee_at_save" not in meta and meta["search"]["mode"] == "private_search"
    assert "search_guarantee_at_save" not in json.load(open(tmp_path / "out" / release.METADATA_FILE))


def test_a_trials_epsilon_covers_a_diverged_dead_attempt():
    from optuna.trial import create_trial

    base = {"sampling_rate": 0.25, "noise_multiplier": 2.0, "planned_steps": 8, "touched_data": True,
            "delta": 1e-5, "accountant": "rdp"}
    s = optuna.create_study(direction="maximize")
    s.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={},
                             user_attrs={**base, "progress_steps": 6, "checkpoint_step": 4}))
    from dptune.privacy import accounting as privacy

    own = privacy.epsilon(0.25, 2.0, 8, 1e-5, "rdp")
    for randomness, more in (("replayed", False), ("fresh", True)):
        s.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={}, distributions={}, user_attrs={
            **base, "steps": 8, "epsilon_spent": own, "retry_of": 0,
            "resumed_from": {"trial": 0, "step": 4, "randomness": randomness}}))
        got = release._trial_privacy(s, s.trials[-1])
        assert (got["epsilon"] > own) is more and (got.get("attempts") is not None) is more


def test_an_existing_open_folder_is_not_chmodded_but_warned_about(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    os.chmod(folder, 0o755)
    with pytest.warns(resume.OpenFolderWarning, match="other users"):
        resume.private_dir(str(folder))
    assert mode(folder) == 0o755
    inner = resume.private_dir(str(folder / "a" / "b"))
    assert mode(inner) == 0o700 and mode(folder / "a") == 0o700
