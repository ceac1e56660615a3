"""dptune's XLA settings: per-compilation options known to this jaxlib, one host device per core, both can be off."""

import os
import subprocess
import sys

import jax
import numpy as np

from dptune.models.builtin import build_model, init_params
from dptune.trainer import clipping, xla_options
from dptune.trainer.dp_step import StepFunctions


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
        return clipping.clipped_sum(model, p, x, y, m, 0.5, path="bookkeeping").grads

    ours = jax.jit(f, compiler_options=xla_options.CPU_OPTIONS)(params, x, y, mask)
    plain = jax.jit(f)(params, x, y, mask)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(plain), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


_SET = "from dptune.trainer import xla_options; xla_options.use_host_cores(); "
_BEFORE_JAX = _SET + "import jax; print(jax.device_count())"
_AFTER_JAX = "import jax; " + _SET + "print(jax.device_count())"


def _run(code: str, env_changes: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", xla_options.ENV)}
    env.update(env_changes or {}, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1]


def test_one_host_device_per_core_unless_told_otherwise():
    cores = min(len(os.sched_getaffinity(0)), 8)
    expected = str(cores if cores > 1 else 1)
    assert _run(_BEFORE_JAX) == expected  # by environment, before JAX is imported
    assert _run(_AFTER_JAX) == expected  # by JAX's config, before its backends start
    assert _run(_BEFORE_JAX, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == "3"
    assert _run(_BEFORE_JAX, {xla_options.ENV: "0"}) == "1"


def test_the_cli_does_not_import_jax_for_commands_that_do_not_need_it():
    code = "import sys; import dptune.cli; " + _SET + "print('jax' in sys.modules)"
    assert _run(code) == "False"
