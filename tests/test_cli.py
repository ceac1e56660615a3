"""The CLI: real subprocesses, exit codes and one-line errors that name the field."""

import json

import pytest

from tests.conftest import run_cli


def run(*args, timeout=300):
    return run_cli(*args, timeout=timeout)


def test_privacy_epsilon_json_both_accountants():
    p = run("privacy", "epsilon", "--dataset-size", "60000", "--batch-size", "256", "--noise-multiplier", "1.1",
            "--epochs", "60", "--delta", "1e-5", "--accountant", "all", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["accountant"]: r for r in json.loads(p.stdout)["results"]}
    assert rows["pld"]["epsilon"] == pytest.approx(2.38, abs=0.02)
    assert rows["rdp"]["epsilon"] == pytest.approx(2.60, abs=0.02)


def test_privacy_noise_and_steps_round_trip():
    common = ["--dataset-size", "10000", "--batch-size", "500", "--delta", "1e-5", "--json"]
    p = run("privacy", "noise", "--epsilon", "2", "--steps", "300", *common)
    assert p.returncode == 0, p.stderr
    sigma = json.loads(p.stdout)["results"][0]["noise_multiplier"]
    p = run("privacy", "steps", "--epsilon", "2", "--noise-multiplier", str(sigma * 1.001), *common)
    steps = json.loads(p.stdout)["results"][0]["steps"]
    assert 300 <= steps <= 310


def test_default_delta_is_announced():
    p = run("privacy", "epsilon", "--dataset-size", "5000", "--batch-size", "50", "--noise-multiplier", "1",
            "--steps", "10")
    assert p.returncode == 0 and "by default" in p.stdout


@pytest.mark.parametrize(
    "args,field",
    [
        (["noise", "--epsilon", "0", "--dataset-size", "100", "--batch-size", "10", "--steps", "5"], "epsilon"),
        (["noise", "--epsilon", "-3", "--dataset-size", "100", "--batch-size", "10", "--steps", "5"], "epsilon"),
        (["epsilon", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "5",
          "--delta", "1.5"], "delta"),
        (["epsilon", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "5",
          "--delta", "0.05"], "delta"),
        (["epsilon", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "200", "--steps", "5"],
         "batch_size"),
        (["epsilon", "--noise-multiplier", "-1", "--dataset-size", "100", "--batch-size", "10", "--steps", "5"],
         "noise_multiplier"),
        (["epsilon", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "5",
          "--accountant", "moments"], "accountant"),
    ],
)
def test_nonsense_gives_one_line_and_exit_2(args, field):
    p = run("privacy", *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dptune: error: {field}:"), p.stderr


def test_train_json_on_digits(tmp_path):
    p = run("train", "--dataset", "digits", "--epsilon", "8", "--batch-size", "250", "--epochs", "2",
            "--learning-rate", "1", "--private-seed", "0", "--cache-dir", str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["epsilon"] <= 8.0 and r["steps"] == r["steps_requested"] == 11
    assert r["split"]["dataset"] == "digits" and 0 <= r["val_accuracy"] <= 1


def test_train_unknown_dataset():
    p = run("train", "--dataset", "nope")
    assert p.returncode == 2 and p.stderr.startswith("dptune: error: dataset:")


def test_closed_sets_are_the_same_on_the_command_line_and_in_the_schema():
    from dptune.choices import Accountant, Clipping, Feed, Optimizer, values
    from dptune.cli.parser import build_parser
    from dptune.config import schema

    parser = build_parser()
    for value in values(Clipping):  # "fast" included
        args = parser.parse_args(["train", "--clipping", value])
        assert schema.StudyConfig(name="x", privacy={"epsilon": 1.0}, clipping=args.clipping).clipping == value
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    choices = {a.dest: list(a.choices) for a in train._actions if a.choices}
    assert choices["clipping"] == values(Clipping) and choices["feed"] == values(Feed)
    assert choices["optimizer"] == values(Optimizer) and choices["accountant"] == values(Accountant)
