"""The per-example weights of a clipped sum, written once for every clipping path.

Every path computes Σᵢ wᵢ·∇ℓᵢ. Its Gaussian mechanism has sensitivity C
exactly when every weighted term has L2 norm ≤ C, which holds for both
weight functions here:

* :func:`clip_weights` — wᵢ = min(1, C/‖∇ℓᵢ‖) (Abadi et al. 2016);
* :func:`normalize_weights` — wᵢ = C/(‖∇ℓᵢ‖ + γ), "automatic clipping"
  (Bu et al. 2023): every term has norm C·‖g‖/(‖g‖ + γ) < C.

Both take norms of *rescaled* gradients: the vmap reference multiplies an
example whose entries are huge by an exact power of two ``shrink`` before
squaring (its norm would overflow float32), and the weight returned applies
to that rescaled gradient. Rule-based paths pass ``shrink = 1``. Padding
(``keep`` false) and non-finite examples get weight exactly 0. Weights are
computed in float32 (or wider): a bf16 weight lets a term exceed C.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Bu et al. 2023's stability constant γ in g/(‖g‖ + γ): keeps tiny gradients from being blown up to norm C.
NORMALIZE_GAMMA = 0.01

Weights = Callable[[jax.Array, jax.Array, jax.Array, "jax.Array | float"], jax.Array]


def as_f32(x: jax.Array) -> jax.Array:
    """``x`` in float32 (or wider, if it already is).

    Norms, weights and sums are taken at this precision on every path: a norm
    taken in bf16 is off by up to ~1% from the f32 sum that holds the example,
    which then exceeds C.
    """
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def clip_weights(norms: jax.Array, shrink: jax.Array, keep: jax.Array, clip_norm: jax.Array | float) -> jax.Array:
    """min(1, C/‖g‖) expressed on the rescaled gradient f·g: min(1/f, C/‖f·g‖); 0 where not ``keep``."""
    norms = as_f32(norms)
    tiny = jnp.finfo(norms.dtype).tiny
    return jnp.where(keep, jnp.minimum(1.0 / shrink, clip_norm / jnp.maximum(norms, tiny)), 0.0)


def normalize_weights(norms: jax.Array, shrink: jax.Array, keep: jax.Array,
                      clip_norm: jax.Array | float, gamma: float = NORMALIZE_GAMMA) -> jax.Array:
    """C/(‖g‖ + γ) expressed on the rescaled gradient f·g: C/(‖f·g‖ + f·γ); 0 where not ``keep``."""
    norms = as_f32(norms)
    return jnp.where(keep, clip_norm / (norms + shrink * gamma), 0.0)


WEIGHTS: dict[str, Weights] = {"clip": clip_weights, "normalize": normalize_weights}
