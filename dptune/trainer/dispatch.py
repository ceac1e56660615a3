"""How far the host loop may run ahead of the devices: the bound that keeps multi-device CPU runs alive.

Multi-device CPU runs once died with SIGABRT from XLA's rendezvous timeout (a CPU host with several
JAX devices); the cause, as found in jaxlib 0.10.2's PjRt CPU client and confirmed with
gdb on a stuck process:

* The client launches each device's share of a multi-device program as a
  task on one thread pool of max(cores, devices) threads: 2 on a 2-core host
  with dptune's one device per core. Multi-device programs run one at a time,
  and all shares of one must run at once: an all-reduce (the ``psum`` of the
  private step, the gradient sum XLA inserts in the non-private one) waits in
  a rendezvous until every device has arrived.
* The launch first takes a slot of the device's in-flight semaphore
  (``max_inflight_computations_per_device``: 32, not settable through JAX),
  and takes it on a pool thread. With 32 programs pending, the next launch
  blocks one of the two threads while the other runs device 0's share of the
  oldest program and waits for device 1's share, which has no thread left.
  Nothing moves until the rendezvous times out after 40 s and aborts.

The stuck process showed exactly that: one pool thread in
``Semaphore::ScopedAcquire`` under ``CpuPjRtRawLoadedExecutable::Execute``,
the other in ``InProcessCommunicator::AllReduce``, Python waiting for the
launch. A loop of ``shard_map`` + ``psum`` programs aborted every time when
it let 32 or more be pending and never with 31 or fewer. The training loop
dispatches about 2 + B/microbatch programs a step and blocked only to
evaluate, so with evaluation off it reached 32 within a few steps; whether a
blocked launch or the waiting share gets the free thread first is down to
the scheduler, hence "at random".

``jax_cpu_enable_async_dispatch=False`` does not help (the client still
dispatches multi-device programs asynchronously: the loop above aborted the
same). ``NPROC=4`` (a pool of twice the devices) did, but it doubles XLA's
intra-op pool on the same cores too (1.6× slower in that loop) and is a
process-wide setting outside dptune. So the host keeps at most
:data:`MAX_IN_FLIGHT` programs pending: a launch then always finds its slot,
no pool thread blocks outside a rendezvous whose peers can all run, and the
host still runs far enough ahead that the devices never wait for Python.

GPUs: by the same jaxlib's source, the stream-executor GPU client launches
each device's share on that device's own execute thread and runs collectives
on device streams (NCCL), so one device's full semaphore cannot take another
device's turn; this deadlock does not arise there (not tested: no multi-GPU
machine here). The bound applies on every backend and costs nothing there.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import jax

from dptune.errors import ConfigError

# Well below jaxlib's 32, leaving room for single-device programs dispatched
# between ours, and enough to keep the devices busy: on 2 host devices the
# training loop ran as fast at 8 as unbounded (measured when the bound was chosen).
MAX_IN_FLIGHT = 8


class InFlight:
    """The outputs of the last programs this process dispatched, oldest first, at most ``limit`` of them."""

    def __init__(self, limit: int = MAX_IN_FLIGHT):
        if limit < 1:
            raise ConfigError("limit", f"must be >= 1, got {limit}")
        self.limit = limit
        self._pending: collections.deque[jax.Array] = collections.deque()
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
