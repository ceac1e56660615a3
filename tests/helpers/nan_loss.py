"""A per-example loss that is NaN for every example: a user's mistake that must not pass silently."""

import jax.numpy as jnp
import optax


def loss(logits, label):
    return optax.softmax_cross_entropy_with_integer_labels(logits, label) * jnp.nan
