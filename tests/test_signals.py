"""SIGTERM and SIGINT during `dptune optimize` (issue #22): real processes, real storages.

Each storage gets two runs of the same study: the first is stopped with
SIGTERM, the re-run with SIGINT, both while a trial trains. Every run must exit
with the signal's code (143, 130) and dptune's one-line message, without a
traceback; the interrupted trial must be FAIL with the reason, nothing RUNNING,
what finished before unchanged, and the re-run must have continued the study.
"""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from dptune.cli.commands import INTERRUPTED
from dptune.config import schema as config
from dptune.search import study
from dptune.search.storage import open_storage

SPACE = {"batch_size": {"low": 200, "high": 600, "log": True}, "effective_learning_rate": {"low": 1.0, "high": 6.0},
         "clip_norm": 1.0, "noise_multiplier": {"low": 1.5, "high": 3.0}}
# Long trials (many epochs within ε = 8), so that the signal finds one training.
STUDY = {"name": "sig", "dataset": "digits", "privacy": {"epsilon": 8.0, "delta": 1e-5},
         "budget": {"max_epochs": 200, "min_steps": 1}, "pruner": {"name": "none"}, "microbatch_size": 128,
         "private_seed": 0, "search_space": "space.yaml"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One compilation cache for every run here: only the first compiles."""
    return str(tmp_path_factory.mktemp("jax-cache"))


def trials(storage):
    return optuna.load_study(study_name="sig", storage=open_storage(storage, create=False)).get_trials()


def spawn(args, cwd):
    # SIGINT must reach Python's handler even if this test runs as a background job (which ignores it).
    return subprocess.Popen([sys.executable, "-m", "dptune.cli", *args], cwd=cwd, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_training(storage, known, proc, timeout=240):
    """A trial not in ``known`` that has started on the training data."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for t in trials(storage):
            if t.number not in known and t.state == TrialState.RUNNING and t.user_attrs.get("touched_data"):
                return t
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("no trial started training")


@pytest.mark.slow
@pytest.mark.parametrize("storage_kind,workers", [("sqlite", 1), ("journal", 2)], ids=["in-process-sqlite",
                                                                                        "pool-journal"])
def test_signals_fail_the_running_trial_and_a_rerun_continues(tmp_path, cache_dir, storage_kind, workers):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "sig.yaml").write_text(yaml.safe_dump(STUDY))
    storage = f"sqlite:///{tmp_path / 's.db'}" if storage_kind == "sqlite" else f"journal:{tmp_path / 's.journal'}"
    study.create_study(config.load_study(str(tmp_path / "sig.yaml")), storage)
    args = ["optimize", "--study-name", "sig", "--storage", storage, "--n-trials", "5", "--workers", str(workers),
            "--cache-dir", cache_dir]
    stopped_numbers = []
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        before = {t.number: t for t in trials(storage)}
        proc = spawn(args, tmp_path)
        training = wait_for_training(storage, set(before), proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == code, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        said = [line for line in err.splitlines() if line.startswith("dptune")]
        assert said == [INTERRUPTED.format(signal=sig.name)], err[-3000:]
        after = {t.number: t for t in trials(storage)}
        assert not [t for t in after.values() if t.state == TrialState.RUNNING]
        stopped = after[training.number]
        assert stopped.state == TrialState.FAIL and stopped.user_attrs["failed_reason"] == f"interrupted by {sig.name}"
        for number, t in before.items():  # nothing that had finished changed
            assert (after[number].state, after[number].user_attrs) == (t.state, t.user_attrs)
        stopped_numbers.append(training.number)
    # The re-run continued the same study with new trials.
    assert stopped_numbers[1] > stopped_numbers[0]
