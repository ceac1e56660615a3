"""Parallel workers, shared storages and faults — real processes, real storages."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import run_cli

SPACE = {"batch_size": {"low": 200, "high": 600, "log": True}, "effective_learning_rate": {"low": 1.0, "high": 6.0},
         "clip_norm": 1.0, "noise_multiplier": {"low": 1.5, "high": 3.0}}


def make_config(tmp_path, name="pool", max_epochs=2, pruner="none"):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    cfg = {"name": name, "dataset": "digits", "privacy": {"epsilon": 8.0, "delta": 1e-5},
           "budget": {"max_epochs": max_epochs, "min_steps": 1}, "pruner": {"name": pruner},
           "microbatch_size": 128, "private_seed": 0, "search_space": "space.yaml"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def cli(*args, cwd=None, timeout=600):
    return run_cli(*args, cwd=cwd, timeout=timeout)


def spawn(*args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def trials_of(name, storage):
    from dptune.search.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials()


def wait_for_running(name, storage, timeout=120, pid=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for t in trials_of(name, storage):
            w = t.user_attrs.get("worker", {})
            if (
                t.state == TrialState.RUNNING
                and "planned_steps" in t.user_attrs
                and (pid is None or w.get("pid") == pid)
            ):
                return t
        time.sleep(0.5)
    raise AssertionError("no trial started")


def test_sqlite_refused_for_parallel_workers(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert cli("study", "create", "--config", make_config(tmp_path), "--storage", storage).returncode == 0
    p = cli("optimize", "--study-name", "pool", "--storage", storage, "--workers", "2", "--n-trials", "2")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("dptune: error: storage: SQLite is not safe")
    assert "journal:///" in p.stderr and "postgresql://" in p.stderr


@pytest.mark.slow
def test_two_journal_workers_on_forced_host_devices(tmp_path):
    storage = f"journal:///{tmp_path / 'study.journal'}"
    assert cli("study", "create", "--config", make_config(tmp_path), "--storage", storage).returncode == 0
    p = cli(
        "optimize",
        "--study-name",
        "pool",
        "--storage",
        storage,
        "--workers",
        "2",
        "--devices-per-trial",
        "2",
        "--n-trials",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    trials = trials_of("pool", storage)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5  # at most workers − 1 beyond the target
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 2
    assert all(t.user_attrs["devices"] == 2 for t in finished if "devices" in t.user_attrs)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    # A worker's later trials start without compiling (its step functions stay in memory).
    by_worker = {}
    for t in sorted(finished, key=lambda t: t.number):
        by_worker.setdefault(t.user_attrs["worker"]["pid"], []).append(t.user_attrs["compile_seconds"])
    for compiles in by_worker.values():
        if len(compiles) > 1:
            assert max(compiles[1:]) < 0.5 * compiles[0] + 0.5


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried(tmp_path):
    storage = f"journal:///{tmp_path / 'study.journal'}"
    assert (
        cli("study", "create", "--config", make_config(tmp_path, max_epochs=25), "--storage", storage).returncode == 0
    )
    common = ["dptune.search.workers", "--study-name", "pool", "--storage", storage, "--stop-at-finished", "2"]
    victim = spawn(*common)
    running = wait_for_running("pool", storage, pid=victim.pid)
    survivor = spawn(*common)
    time.sleep(2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err[-3000:]
    trials = {t.number: t for t in trials_of("pool", storage)}
    killed = trials[running.number]
    assert killed.state == TrialState.FAIL and "died" in killed.user_attrs["failed_reason"]
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == running.number]
    assert retries and retries[0].params == killed.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len([t for t in trials.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) >= 2
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]


# -- PostgreSQL: several "machines" sharing one study ---------------------------------------


def _pg_bin() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1 (Debian's postgresql package)."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("SKIPPED LOUDLY: PostgreSQL is not installed (.ci/run installs Debian's 'postgresql')")
    pytest.importorskip("psycopg", reason="SKIPPED LOUDLY: psycopg missing (pip install -e '.[test]')")
    root = tempfile.mkdtemp(prefix="dptune-pg-")
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sock)
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        as_user + [str(bin_dir / "initdb"), "-D", data, "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        as_user
        + [
            str(bin_dir / "pg_ctl"),
            "-D",
            data,
            "-w",
            "-l",
            os.path.join(root, "log"),
            "-o",
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            as_user + [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "dptune"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/dptune"
    finally:
        subprocess.run(as_user + [str(bin_dir / "pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_a_postgresql_study(tmp_path, postgres):
    assert cli("study", "create", "--config", make_config(tmp_path), "--storage", postgres).returncode == 0
    procs = [
        spawn("dptune.cli", "optimize", "--study-name", "pool", "--storage", postgres, "--n-trials", "2")
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    trials = trials_of("pool", postgres)
    assert len(trials) == 4
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # none lost, none duplicated
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2


def test_unreachable_database_fails_fast_with_a_clear_error():
    port = _free_port()  # nothing listens there
    tick = time.time()
    p = cli("study", "list", "--storage", f"postgresql://postgres@127.0.0.1:{port}/nope", timeout=120)
    assert p.returncode == 2 and time.time() - tick < 60
    assert p.stderr.strip().splitlines()[-1].startswith("dptune: error: storage: cannot open")


def test_auto_layout(monkeypatch):
    from dptune.search import workers

    monkeypatch.setattr(workers, "local_gpus", lambda: [])
    assert workers.auto_layout("cnn", "journal:///x")[:2] == (1, None)
    monkeypatch.setattr(workers, "local_gpus", lambda: ["0", "1", "2", "3"])
    assert workers.auto_layout("cnn", "journal:///x")[:2] == (4, 1)
    assert workers.auto_layout("cnn", "sqlite:///x.db")[:2] == (1, None)
    assert workers.auto_layout("resnet18", "postgresql://h/db")[:2] == (1, None)
    env = workers.worker_env(2, 1, ["0", "1", "2", "3"])
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")  # the launcher's own count must not reach its workers
    env = workers.worker_env(0, 3, [])
    assert "--xla_force_host_platform_device_count=3" in env["XLA_FLAGS"]
    assert "JAX_NUM_CPU_DEVICES" not in env
