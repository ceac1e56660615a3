"""How a logical batch reaches the devices: one dispatch per step where shapes allow.

Three feeds run the same DP-SGD step (:mod:`dptune.trainer.dp_step`) and give the same
parameters for the same indices and key (``tests/test_feed.py``):

* ``resident`` — the training split (uint8) is copied to every device once,
  when it fits in ``device_data_fraction`` of a device's memory (CIFAR-10 is
  150 MB). Each step sends only the padded index array; the devices gather,
  normalise, clip and sum every microbatch in one compiled loop, then add the
  noise. Nothing else crosses the host.
* ``streamed`` — the host gathers (or the loader of :mod:`dptune.data.pipeline`
  decodes) the logical batch, applies augmentation, and sends it as one
  ``[capacity, microbatch, ...]`` array; one compiled loop does the rest. The
  capacity is the number of microbatches rounded up to a power of two, so a
  study compiles a handful of shapes, not one per realised batch size.
* ``loop`` — the fallback: one dispatch per microbatch from a Python loop, for
  logical batches too large to send at once.

In every feed the number of microbatches actually computed is data (a traced
loop bound), the per-step Poisson batch stays private (only its padded,
fixed-shape index array crosses to the device), and each device clips the same
examples as in the loop (microbatch rows are sharded identically).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dptune.choices import Feed
from dptune.config.schema import default as setting
from dptune.data.datasets import ArraySplit
from dptune.errors import ConfigError
from dptune.trainer import dispatch, multihost
from dptune.trainer.dp_step import StepFunctions, TrainState

FEEDS: tuple[str, ...] = tuple(c.value for c in Feed)
DEVICE_DATA_FRACTION: float = setting("device_data_fraction")  # the study schema's default
# A streamed step sends at most this many bytes of examples at once; larger logical batches use the loop.
STREAM_BYTES = 1 << 30

Augment = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def device_memory(device: jax.Device) -> float | None:
    """Bytes the device may allocate, where the backend says (GPUs, TPUs); None on CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    return None


def choose(feed: str, split: Any, fns: StepFunctions, *, augmenting: bool, batch_size: int,
           fraction: float = DEVICE_DATA_FRACTION, example_bytes: int | None = None) -> str:
    """The feed to use: ``feed`` if not ``"auto"``; else, on accelerators, resident where the data fits, else
    streamed or loop; on CPU the loop (measured faster there).

    Raises:
      ConfigError: an unknown feed, or ``resident`` asked for data it cannot hold.
    """
    if feed not in FEEDS:
        raise ConfigError("feed", f"unknown {feed!r}; allowed: {', '.join(FEEDS)}")
    # Only a plain in-memory split is copied whole; wrappers (e.g. an audit's canaries) decide nothing here.
    resident_ok = isinstance(split, ArraySplit) and not augmenting
    if feed == "resident" and not resident_ok:
        why = "augmentation runs on the host" if augmenting else "the split is not held in memory"
        raise ConfigError("feed", f"'resident' needs an in-memory split without augmentation ({why}); "
                                  "use 'auto', 'streamed' or 'loop'")
    if feed != "auto":
        return feed
    if not hasattr(split, "take_raw"):
        return "loop"
    if fns.devices[0].platform == "cpu":
        # Measured (benchmarks/train_loop.py, 2-core CPU): the compiled microbatch loop ran at
        # 0.37–0.55× the host loop's examples/s on XLA:CPU, while on an H100 streaming was 1.80×
        # (ResNet-18) and resident 0.96× (WRN-16-4) the host loop (benchmarks/gpu_check.sh).
        return "loop"
    if resident_ok:
        limit = device_memory(fns.devices[0])
        # CPU "devices" share host memory, where the split already lives.
        if limit is None or split.images.nbytes <= fraction * limit:
            return "resident"
    if example_bytes is None:
        example_bytes = 4 * int(np.prod(split.take_raw(np.arange(1))[0].shape))
    per_example = example_bytes
    return "streamed" if batch_size * per_example * 1.5 <= STREAM_BYTES else "loop"


