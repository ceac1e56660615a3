"""One trial across hosts: JAX's multi-process runtime, with one mechanism for the accountant.

Every process runs the same training loop over a mesh of *all* processes'
devices (``jax.devices()``). What keeps it one DP-SGD mechanism:

* **One secret.** Process 0 draws the 256-bit secret (or takes the fixed one)
  and :func:`shared_secret` sends it to the others, so every process derives
  the same per-step Poisson batch and the same noise key.
* **Each process reads its share.** Arrays are assembled with
  ``jax.make_array_from_callback`` (:func:`put`): a process fills only the
  shards of its own devices, so it gathers (or decodes) only its rows of
  each microbatch.
* **One sum, one noise draw.** The clipped sums of all devices of all
  processes meet in one ``psum``; the noise is drawn inside the compiled step
  from the one replicated key, identical on every device, after that sum.

The secret crosses the network between processes through JAX's coordination
service (``jax.distributed``), which is not encrypted: run the processes on a
network you trust as you trust the data.

Launch (one command per host; see README "Several hosts")::

    dptune train ... --coordinator HOST0:PORT --num-processes N --process-id I
"""

from __future__ import annotations

import socket
import time
from typing import Any

import jax
import numpy as np

from dptune.errors import ConfigError
from dptune.randomness import SecretSeed


def check_launch(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
    """Refuse a launch that cannot form one runtime, before anything waits on the network.

    Raises:
      ConfigError: naming ``coordinator``, ``num_processes`` or ``process_id``.
    """
    if num_processes < 1:
        raise ConfigError("num_processes", f"must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError("process_id", f"must be in [0, {num_processes}) for --num-processes {num_processes}, "
                                        f"got {process_id}")
    if not coordinator_address:
        if num_processes > 1:
            # Alone, each process would train its own model and print its own ε.
            raise ConfigError("coordinator", f"--num-processes {num_processes} needs --coordinator HOST:PORT "
                                             "(the address of process 0)")
        return
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError("coordinator", f"expected HOST:PORT with a port in [1, 65535], got {coordinator_address!r}")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except (OSError, UnicodeError):
        raise ConfigError("coordinator", f"cannot resolve the host {host!r}") from None


def initialize(coordinator_address: str | None, num_processes: int, process_id: int,
               timeout_seconds: int = 120) -> None:
    """Join the multi-process runtime (CPU collectives via gloo, so it also runs on CPU-only hosts).

    Every process must join within ``timeout_seconds`` of the first.

    Raises:
      ConfigError: a launch :func:`check_launch` refuses, a port process 0 cannot listen on, or a
        coordinator that does not answer within ``timeout_seconds``.
    """
    check_launch(coordinator_address, num_processes, process_id)
    assert coordinator_address is not None  # check_launch refuses several processes without one
    host, _, port = coordinator_address.rpartition(":")
    # JAX's runtime aborts the whole process (no exception) when it cannot reach or bind the coordinator:
    # find out first, and say so in one line.
    if process_id == 0:
        _check_bindable(int(port))
    else:
        _wait_for(host.strip("[]"), int(port), timeout_seconds)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_seconds)


def _check_bindable(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise ConfigError("coordinator", f"process 0 cannot listen on port {port} here ({e.strerror}); "
                                             "choose a free port") from None


def _wait_for(host: str, port: int, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError("coordinator", f"nothing answered at {host}:{port} within {timeout_seconds:g} s; "
                                                 "start process 0 there first") from None
            time.sleep(0.5)


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host values (the same on every process) → global arrays with ``sharding``.

    ``jax.device_put`` refuses shardings over other processes' devices; each
    process here builds only its own devices' shards.
    """
    def one(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = put(np.asarray(jax.random.key_data(leaf)), sharding)
            return jax.jit(jax.random.wrap_key_data, out_shardings=sharding)(data)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree)


def fetch(tree: Any) -> Any:
    """Host (NumPy) values of replicated arrays, read from this process's first shard of each."""
    def one(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_shards[0].data)
        return np.asarray(leaf)

    return jax.tree_util.tree_map(one, tree)


def shared_secret(secret: SecretSeed) -> SecretSeed:
    """Process 0's secret (and whether it was fixed) on every process (itself where there is one process)."""
    if jax.process_count() == 1:
        return secret
    from jax.experimental import multihost_utils

    payload = np.frombuffer(secret.bits + bytes([int(secret.fixed)]), np.uint8)
    shared = bytes(np.asarray(multihost_utils.broadcast_one_to_all(payload), np.uint8))
    return SecretSeed(shared[:-1], fixed=bool(shared[-1]))


def assert_same(settings: Any, what: str) -> None:
    """Refuse to go on unless every process was given the same ``settings`` (a JSON-able value).

    One mechanism needs one configuration: a process with another C, σ, data
    split or seed would add its rows to the shared sum under settings the
    printed ε does not describe. Only a SHA-256 digest crosses the network.

    Raises:
      ConfigError: the processes disagree.
    """
    if jax.process_count() == 1:
        return
    import hashlib
    import json

    from jax.experimental import multihost_utils

    from dptune.errors import ConfigError

    digest = np.frombuffer(hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).digest(),
                           np.uint8)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(digest), np.uint8)
    mismatch = np.asarray(multihost_utils.process_allgather(np.asarray([int(not np.array_equal(agreed, digest))])))
    if mismatch.any():
        bad = [int(i) for i in np.flatnonzero(mismatch.reshape(-1))]
        raise ConfigError(what, f"processes {bad} were given settings that differ from process 0's; "
                                "every process of one run needs the same command line and data")
