"""The reference path: every example's full gradient by ``jax.vmap(jax.grad(...))``, then the weighted sum.

Works for any model that does not mix examples, and is the fallback of every
other path. Its numerics are the ones the rule-based paths are tested
against: norms over all parameters together in float32 (or wider); an
example whose largest entry exceeds ``_BIG`` is multiplied by an exact power
of two before squaring, so a huge finite gradient is clipped like any other
instead of overflowing; a non-finite gradient gets weight 0 and is kept out of
the sum by ``where`` (0·NaN is NaN). Hence each term has norm ≤ C and adding
or removing one example moves the sum by at most C.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from dptune.models.freezing import apply_mask
from dptune.trainer.clipping.weights import NORMALIZE_GAMMA, Weights, as_f32, clip_weights, normalize_weights

PyTree = Any
# Dividing by the scale itself would go through a denormal reciprocal, which XLA's CPU backend flushes to
# zero; multiplying by _SHRINK (a normal float32) does not.
_BIG = 2.0**50
_SHRINK = 2.0**-100


def _as_f32(per_example: PyTree) -> PyTree:
    return jax.tree_util.tree_map(as_f32, per_example)


def _shrunk_norms(per_example: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example: shrink factor f, ‖f·g‖₂, and whether every entry of g is finite (g in float32 or wider)."""
    flat = [leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree_util.tree_leaves(per_example)]
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(f), axis=1) for f in flat]), axis=0)
    finite = jnp.isfinite(scale)
    shrink = jnp.where(finite & (scale > _BIG), _SHRINK, 1.0).astype(flat[0].dtype)
    sq = sum(jnp.sum(jnp.square(f * shrink[:, None]), axis=1) for f in flat)
    return shrink, jnp.sqrt(sq), finite


def global_l2_norms(per_example: PyTree) -> jax.Array:
    """Global L2 norm of each example's gradient (leading axis = examples), in float32; ∞ if non-finite."""
    shrink, norms, finite = _shrunk_norms(_as_f32(per_example))
    return jnp.where(finite, norms / shrink, jnp.inf)


def weighted_sum(per_example: PyTree, mask: jax.Array, clip_norm: jax.Array | float,
                 weights: Weights = clip_weights) -> tuple[PyTree, jax.Array, jax.Array]:
    """(Σᵢ wᵢ·gᵢ, each example's global norm, each wᵢ) from per-example gradients (leading axis = examples).

    ``weights``: :func:`clip_weights` or :func:`normalize_weights`; each term
    has norm ≤ C. Padding (mask 0) and non-finite examples get weight 0.
    """
    per_example = _as_f32(per_example)
    shrink, norms, finite = _shrunk_norms(per_example)
    keep = finite & (mask > 0)
    coef = weights(norms, shrink, keep, clip_norm)

    def leaf_sum(g: jax.Array) -> jax.Array:
        shape = (-1,) + (1,) * (g.ndim - 1)
        g = jnp.where(keep.reshape(shape), g * shrink.reshape(shape), 0.0)
        return jnp.tensordot(coef, g, axes=1)

    true_norms = jnp.where(finite, norms / shrink, jnp.inf)
    return jax.tree_util.tree_map(leaf_sum, per_example), true_norms, coef * shrink


def clipped_sum(per_example: PyTree, mask: jax.Array, clip_norm: jax.Array | float) -> PyTree:
    """Σ_i mask_i · g_i · min(1, C/‖g_i‖) of per-example gradients: every term has L2 norm ≤ C."""
    return weighted_sum(per_example, mask, clip_norm, clip_weights)[0]


def normalized_sum(per_example: PyTree, mask: jax.Array, clip_norm: jax.Array | float,
                   gamma: float = NORMALIZE_GAMMA) -> PyTree:
    """Σ_i mask_i · C · g_i / (‖g_i‖ + γ) of per-example gradients (Bu et al. 2023): every term has norm < C."""
    def weights(norms: jax.Array, shrink: jax.Array, keep: jax.Array, c: jax.Array | float) -> jax.Array:
        return normalize_weights(norms, shrink, keep, c, gamma)
    return weighted_sum(per_example, mask, clip_norm, weights)[0]


def per_example_grads(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array,
                      loss_fn: Callable[[jax.Array, jax.Array], jax.Array], trainable: PyTree | None) -> PyTree:
    """Each example's gradient [B, …] of its loss; with k copies per label, of the mean over its copies.

    Frozen leaves (``trainable`` 0) are zeroed, so they are left out of the norm.
    """
    k = x.shape[0] // y.shape[0]
    copies = x.reshape(y.shape[0], k, *x.shape[1:])

    def loss(p: PyTree, xk: jax.Array, yi: jax.Array) -> jax.Array:
        logits = cast(jax.Array, model.apply({"params": p}, xk))
        return jnp.mean(jax.vmap(loss_fn)(logits, jnp.broadcast_to(yi, (k, *yi.shape))))

    return apply_mask(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, copies, y), trainable)
