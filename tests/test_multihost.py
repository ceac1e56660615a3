"""One trial across processes (dptune.trainer.multihost): 2 processes × 2 CPU devices equal 1 process × 4 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "helpers" / "multiprocess_check.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(processes: int, devices_each: int, out: Path, feed: str, clip=lambda i: 1.0) -> list:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}", JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), "--process-id", str(i), "--num-processes", str(processes),
                               "--port", str(port), "--out", str(out), "--feed", feed, "--clip-norm", str(clip(i))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    return procs


def _run(processes: int, devices_each: int, out: Path, feed: str) -> dict:
    procs = _start(processes, devices_each, out, feed)
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_devices(tmp_path):
    many = _run(2, 2, tmp_path / "two.json", "resident")
    one = _run(1, 4, tmp_path / "one.json", "resident")
    # Each process drew its own secret from the OS; after sharing they hold one (process 0's).
    digests = {(tmp_path / f"two.json.secret.{i}").read_text() for i in range(2)}
    assert len(digests) == 1
    assert many["processes"] == 2 and one["processes"] == 1
    assert many["devices"] == one["devices"] == 4
    assert many["steps"] == one["steps"] == 3
    # One mechanism: the same accountant inputs, the same ε.
    assert many["epsilon"] == one["epsilon"]
    a, b = np.asarray(many["params"]), np.asarray(one["params"])
    assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b)))
    assert many["val_accuracy"] == pytest.approx(one["val_accuracy"], abs=1e-6)


def test_processes_given_different_settings_refuse_to_train(tmp_path):
    """Process 1 with another clipping norm: its rows would join the sum under settings the ε does not describe."""
    procs = _start(2, 1, tmp_path / "bad.json", "resident", clip=lambda i: 1.0 if i == 0 else 1e-6)
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode != 0
        assert "settings" in err and "differ from process 0" in err, err[-2000:]
    assert not (tmp_path / "bad.json").exists()
