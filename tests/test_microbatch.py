"""The automatic microbatch: measured among multiples of the device count, cached, re-measured when settings change."""

import json

import jax

from dptune.trainer import microbatch, xla_options


def test_choice_is_measured_then_cached_per_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("DPTUNE_CACHE_DIR", str(tmp_path))
    devices = tuple(jax.devices("cpu")[:1])
    first = microbatch.choose("cnn", (8, 8, 1), 10, devices, upper=32, repeats=1)
    assert not first.cached
    assert set(first.measured) <= {16, 32} and first.microbatch_size in first.measured
    assert first.microbatch_size == max(first.measured, key=lambda s: first.measured[s][0])

    again = microbatch.choose("cnn", (8, 8, 1), 10, devices, upper=32, repeats=1)
    assert again.cached and again.microbatch_size == first.microbatch_size

    # Other compiler options time differently: a separate entry, measured anew.
    monkeypatch.setenv(xla_options.ENV, "0")
    other = microbatch.choose("cnn", (8, 8, 1), 10, devices, upper=32, repeats=1)
    assert not other.cached
    assert len(json.loads((tmp_path / "microbatch.json").read_text())) == 2
