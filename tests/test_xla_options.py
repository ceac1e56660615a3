"""dptune's per-compilation XLA options: known to this jaxlib, switchable off, and the same numbers either way."""

import jax
import numpy as np
import pytest

from dptune import bookkeeping, xla_options
from dptune.dp_step import StepFunctions
from dptune.models import build_model, init_params


def test_cpu_options_are_accepted_by_this_jaxlib():
    # If a jaxlib upgrade renames the flag, this fails instead of silently losing the speed-up.
    assert xla_options.for_devices(jax.devices("cpu")) == xla_options.CPU_OPTIONS


def test_switch_off_and_step_functions_use_them(monkeypatch):
    model = build_model("cnn", 10)
    devices = tuple(jax.devices("cpu")[:1])
    assert StepFunctions(model, "sgd", 8, devices).compiler_options == xla_options.CPU_OPTIONS
    monkeypatch.setenv(xla_options.ENV, "0")
    assert xla_options.for_devices(devices) == {}
    assert StepFunctions(model, "sgd", 8, devices).compiler_options == {}


def test_same_clipped_sum_with_and_without_the_options():
    model = build_model("cnn", 10)
    params = init_params(model, (8, 8, 1), jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    mask = np.ones(16, np.float32)

    def f(p, x, y, m):
        return bookkeeping.clipped_sum(model, p, x, y, m, 0.5)

    ours = jax.jit(f, compiler_options=xla_options.CPU_OPTIONS)(params, x, y, mask)
    plain = jax.jit(f)(params, x, y, mask)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
