"""Poisson sampling of logical batches, padded to a fixed microbatch shape.

The accountant (``dptune.privacy.accounting``) assumes each training example joins each
step independently with probability q. :func:`poisson_batch` draws exactly that
distribution: the batch size is Binomial(N, q) and, given its size, the batch
is a uniformly random subset — which is the same law as N independent
Bernoulli(q) coins, drawn in O(batch) rather than O(N) work.

Realised batches vary in size, but compiled steps need fixed shapes, so a batch
is padded to a whole number of microbatches; padding rows carry mask 0 and the
DP step gives them exactly zero weight.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dptune import seams


@seams.seam  # tests may sample otherwise (dptune.faults); production samples as written here
def poisson_batch(rng: np.random.Generator, num_examples: int, sampling_rate: float) -> np.ndarray:
    """Indices of one Poisson-sampled batch: each example included w.p. ``sampling_rate``."""
    if sampling_rate >= 1.0:
        return np.arange(num_examples)
    size = rng.binomial(num_examples, sampling_rate)
    return np.sort(rng.choice(num_examples, size=size, replace=False))


def pad_to_multiple(indices: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``indices`` with index 0 to a multiple of ``multiple``; return (indices, mask).

    The mask is 1.0 for real rows and 0.0 for padding. An empty batch stays
    empty (a step then adds noise to a zero sum, as DP-SGD requires).
    """
    n = len(indices)
    padded = -(-n // multiple) * multiple
    out = np.zeros(padded, dtype=np.int64)
    out[:n] = indices
    mask = np.zeros(padded, dtype=np.float32)
    mask[:n] = 1.0
    return out, mask


def microbatches(indices: np.ndarray, mask: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Split a padded batch into consecutive (indices, mask) chunks of ``size``."""
    for start in range(0, len(indices), size):
        yield indices[start:start + size], mask[start:start + size]
