"""The study driver end to end, on real SQLite storage, read back with plain Optuna."""

import contextlib
import sqlite3
from pathlib import Path

import optuna
import pytest
import yaml

from dptune.config import schema as config
from dptune.errors import ConfigError, DptuneError
from dptune.search import results, study
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]

SPACE = {
    "batch_size": {"low": 300, "high": 1200, "log": True},
    "effective_learning_rate": {"low": 1.0, "high": 8.0, "log": True},
    "clip_norm": {"low": 0.5, "high": 2.0, "log": True},
    "noise_multiplier": {"low": 0.5, "high": 3.0, "log": True},
}
STUDY = {
    "name": "e2e",
    "dataset": "mnist5k",
    "model": "cnn",
    "privacy": {"epsilon": 3.0, "delta": 1e-5},
    "sampler": {"name": "tpe", "n_startup_trials": 3},
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    "budget": {"max_epochs": 2, "min_steps": 3},
    "eval_every_epochs": 0.5,
    "private_seed": 0,
    "search_space": "space.yaml",
}


def write(tmp_path, study_cfg=None, space=None, name="study.yaml"):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space if space is not None else SPACE))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study_cfg if study_cfg is not None else STUDY))
    return str(path)


def storage_of(tmp_path):
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.mark.slow
def test_end_to_end_with_pruning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = {**SPACE, "effective_learning_rate": {"low": 1e-3, "high": 8.0, "log": True}}
    resolved = config.load_study(write(tmp_path, space=space))
    storage = storage_of(tmp_path)
    study.create_study(resolved, storage)
    # The noise is secret and differs in every run, so the trials are fixed where the outcome must not depend on
    # it: two that learn (the pruner's reference), one whose σ allows no step, three that cannot learn (a step
    # size 2,000 times smaller) and so fall below the median once the pruner may act.
    queued = optuna.load_study(study_name="e2e", storage=storage)
    learns = {"batch_size": 329, "effective_learning_rate": 2.4, "clip_norm": 1.5, "noise_multiplier": 1.0}
    for params in (learns, learns, dict(learns, batch_size=600, noise_multiplier=0.6),
                   *[dict(learns, effective_learning_rate=1e-3)] * 3):
        queued.enqueue_trial(params)
    study.optimize("e2e", storage, n_trials=6)

    s = optuna.load_study(study_name="e2e", storage=storage)
    assert s.user_attrs["dptune_config"]["study"]["name"] == "e2e"
    trials = s.get_trials()
    assert len(trials) == 6
    states = {t.state for t in trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert optuna.trial.TrialState.COMPLETE in states
    for t in trials:
        a = t.user_attrs
        assert a["epsilon_target"] == 3.0 and a["delta"] == 1e-5 and a["accountant"] == "pld"
        assert 0 <= a["epsilon_spent"] <= 3.0
        if "rejected_reason" in a:
            assert a["steps"] == 0 and not t.intermediate_values
            continue
        for key in ("sampling_rate", "noise_multiplier", "clip_norm", "steps", "epochs", "examples_per_second",
                    "compile_seconds", "wall_seconds", "seed", "devices", "test_accuracy"):
            assert key in a, key
        assert t.intermediate_values, "validation accuracy must be reported as it trains"
        assert a["steps"] <= a["planned_steps"]
        if t.state == optuna.trial.TrialState.PRUNED:
            assert a["steps"] < a["planned_steps"]
    pruned_mid_training = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED
                           and "rejected_reason" not in t.user_attrs]
    assert pruned_mid_training, "the median pruner stopped no trial"
    summary = results.summarize(s)
    assert summary.best is not None and summary.best["value"] > 0.3
    assert summary.trial_steps == sum(t.user_attrs.get("steps", 0) for t in trials)

    # Re-running continues the same study.
    study.optimize("e2e", storage, n_trials=1)
    assert len(optuna.load_study(study_name="e2e", storage=storage).trials) == 7


def test_create_refuses_a_different_config_and_skips_an_identical_one(tmp_path):
    storage = storage_of(tmp_path)
    resolved = config.load_study(write(tmp_path))
    study.create_study(resolved, storage)
    with pytest.raises(DptuneError, match="already exists"):
        study.create_study(resolved, storage)
    study.create_study(resolved, storage, skip_if_exists=True)
    changed = dict(STUDY, privacy={"epsilon": 8.0, "delta": 1e-5})
    with pytest.raises(DptuneError, match="different configuration"):
        study.create_study(config.load_study(write(tmp_path, changed, name="b.yaml")), storage,
                           skip_if_exists=True)


def test_load_unknown_study_lists_available(tmp_path):
    storage = storage_of(tmp_path)
    study.create_study(config.load_study(write(tmp_path)), storage)
    with pytest.raises(DptuneError, match="available: e2e"):
        study.load("nope", storage)