class ResidentFeed:
    """The training split on every device; each step sends its padded index array (``[capacity, microbatch]``)."""

    def __init__(self, fns: StepFunctions, split: Any):
        self.fns = fns
        self.n = len(split)
        self.capacity = max(1, -(-self.n // fns.microbatch_size))
        self.rows = jax.sharding.NamedSharding(fns.mesh, jax.sharding.PartitionSpec(None, "data"))
        self.images = multihost.put(np.ascontiguousarray(split.images), fns.replicated)
        self.labels = multihost.put(np.asarray(split.labels, np.int32), fns.replicated)

    def layout(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(index [capacity, mb] int32, mask [capacity, mb] float32, microbatches used)."""
        mb = self.fns.microbatch_size
        used = -(-len(indices) // mb)
        index = np.zeros(self.capacity * mb, np.int32)
        mask = np.zeros(self.capacity * mb, np.float32)
        index[:len(indices)] = indices
        mask[:len(indices)] = 1.0
        return index.reshape(self.capacity, mb), mask.reshape(self.capacity, mb), used

    def step(self, state: TrainState, indices: np.ndarray, private: bool, args: tuple, trainable: Any) -> TrainState:
        index, mask, used = self.layout(indices)
        return dispatch.track(self.fns.step_resident(
            private, state, self.images, self.labels, multihost.put(index, self.rows),
            multihost.put(mask, self.rows), np.int32(used), *args, trainable))


def bucket(used: int, limit: int) -> int:
    """Microbatch capacity for ``used`` microbatches: the next power of two, at most ``limit`` (≥ 1)."""
    return max(1, min(limit, 1 << max(0, math.ceil(math.log2(max(used, 1))))))


class StreamedFeed:
    """The host prepares the logical batch; one transfer and one dispatch per step.

    ``batch_source(t, padded)``, when given, returns the uint8 images and labels of
    the padded indices (e.g. decoded ahead of time by :mod:`dptune.data.pipeline`);
    otherwise the split is read on this thread.
    """

    def __init__(self, fns: StepFunctions, split: Any, augment: Augment | None,
                 batch_source: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None, *,
                 copies: int = 1, sampling_rate: float = 1.0):
        self.fns = fns
        self.split = split
        self.augment = augment
        self.batch_source = batch_source
        self.copies = copies
        self.limit = max(1, -(-len(split) // fns.microbatch_size))
        # The capacity starts at a public bound: the Binomial(N, q) size exceeded with probability
        # 1e-9, so the compiled shape (and its compile time) does not follow the realised batch sizes.
        from scipy import stats

        upper = int(stats.binom.isf(1e-9, len(split), sampling_rate)) + 1 if sampling_rate < 1 else len(split)
        self.floor = bucket(-(-upper // fns.microbatch_size), self.limit)
        self.rows = jax.sharding.NamedSharding(fns.mesh, jax.sharding.PartitionSpec(None, "data"))

    def arrays(self, indices: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        mb = self.fns.microbatch_size
        used = -(-len(indices) // mb)
        cap = max(self.floor, bucket(used, self.limit))
        padded = np.zeros(cap * mb, np.int64)
        padded[:len(indices)] = indices
        mask = np.zeros(cap * mb, np.float32)
        mask[:len(indices)] = 1.0
        real = padded[:used * mb]
        if self.batch_source is not None:
            x, y = self.batch_source(step, real)  # also for an empty batch: the loader stays in step
        if not len(real):
            x, y = self._empty()
        elif self.batch_source is None:
            x, y = self.split.take_raw(real)
        if self.augment is not None and len(real):
            x = self.augment(x, real, step)
        k = self.copies
        xs = np.zeros((cap * mb * k, *x.shape[1:]), x.dtype)
        xs[:len(x)] = x
        ys = np.zeros(cap * mb, np.int32)
        ys[:len(y)] = y
        return xs.reshape(cap, mb * k, *x.shape[1:]), ys.reshape(cap, mb), mask.reshape(cap, mb), used

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.split.take_raw(np.arange(1))
        return x[:0], y[:0]

    def step(self, state: TrainState, indices: np.ndarray, private: bool, args: tuple, trainable: Any) -> TrainState:
        xs, ys, mask, used = self.arrays(indices, int(args[1]))
        return dispatch.track(self.fns.step_streamed(
            private, state, multihost.put(xs, self.rows), multihost.put(ys, self.rows),
            multihost.put(mask, self.rows), np.int32(used), *args, trainable))
