"""One dispatch per logical batch (dptune.trainer.feed): resident and streamed feeds equal the host loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dptune.errors import ConfigError
from dptune.randomness import SecretSeed
from dptune.trainer import feed


def test_feeds_equal_the_loop_on_one_and_four_devices():
    """Same Poisson indices (one of them empty) and key: parameters within 1e-6 of the host loop's."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = Path(__file__).parent / "helpers" / "feed_check.py"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    expected = {"4dev/bookkeeping/dp/aug1/streamed", "4dev/bookkeeping/dp/aug1/resident",
                "4dev/vmap/dp/aug1/resident", "4dev/bookkeeping/plain/aug1/resident",
                "4dev/bookkeeping/dp/aug2/streamed", "1dev/bookkeeping/dp/aug1/streamed",
                "1dev/bookkeeping/dp/aug1/resident", "1dev-loop/vs/alldev-resident"}
    assert set(result["diffs"]) == expected
    for name, diff in result["diffs"].items():
        assert diff <= 1e-6 * max(1.0, result["scale"]), (name, diff)


def test_bucket_is_a_power_of_two_within_the_limit():
    assert [feed.bucket(u, 10) for u in (0, 1, 2, 3, 5, 9, 10)] == [1, 1, 2, 4, 8, 10, 10]


def test_resident_refused_where_it_cannot_hold_the_data():
    class Records:  # a split read record by record: nothing to copy to the device
        def __len__(self):
            return 10

    with pytest.raises(ConfigError, match="feed"):
        feed.choose("resident", Records(), None, augmenting=False, batch_size=4)
    with pytest.raises(ConfigError, match="allowed: auto, resident, streamed, loop"):
        feed.choose("fastest", Records(), None, augmenting=False, batch_size=4)


def test_per_step_batches_are_independent_secret_streams():
    """Step t's batch is a function of (secret, t) alone, distinct across steps and secrets."""
    a, b = SecretSeed.from_int(1), SecretSeed.from_int(2)
    draws = [a.batch_sampler(t).random(4) for t in range(3)]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
    np.testing.assert_array_equal(a.batch_sampler(2).random(4), draws[2])
    assert not np.array_equal(b.batch_sampler(0).random(4), draws[0])
    assert not np.array_equal(a.sampler().random(4), draws[0])


def test_wrapped_splits_are_never_copied_to_the_device():
    """An audit's canary wrapper has `.images` (the canaries only): it must not be taken for the whole split."""
    from dptune.data.datasets import ArraySplit
    from dptune.search.audit import _WithCanaries

    base = ArraySplit(np.zeros((10, 4, 4, 1), np.uint8), np.zeros(10))
    wrapped = _WithCanaries(base, np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32))
    assert feed.choose("auto", wrapped, None, augmenting=False, batch_size=4) == "loop"
    with pytest.raises(ConfigError, match="resident"):
        feed.choose("resident", wrapped, None, augmenting=False, batch_size=4)