BAD_STUDIES = [
    ({"colour": "blue"}, r"colour: unknown key; allowed: name, dataset"),
    ({"privacy": {"epsilon": 0}}, r"privacy.epsilon"),
    ({"privacy": {"epsilon": 3, "delta": 2}}, r"privacy.delta"),
    ({"privacy": {"epsilon": 3, "accountant": "moments"}}, r"privacy.accountant: must be one of 'pld' or 'rdp'"),
    ({"privacy": {"epsilon": 3, "epslion": 2}}, r"privacy.epslion: unknown key; allowed: epsilon, delta, accountant"),
    ({"sampler": {"name": "bayes"}}, r"sampler.name: must be one of"),
    ({"pruner": {"name": "early"}}, r"pruner.name: must be one of"),
    ({"budget": {"max_epochs": None, "max_steps": None}}, r"budget"),
    ({"microbatch_size": 0}, r"microbatch_size"),
    ({"name": "has space"}, r"name"),
    ({"search_space": "missing.yaml"}, r"search_space: 'missing.yaml' not found"),
]


@pytest.mark.parametrize("change,message", BAD_STUDIES)
def test_malformed_study_files(tmp_path, change, message):
    cfg = {**STUDY, **change}
    cfg = {k: v for k, v in cfg.items() if not (k == "privacy" and v is None)}
    with pytest.raises(ConfigError, match=message):
        config.load_study(write(tmp_path, cfg))


BAD_SPACES = [
    ({**SPACE, "lr": 0.1}, r"lr: unknown key; allowed: batch_size"),
    ({k: v for k, v in SPACE.items() if k != "batch_size"}, r"batch_size: Field required"),
    ({**SPACE, "epochs": {"low": 1, "high": 3}}, r"exactly one of noise_multiplier"),
    ({**SPACE, "learning_rate": 0.1}, r"exactly one of learning_rate and effective_learning_rate"),
    ({**SPACE, "clip_norm": {"low": 0, "high": 2, "log": True}}, r"clip_norm"),
    ({**SPACE, "clip_norm": {"low": 3, "high": 2}}, r"clip_norm"),
    ({**SPACE, "clip_norm": {"low": 1, "hi": 2}}, r"clip_norm"),
]


