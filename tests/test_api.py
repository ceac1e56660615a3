"""The public API: the manual's "From Python" example runs as written, and the API's contracts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dptune

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "docs" / "guide" / "python.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    (tmp_path / "example.py").write_text(readme_example())
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    best, total = map(float, lines[0].split())
    assert 0 <= best <= 1 and total > 3.0  # two trials at ε = 3 each compose to more than one
    assert any(line.startswith("Guarantee: (") for line in lines)
    accuracy, eps, sigma = map(float, lines[-2].split())
    assert eps <= 1.0 + 1e-9 and sigma > 0
    assert float(lines[-1]) == pytest.approx(dptune.epsilon(512 / 1258, 1.0, 10, 1e-5))
    # The study it made is there to be read, by name, with the API.
    study = dptune.load_study("digits_eps3", f"sqlite:///{tmp_path / 'digits.db'}")
    assert dptune.summarize(study).best["val_accuracy"] == best


def test_every_public_name_resolves_and_is_documented():
    for name in dptune.__all__:
        value = getattr(dptune, name)
        assert value.__doc__, name
    with pytest.raises(AttributeError):
        dptune.not_a_name  # noqa: B018


def test_a_dict_config_is_validated_once_and_nothing_is_written(tmp_path):
    db = tmp_path / "x.db"
    with pytest.raises(dptune.ConfigError, match=r"config: privacy.epsilon"):
        dptune.create_study({"name": "x", "dataset": "digits", "privacy": {"epsilon": -1},
                             "search_space": {"batch_size": 64, "learning_rate": 0.1, "clip_norm": 1.0,
                                              "epochs": 1}}, f"sqlite:///{db}")
    with pytest.raises(dptune.ConfigError, match=r"search_space.batch_size"):
        dptune.create_study({"name": "x", "dataset": "digits", "privacy": {"epsilon": 1},
                             "search_space": {"batch_size": "many", "learning_rate": 0.1, "clip_norm": 1.0,
                                              "epochs": 1}}, f"sqlite:///{db}")
    assert not db.exists()


def test_overrides_reach_the_schema_and_a_study_opened_elsewhere_needs_its_storage(tmp_path):
    from dptune.config.schema import resolve, run_settings

    resolved = resolve(ROOT / "studies" / "mnist5k_eps3.yaml", ["budget.max_epochs=20", ("privacy.epsilon", 1.5)])
    assert resolved.study.budget.max_epochs == 20 and resolved.study.privacy.epsilon == 1.5
    settings = run_settings(None, {"model": "wrn16_4"})
    assert settings.model == "wrn16_4" and settings.privacy.epsilon == 3.0
    with pytest.raises(dptune.ConfigError, match="--set"):
        run_settings(None, ["budget.max_epochs"])
    import optuna

    foreign = optuna.create_study(storage=f"sqlite:///{tmp_path / 'f.db'}", study_name="f")
    with pytest.raises(dptune.DptuneError, match="storage: give the storage URL"):
        dptune.optimize(foreign, n_trials=1)


def test_run_config_defaults_are_the_schemas():
    from dptune.config.schema import default
    from dptune.trainer.train import RunConfig

    config = RunConfig()
    for name in ("model", "microbatch_size", "clipping", "feed", "loader_workers", "device_data_fraction", "seed"):
        assert getattr(config, name) == default(name), name


def _flags_to_settings(*argv):
    from dptune.cli.commands import SETTING_FLAGS, _given
    from dptune.cli.parser import build_parser
    from dptune.config.schema import run_settings

    args = build_parser().parse_args(["train", *argv])
    return run_settings(args.config, [*(args.set or []), *((SETTING_FLAGS[k], v) for k, v in
                                                           _given(args, list(SETTING_FLAGS)).items())])


def test_train_flags_of_zero_are_given_values_and_one_privacy_flag_keeps_the_default_epsilon(tmp_path):
    # A privacy review found that 0 == False dropped --private-seed 0 (reusing a file's fixed seed) and --epsilon 0.
    study_file = tmp_path / "s.yaml"
    study_file.write_text("name: s\ndataset: digits\nprivacy: {epsilon: 8.0}\nprivate_seed: 7\nseed: 3\n")
    s = _flags_to_settings("--config", str(study_file), "--private-seed", "0", "--seed", "0")
    assert (s.private_seed, s.seed, s.privacy.epsilon) == (0, 0, 8.0)
    with pytest.raises(dptune.ConfigError, match="privacy.epsilon"):
        _flags_to_settings("--epsilon", "0")
    s = _flags_to_settings("--delta", "1e-6", "--accountant", "rdp")
    assert (s.privacy.epsilon, s.privacy.delta, s.privacy.accountant) == (3.0, 1e-6, "rdp")
    assert _flags_to_settings("--non-private").privacy is None


def test_a_single_run_refuses_a_search_budget_and_keeps_a_files_training_caps(tmp_path):
    from dptune.config.schema import run_settings

    with pytest.raises(dptune.ConfigError, match="search_budget"):
        run_settings({"dataset": "digits", "privacy": {"epsilon": 1.0}, "search_budget": {"epsilon": 3.0}})
    with pytest.raises(dptune.ConfigError, match="search_privacy"):
        run_settings({"search_privacy": {"total_epsilon": 3.0, "trials": {"mean": 3}}})
    lines = []
    run = dptune.train({"dataset": "digits", "privacy": {"epsilon": 2.0}, "microbatch_size": 128,
                        "budget": {"max_epochs": 0.5}},
                       hyperparameters={"batch_size": 629, "epochs": 4}, log=lines.append)
    assert run.steps == 1 and run.result.steps == 1  # ⌈0.5 / (629/1258)⌉ = 1, not 8
    assert any("capped by budget" in line for line in lines)
    assert run.result.epsilon <= 2.0 + 1e-9
