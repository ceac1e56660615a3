"""SIGTERM and SIGINT during `dptune optimize`: real processes, real storages.

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


# -- finalize and audit: the same orderly stop, in-process, with a real SIGTERM to this process ----------------

def _sigterm_at_training(monkeypatch, module):
    """``module.train_and_evaluate`` sends this process SIGTERM as it starts, after the run is recorded."""
    from dptune import interrupt

    def stop(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(300):
            time.sleep(0.1)  # dptune's handler raises here, or records it inside a deferred section
            interrupt.raise_if_pending()  # as the trainer does before each step
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(module, "train_and_evaluate", stop)


def _one_line(capfd):
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "interrupted by SIGTERM" in lines[0], err
    return lines[0]


def test_sigterm_during_finalize_fails_the_final_run_and_finalize_runs_again(tmp_path, monkeypatch, capfd):
    import dptune
    from dptune.cli.app import main
    from dptune.search import modes, objective
    from tests.test_tuning_modes import _config

    url = f"sqlite:///{tmp_path / 'f.db'}"
    dptune.optimize(dptune.create_study(_config("fin", {"mode": "scaled", "factor": 4}), storage=url), n_trials=1)
    with monkeypatch.context() as m:
        _sigterm_at_training(m, objective)
        assert main(["study", "finalize", "fin", "--storage", url]) == 128 + signal.SIGTERM
    assert "run dptune study finalize again" in _one_line(capfd)
    finals = [t for t in optuna.load_study(study_name="fin", storage=url).trials if modes.is_final(t)]
    assert [t.state for t in finals] == [TrialState.FAIL] and "Interrupted" in finals[0].user_attrs["failed_reason"]
    # Nothing left RUNNING or queued; the next call trains the final run.
    assert main(["study", "finalize", "fin", "--storage", url]) == 0
    states = [t.state for t in optuna.load_study(study_name="fin", storage=url).trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert states.count(TrialState.COMPLETE) == 2  # the proxy and the released final run


def test_sigterm_during_an_audit_fails_its_record(tmp_path, monkeypatch, capfd):
    from dptune.cli.app import main
    from dptune.search import audit
    from tests.test_audit import _study

    s, url = _study(tmp_path)
    _sigterm_at_training(monkeypatch, audit)
    assert main(["audit", "--study-name", "aud", "--storage", url, "--canaries", "20"]) == 128 + signal.SIGTERM
    _one_line(capfd)
    record = optuna.load_study(study_name="aud", storage=url).trials[-1]
    assert record.user_attrs["audit_of"] == 0 and record.state == TrialState.FAIL
    assert record.user_attrs["touched_data"]  # stopped at the data: counted at its planned steps