@pytest.mark.parametrize("space,message", BAD_SPACES)
def test_malformed_search_spaces(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        config.load_study(write(tmp_path, space=space))


def test_not_yaml_and_not_a_mapping(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_study(str(p))
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load_study(str(p))


def _run_cli(*args, cwd, timeout=300):
    return run_cli(*args, cwd=cwd, timeout=timeout)


def _studies_in(db: Path) -> list:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select study_name from studies").fetchall()
        except sqlite3.OperationalError:
            return []


@pytest.mark.parametrize("change,field", [
    ({"privacy": {"epsilon": 3, "delta": 0.01}}, "delta"),   # δ ≥ 1/N: only known after opening the data
    ({"dataset": "nope"}, "dataset"),
    ({"model": "vit"}, "model"),
    ({"sampler": {"name": "grid"}}, "space.yaml: batch_size"),  # the search-space file is the one to edit
])
def test_cli_create_errors_leave_storage_untouched(tmp_path, change, field):
    path = write(tmp_path, {**STUDY, **change})
    db = tmp_path / "s.db"
    p = _run_cli("study", "create", "--config", path, "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("dptune: error:") and field in p.stderr, p.stderr
    assert _studies_in(db) == []


def test_cli_malformed_file_names_file_and_field(tmp_path):
    path = write(tmp_path, {**STUDY, "colour": "blue"})
    p = _run_cli("study", "create", "--config", path, "--storage", f"sqlite:///{tmp_path / 's.db'}", cwd=tmp_path)
    assert p.returncode == 2
    assert "study.yaml: colour: unknown key" in p.stderr
    assert not (tmp_path / "s.db").exists()


# -- privacy of the search itself ---------------------------------------------------

PRIVATE_SPACE = {
    "batch_size": 400,
    "epochs": 2,
    "effective_learning_rate": {"low": 1.0, "high": 8.0, "log": True},
    "clip_norm": {"low": 0.5, "high": 2.0, "log": True},
}
PRIVATE_STUDY = {
    "name": "private",
    "dataset": "digits",
    "search_privacy": {"total_epsilon": 8.0, "delta": 1e-5,
                       "trials": {"distribution": "geometric", "mean": 2}},
    "validation_dataset": "mnist5k",  # public examples (resized to digits' 8×8) choose the best trial
    "image_size": 8,
    "budget": {"max_epochs": 2, "min_steps": 1},
    "private_seed": 0,
    "microbatch_size": 128,
    "search_space": "space.yaml",
}


@pytest.mark.parametrize("change,message", [
    ({"sampler": {"name": "tpe"}}, "sampler.name: private search needs hyperparameters drawn independently"),
    ({"pruner": {"name": "median"}}, "pruner.name: pruning is not accounted for"),
    ({"validation_dataset": None}, "validation_dataset: a private search chooses the best trial"),
    ({"privacy": {"epsilon": 3}}, "exactly one of privacy"),
])
def test_private_search_refusals(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        config.load_study(write(tmp_path, {**PRIVATE_STUDY, **change}, PRIVATE_SPACE))


def test_private_search_needs_a_fixed_mechanism(tmp_path):
    space = {**PRIVATE_SPACE, "batch_size": {"low": 100, "high": 800}}
    with pytest.raises(ConfigError, match="space.yaml: batch_size: must be a fixed value"):
        config.load_study(write(tmp_path, PRIVATE_STUDY, space))


@pytest.mark.slow
def test_private_search_runs_the_drawn_number_of_identical_trials(tmp_path):
    storage = storage_of(tmp_path)
    s = study.create_study(config.load_study(write(tmp_path, PRIVATE_STUDY, PRIVATE_SPACE)), storage)
    plan = s.user_attrs["private_search"]
    k = plan["n_trials"]
    assert k >= 1 and plan["total_epsilon"] <= 8.0
    assert plan["per_trial_epsilon"] < plan["total_epsilon"]
    study.optimize("private", storage, n_trials=50)  # capped at the drawn K
    s = optuna.load_study(study_name="private", storage=storage)
    assert len(s.trials) == k
    for t in s.trials:
        assert t.user_attrs["noise_multiplier"] == plan["noise_multiplier"]
        assert t.user_attrs["steps"] == plan["steps"]
        assert t.user_attrs["derived"] == "private_search"
    g = results.summarize(s).search
    assert g["mode"] == "private_search" and g["complete"] and g["total_epsilon"] <= 8.0
    study.optimize("private", storage, n_trials=5)
    assert len(optuna.load_study(study_name="private", storage=storage).trials) == k


def test_ordinary_study_total_composes_every_trial_that_touched_data(tmp_path):
    from dptune.privacy.search_totals import composed_epsilon

    storage = storage_of(tmp_path)
    s = study.create_study(config.load_study(write(tmp_path, {**STUDY, "dataset": "digits"})), storage)
    # Three finished trials recorded as a worker would, plus one rejected (no data touched).
    dist = {"batch_size": optuna.distributions.IntDistribution(1, 2000)}
    for q, sigma, steps, state in [(0.2, 1.5, 10, "COMPLETE"), (0.3, 2.0, 4, "PRUNED"), (0.1, 1.0, 0, "PRUNED")]:
        attrs = {"sampling_rate": q, "noise_multiplier": sigma, "steps": steps, "planned_steps": 20}
        if steps == 0:
            attrs = {"rejected_reason": "test", "steps": 0}
        s.add_trial(optuna.trial.create_trial(
            params={"batch_size": 300}, distributions=dist, user_attrs=attrs,
            state=getattr(optuna.trial.TrialState, state), value=0.5 if state == "COMPLETE" else None))
    g = results.summarize(s).search
    expected = composed_epsilon([(0.2, 1.5, 10), (0.3, 2.0, 4)], 1e-5)
    assert g["mode"] == "composition" and g["trials_touching_data"] == 2
    assert g["total_epsilon"] == pytest.approx(expected["rdp"])
    from dptune.privacy import accounting as privacy

    assert g["total_epsilon"] > privacy.epsilon(0.2, 1.5, 10, 1e-5, "rdp")
    assert g["total_epsilon"] > privacy.epsilon(0.3, 2.0, 4, 1e-5, "rdp")


def test_cli_study_list_and_show_default_storage(tmp_path):
    for name in ("first", "second"):
        path = write(tmp_path, {**STUDY, "name": name, "dataset": "digits"}, name=f"{name}.yaml")
        assert _run_cli("study", "create", "--config", path, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "studies").glob("*.db")) == ["first.db", "second.db"]
    import json

    p = _run_cli("study", "list", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(r["name"] for r in json.loads(p.stdout)) == ["first", "second"]
    p = _run_cli("study", "show", "first", "--json", cwd=tmp_path)
    assert p.returncode == 0 and json.loads(p.stdout)["n_trials"] == 0
    p = _run_cli("study", "best", "first", cwd=tmp_path)
    assert p.returncode == 2 and "no completed trial" in p.stderr


def test_two_processes_never_run_trials_of_one_sqlite_study_at_once(tmp_path):
    """SQLite lets two processes take one queued trial (one record, two runs, one counted): one at a time."""
    from dptune.search import storage as storage_lib

    storage = storage_of(tmp_path)
    study.create_study(config.load_study(write(tmp_path)), storage)
    with holding_the_lock(tmp_path / "studies.db"):  # as another `dptune optimize` would hold it
        with pytest.raises(storage_lib.StorageError, match="another dptune process is running trials"):
            study.optimize("e2e", storage, n_trials=1)
    assert optuna.load_study(study_name="e2e", storage=storage).trials == []


@contextlib.contextmanager
def holding_the_lock(path):
    """Another process that holds ``storage.one_process``'s lock on the SQLite file ``path``."""
    import subprocess
    import sys

    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
