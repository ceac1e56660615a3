"""Multi-device CPU training must not deadlock in XLA's rendezvous (dptune/dispatch.py says why)."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dptune.data.datasets import load_dataset
from dptune.errors import ConfigError
from dptune.trainer import dispatch
from dptune.trainer.dp_step import TrainState
from dptune.trainer.train import Hyperparams, train_step

HELPER = Path(__file__).parent / "helpers" / "dispatch_loop.py"
# Two runs of the helper: one non-private, one private, each 12 steps of B = 1024 in microbatches of 32
# (34 programs a step). Before the fix the helper aborted in its first run in every one of 9 tries (3 of them
# this test, all on this 2-core machine while other tests ran); the CLI command of the issue aborted in
# about half its runs.
RUNS = 2


def test_training_on_two_host_devices_never_aborts():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run([sys.executable, str(HELPER), str(RUNS)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert '"devices": 2' in proc.stdout and f'"runs": {RUNS}' in proc.stdout


class Counting(dispatch.InFlight):
    def __init__(self, limit):
        super().__init__(limit)
        self.tracked = 0
        self.most = 0

    def track(self, outputs):
        self.tracked += 1
        out = super().track(outputs)
        self.most = max(self.most, len(self))
        return out


class Programs:
    """Stands in for StepFunctions (same calls, trivial programs) and counts what train_step dispatches."""

    microbatch_size = 32

    def __init__(self):
        self.dispatched = 0

    def _program(self, value):
        self.dispatched += 1
        return jnp.asarray(value) + 0

    def zeros_like(self, params):
        return self._program(jnp.zeros_like(params))

    def accumulate(self, params, acc, x, y, mask, clip_norm, trainable):
        return self._program(acc + jnp.sum(mask))

    accumulate_nonprivate = accumulate

    def shard_batch(self, *arrays):
        return tuple(jnp.asarray(a) for a in arrays)

    def apply(self, state, acc, *args):
        return TrainState(self._program(state.params + acc), None, None)


def test_every_program_of_a_step_is_tracked_and_the_queue_stays_bounded(monkeypatch):
    bound = Counting(limit=3)
    monkeypatch.setattr(dispatch, "PROCESS", bound)
    ds = load_dataset("digits")
    fns = Programs()
    state = TrainState(jnp.zeros(()), None, None)
    hp = Hyperparams(batch_size=100, learning_rate=0.1)
    for t, private in enumerate((True, False)):
        # 100 examples: 4 microbatches of 32, the last one padded.
        state = train_step(fns, state, ds, np.arange(100), None, t, hp, 100.0, 1.0, 0.0, 0.1, private)
    assert fns.dispatched == 2 * (1 + 4 + 1) == bound.tracked
    assert bound.most == 3
    assert float(state.params) == 200.0


def test_in_flight_waits_for_the_oldest_and_passes_outputs_through():
    bound = dispatch.InFlight(limit=2)
    outs = [bound.track({"a": jnp.full(3, i), "b": jnp.ones(1000), "n": None}) for i in range(5)]
    assert len(bound) == 2
    assert [int(o["a"][0]) for o in outs] == list(range(5))
    assert bound.track(("no arrays", 1)) == ("no arrays", 1) and len(bound) == 2
    gone = jnp.ones(4)
    bound.track(gone)
    gone.delete()  # as a donated output would be
    bound.track(jnp.ones(2))
    bound.track(jnp.ones(2))  # waiting past a deleted output is not an error
    bound.clear()
    assert len(bound) == 0


def test_in_flight_limit_must_be_positive():
    with pytest.raises(ConfigError, match="limit"):
        dispatch.InFlight(limit=0)

