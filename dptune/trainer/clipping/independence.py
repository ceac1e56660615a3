"""Is a model per-example? Clipping bounds one example's influence only if no output mixes examples.

A model that mixes examples (BatchNorm in training mode) would be trained on
a different function than the one clipped per example; this check detects it
so that a study can refuse the model before any private data is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dptune.errors import ConfigError

PyTree = Any


def mixing_reason(model: nn.Module, variables: PyTree, x: Any, seed: int = 0, trials: int = 2,
                  rtol: float = 1e-4) -> str | None:
    """Why ``model`` is not per-example (None if the tests pass), on one batch of inputs.

    Four tests: the output has one row per example; for float inputs, the
    gradient of one example's output with respect to every *other* example's
    input is exactly zero (autodiff gives structural zeros for a model that does
    not mix, so mixing at any scale shows); changing one example's input (random
    noise for floats, random ids for integers) changes no other row's output
    (integer inputs: not by a single bit); and each example's output equals the
    model applied to that example alone. A model may behave differently at other
    batch sizes: callers check at the sizes training runs
    (:func:`dptune.trainer.run.check_model`). Only the verdict should leave the
    caller: pass public or synthetic inputs where the verdict itself must not
    depend on private data.

    Args:
        model: the Flax module.
        variables: all its variables (``{"params": …, "batch_stats": …}``); the
            model is applied with every collection mutable, as in training.
        x: a batch of at least 2 inputs.
        seed: seeds the perturbations (a public seed: the check is about the model).
        trials: how many single examples are perturbed.
        rtol: tolerance relative to the largest output.

    Returns:
        A one-line reason, or None.
    """
    x = np.asarray(x)
    b = x.shape[0]
    if b < 2:
        raise ConfigError("model", "the per-example check needs a batch of at least 2 inputs")

    apply = jax.jit(lambda v, batch: model.apply(v, batch, mutable=True)[0])

    def run(batch: np.ndarray) -> np.ndarray | None:
        out = apply(variables, jnp.asarray(batch))
        leaves = jax.tree_util.tree_leaves(out)
        if not leaves or not all(v.ndim >= 1 and v.shape[0] == batch.shape[0] for v in leaves):
            return None
        return np.concatenate([np.asarray(v, np.float64).reshape(v.shape[0], -1) for v in leaves], axis=1)

    out = run(x)
    if out is None:
        return f"the model's output does not have one row per example (batch {b})"
    rng = np.random.default_rng(seed)
    if not np.issubdtype(x.dtype, np.integer):
        for i in sorted({0, b - 1, int(rng.integers(b))}):
            j = _cross_gradient(model, variables, x, i)
            if j is not None:
                return (f"output row {i} depends on example {j}'s input (a nonzero gradient): the model mixes "
                        f"examples at batch {b} (e.g. BatchNorm in training mode), which breaks per-example "
                        "sensitivity")
    tol = rtol * (1.0 + np.max(np.abs(out)))
    moved = _perturbation_reason(run, x, out, rng, trials, tol)
    if moved is not None:
        return moved
    for i in (0, b - 1):
        alone = run(x[i:i + 1])
        if alone is None or np.max(np.abs(alone - out[i:i + 1])) > tol:
            return (f"example {i}'s output differs when it is run alone: the model depends on the batch "
                    "(e.g. BatchNorm in training mode), which breaks per-example sensitivity")
    return None


def _perturbation_reason(run: Callable[[np.ndarray], np.ndarray | None], x: np.ndarray, out: np.ndarray,
                         rng: np.random.Generator, trials: int, tol: float) -> str | None:
    """Why changing one example's input moves another example's output row (None if no trial does)."""
    # Same shapes, same program: a row of a model that does not mix cannot move by a bit. (Floats were
    # checked exactly by the gradient before; here the tolerance only spares a rounding of their own.)
    same_shape_tol = 0.0 if np.issubdtype(x.dtype, np.integer) else tol
    for _ in range(trials):
        j = int(rng.integers(x.shape[0]))
        changed = x.copy()
        if np.issubdtype(x.dtype, np.integer):
            changed[j] = rng.integers(x.min(), x.max() + 1, size=x.shape[1:])
        else:
            changed[j] = x[j] + rng.standard_normal(x.shape[1:]) * (1.0 + np.std(x))
        after = run(changed)
        if after is None:
            return f"the model's output does not have one row per example (batch {x.shape[0]})"
        moved = np.max(np.abs(after - out), axis=1)
        moved[j] = 0.0
        if np.max(moved) > same_shape_tol:
            i = int(np.argmax(moved))
            return (f"output row {i} changes when only example {j} changes: the model mixes examples "
                    "(e.g. BatchNorm in training mode), which breaks per-example sensitivity")
    return None


def _cross_gradient(model: nn.Module, variables: PyTree, x: np.ndarray, i: int) -> int | None:
    """An example j ≠ i whose input moves output row ``i`` (a nonzero gradient), or None."""
    def row(batch: jax.Array) -> jax.Array:
        out = model.apply(variables, batch, mutable=True)[0]
        return jnp.sum(jnp.stack([jnp.sum(leaf[i].astype(jnp.float32)) for leaf in jax.tree_util.tree_leaves(out)]))

    grad = np.asarray(jax.jit(jax.grad(row))(jnp.asarray(x)), np.float64).reshape(x.shape[0], -1)
    reach = np.abs(np.nan_to_num(grad, nan=1.0)).max(axis=1)
    reach[i] = 0.0
    return int(np.argmax(reach)) if reach.max() > 0 else None


def check_per_example(model: nn.Module, variables: PyTree, x: Any, seed: int = 0) -> None:
    """Refuse a model whose output rows depend on other examples (for ``study create``).

    Args:
        model, variables, x, seed: as for :func:`mixing_reason`.

    Raises:
        ConfigError: field ``model``, with the one-line reason.
    """
    reason = mixing_reason(model, variables, x, seed)
    if reason is not None:
        raise ConfigError("model", reason)
