"""XLA compiler options for dptune's compiled steps, chosen by measurement per backend.

On XLA:CPU (jaxlib 0.10), fusions handed to the YNNPACK library are several
times slower than XLA's own loop fusions for the strided reductions of
GroupNorm and for the small batched matmuls of book-keeping clipping: on the
small CNN at B = 256 (2 cores) the forward pass took 31 → 13 ms, the
non-private gradient 84 → 53 ms and the book-keeping clipped sum 88 → 69 ms
with YNNPACK fusions off (``benchmarks/step_throughput.py --xla-options
both`` measures it side by side). The options are passed per compilation
(``jax.jit(..., compiler_options=...)``), so nothing else in the process is
affected, and only when this jaxlib knows them.

On a CPU-only host, :func:`use_host_cores` also gives JAX one CPU device per
core, so that a microbatch is sharded over the cores by the same ``shard_map``
path that shards it over GPUs (XLA:CPU runs one device's kernels on about one
core): at B = 256 the book-keeping step ran 1.27× faster on two host devices
than on one (2 cores; ``benchmarks/step_throughput.py --devices``).

Set ``DPTUNE_XLA_DEFAULTS=0`` to keep XLA's own defaults for both.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax

CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
ENV = "DPTUNE_XLA_DEFAULTS"


@functools.cache
def _accepted(platform: str, options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib compiles a trivial function for ``platform`` with ``options``."""
    import jax
    import jax.numpy as jnp

    device = jax.devices(platform)[0]
    arg = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    try:
        jax.jit(jnp.sum, compiler_options=dict(options)).lower(arg).compile()
    except Exception:  # an unknown option name: this jaxlib has other flags
        return False
    return True


def use_host_cores(limit: int = 8) -> int | None:
    """Ask JAX for one CPU device per usable core (at most ``limit``); call before JAX starts its backends.

    Before JAX is imported this only sets ``JAX_NUM_CPU_DEVICES`` (so commands
    that never use JAX do not pay for importing it); after, it updates JAX's
    config. Leaves everything alone (returns None) when switched off, when the
    host device count is already set (``XLA_FLAGS``'
    ``--xla_force_host_platform_device_count`` or ``JAX_NUM_CPU_DEVICES``), on
    a one-core host, or once the backends are up. Accelerators are unaffected:
    dptune trains on the default backend's devices.
    """
    if os.environ.get(ENV, "1") == "0" or "force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return None
    cores = min(len(os.sched_getaffinity(0)), limit)
    if cores <= 1:
        return None
    if "jax" not in sys.modules:
        os.environ["JAX_NUM_CPU_DEVICES"] = str(cores)
        return cores
    import jax

    if jax.config.values["jax_num_cpu_devices"] != -1:  # -1: nobody set it
        return None
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # backends already initialised: too late for this process
        return None
    return cores


def for_devices(devices: Sequence[jax.Device]) -> dict[str, str]:
    """The compiler options dptune uses for computations on ``devices`` (empty if none apply)."""
    if os.environ.get(ENV, "1") == "0" or not devices:
        return {}
    platform = devices[0].platform
    if platform != "cpu":
        return {}
    return dict(CPU_OPTIONS) if _accepted(platform, tuple(sorted(CPU_OPTIONS.items()))) else {}
