"""TEST ONLY: deliberate privacy bugs, so that ``dptune audit`` can be shown to catch them.

A fault breaks the DP-SGD mechanism on purpose:

* ``noise_scaled_down`` — the Gaussian noise is 10× smaller than σ says;
* ``no_clipping`` — per-example gradients are summed without clipping;
* ``per_microbatch_noise`` — noise is added to every microbatch's clipped sum
  with std σC/M (M microbatches), instead of once with std σC: the total is
  σC/√M, the classic "divided by M, not √M" mistake;
* ``fixed_size_batches`` — each epoch is a random permutation cut into batches of
  exactly B (sampling without replacement) instead of Poisson sampling.

It cannot be switched on by accident: a fault is active only inside
``with inject(name):`` *and* only if the environment variable
``DPTUNE_TEST_ONLY_FAULTS`` is ``"I know this run is not private"``. No
command-line flag, study file field or stored attribute reaches this module, so
a production run would need both a code change and that environment variable.

Production code does not call this module: :func:`inject` installs wrappers at
two :mod:`dptune.seams` (the DP step ``dptune.trainer.train.train_step`` and the
sampler ``dptune.data.sampling.poisson_batch``), which change what the real
step and sampler are given, and removes them on the way out.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dptune import seams

FAULTS: tuple[str, ...] = ("noise_scaled_down", "no_clipping", "per_microbatch_noise", "fixed_size_batches")
ENV = "DPTUNE_TEST_ONLY_FAULTS"
ENV_VALUE = "I know this run is not private"
NOISE_SCALE = 0.1

STEP = "dptune.trainer.train.train_step"
SAMPLER = "dptune.data.sampling.poisson_batch"

_active: str | None = None
_epochs: dict[int, list[Any]] = {}  # fixed_size_batches: per dataset size, [permutation, position]


def active() -> str | None:
    """The fault in force, or None (always None outside :func:`inject`)."""
    return _active


@contextlib.contextmanager
def inject(name: str) -> Iterator[None]:
    """TEST ONLY: break the mechanism with fault ``name`` inside this block.

    Raises:
      RuntimeError: the environment variable ``DPTUNE_TEST_ONLY_FAULTS`` does
        not hold the acknowledgement, or another fault is already active.
      ValueError: ``name`` is not one of :data:`FAULTS`.
    """
    global _active
    if os.environ.get(ENV) != ENV_VALUE:
        raise RuntimeError(f"faults are for tests only: set {ENV}={ENV_VALUE!r} to inject one")
    if name not in FAULTS:
        raise ValueError(f"fault: unknown {name!r}; allowed: {', '.join(FAULTS)}")
    if _active is not None:
        raise RuntimeError(f"fault {_active!r} is already active")
    with seams.installed({STEP: _broken_step, SAMPLER: _broken_sampler}):
        _active = name
        _epochs.clear()
        try:
            yield
        finally:
            _active = None
            _epochs.clear()


# -- what each fault changes (identity unless a fault is active) ------------------

def noise_multiplier(sigma: float) -> float:
    """σ handed to the once-per-batch noise."""
    if _active == "noise_scaled_down":
        return sigma * NOISE_SCALE
    if _active == "per_microbatch_noise":
        return 0.0  # the noise went in per microbatch instead
    return sigma


def clip_for_sum(clip_norm: float) -> float:
    """C used when clipping per-example gradients (the noise keeps the true C)."""
    return float("inf") if _active == "no_clipping" else clip_norm


def after_microbatch(acc: Any, key: Any, step: int, index: int, count: int, sigma: float, clip_norm: float) -> Any:
    """The accumulator after microbatch ``index`` of ``count``."""
    if _active != "per_microbatch_noise" or sigma <= 0:
        return acc
    import jax

    std = sigma * clip_norm / count
    leaves, treedef = jax.tree_util.tree_flatten(acc)
    keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, step), 1_000_003 + index), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [g + std * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys, strict=True)])


def sampled_batch(rng: np.random.Generator, num_examples: int, sampling_rate: float) -> np.ndarray | None:
    """A fixed-size batch drawn without replacement, or None (draw the Poisson batch)."""
    if _active != "fixed_size_batches" or sampling_rate >= 1.0:
        return None
    size = max(1, int(round(sampling_rate * num_examples)))
    # Keyed by dataset size, not by generator: training draws each step from its own generator.
    state = _epochs.setdefault(num_examples, [None, 0])
    if state[0] is None or len(state[0]) != num_examples or state[1] + size > num_examples:
        state[0], state[1] = rng.permutation(num_examples), 0
    batch = state[0][state[1]:state[1] + size]
    state[1] += size
    return np.sort(batch)


# -- the wrappers installed at the seams ----------------------------------------------

class _Delegate:
    """``inner`` with some attributes replaced."""

    def __init__(self, inner: Any, **replaced: Any):
        self._inner = inner
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _broken_step(step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The DP step of the active fault: the real step, handed a broken σ, clipping or accumulation."""
    bound = inspect.signature(step).bind(*args, **kwargs)
    a = bound.arguments
    fns, audit, sigma, clip_norm = a["fns"], a.get("audit"), a["noise_multiplier"], a["clip_norm"]
    sum_clip = clip_for_sum(clip_norm)
    accumulate = fns.accumulate
    count = -(-len(a["indices"]) // fns.microbatch_size)
    index = iter(range(count))

    def broken_accumulate(params: Any, acc: Any, xs: Any, ys: Any, mask: Any, clip: float, trainable: Any) -> Any:
        acc = accumulate(params, acc, xs, ys, mask, clip_for_sum(clip), trainable)
        return after_microbatch(acc, a["key"], a["step"], next(index), count, sigma, clip_norm)

    a["fns"] = _Delegate(fns, accumulate=broken_accumulate)
    if audit is not None:
        # The canaries are clipped as the examples are, and their compiled sum is keyed on the real functions.
        a["audit"] = _Delegate(audit, add=lambda _fns, state, acc, t, _clip: audit.add(fns, state, acc, t, sum_clip))
    a["noise_multiplier"] = noise_multiplier(sigma)
    return step(*bound.args, **bound.kwargs)


def _broken_sampler(sample: Callable[..., np.ndarray], rng: np.random.Generator, num_examples: int,
                    sampling_rate: float) -> np.ndarray:
    broken = sampled_batch(rng, num_examples, sampling_rate)
    return sample(rng, num_examples, sampling_rate) if broken is None else broken
