"""How far the host loop may run ahead of the devices: a bound that keeps multi-device CPU runs from deadlocking.

Root cause of issue #15 (XLA rendezvous timeout, SIGABRT, on a CPU host with
several JAX devices), found in jaxlib 0.10.2's PjRt CPU client and confirmed
with gdb on a stuck process:

* The client launches each device's share of a multi-device program as a task
  on one thread pool of ``max(cores, devices)`` threads, so 2 threads on a
  2-core host with dptune's one device per core. Every multi-device program
  counts as a "collective launch": the client runs them one at a time, and all
  of a program's device tasks must run at once, because an all-reduce (the
  ``psum`` of the private step, the gradient sum XLA inserts in the non-private
  one) waits in a rendezvous until every device has arrived.
* Before it enqueues a device's task, the launch takes a slot of that device's
  in-flight semaphore (``max_inflight_computations_per_device``, 32 by
  default, not settable through JAX) and it does so *on a pool thread*. Once
  the host has dispatched 32 programs that have not finished, the launch of
  the next one blocks a pool thread; the other thread is running device 0's
  half of the oldest program and waits in its rendezvous for device 1's half,
  which has no thread left to run on. Nothing moves until XLA's 40 s
  termination timeout aborts the process.

The stack of a stuck process shows exactly that: one pool thread in
``Semaphore::ScopedAcquire`` under ``CpuPjRtRawLoadedExecutable::Execute``,
the other in ``InProcessCommunicator::AllReduce`` waiting for its peer, and
the Python thread waiting for the launch. A loop of ``shard_map`` + ``psum``
programs aborts every time when it lets 32 or more of them be pending, and
never at 31 or fewer. The training loop dispatches 2 + ⌈B/microbatch⌉
programs a step and only blocks at evaluations, so with evaluation off it
reached 32 within a few steps; the abort needs the pool to pick the blocking
launch before the waiting device task, hence "at random".

Neither ``jax_cpu_enable_async_dispatch=False`` (the client dispatches
multi-device programs asynchronously regardless) nor fewer microbatches
removes the hazard. A thread pool of twice the device count (``NPROC``)
does, but it also doubles XLA's intra-op pool on the same cores (slower
here) and is a process-wide setting outside dptune. So the host loop keeps
at most :data:`MAX_IN_FLIGHT` programs pending: the slot is then always free
when a launch asks for it, no pool thread ever blocks outside a rendezvous,
and every rendezvous can complete. The host still runs that many programs
ahead, so the devices never wait for Python.

GPUs: the stream-executor client launches each device's share on that
device's own execute thread and runs collectives on device streams, so a
launch blocked on one device's semaphore cannot take another device's turn;
this mechanism does not arise there, and the bound costs nothing there either.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Deque

import jax

from dptune.errors import ConfigError

# jaxlib's per-device in-flight limit is 32 (CpuClientOptions). The bound must
# stay well below it, leaving room for single-device programs dispatched
# between ours; 8 pending programs already keep the devices busy (throughput
# at 8 equals the unbounded loop's on the small CNN, tests/test_dispatch.py).
MAX_IN_FLIGHT = 8


class InFlight:
    """The outputs of the last programs this process dispatched, oldest first, at most ``limit`` of them."""

    def __init__(self, limit: int = MAX_IN_FLIGHT):
        if limit < 1:
            raise ConfigError("limit", f"must be >= 1, got {limit}")
        self.limit = limit
        self._pending: Deque[jax.Array] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, outputs: Any) -> Any:
        """Note that the program producing ``outputs`` was dispatched; wait for the oldest beyond the limit.

        Returns ``outputs`` unchanged, so a call can wrap a dispatch.
        """
        leaves = [a for a in jax.tree_util.tree_leaves(outputs) if isinstance(a, jax.Array)]
        if not leaves:
            return outputs
        # Every output of one execution becomes ready at once; the smallest keeps the least memory alive.
        marker = min(leaves, key=lambda a: a.size)
        with self._lock:
            self._pending.append(marker)
            while len(self._pending) > self.limit:
                oldest = self._pending.popleft()
                # A donated output is deleted by the later program that consumed it,
                # whose own completion is tracked after it.
                if not oldest.is_deleted():
                    oldest.block_until_ready()
        return outputs

    def clear(self) -> None:
        """Forget the pending outputs (after the caller has waited for all of them itself)."""
        with self._lock:
            self._pending.clear()


# One per process: the in-flight slots belong to the devices, whichever caller dispatched.
PROCESS = InFlight()


def track(outputs: Any) -> Any:
    """:meth:`InFlight.track` on this process's bound."""
    return PROCESS.track(outputs)
