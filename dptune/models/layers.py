"""Parameterised layers that expose what book-keeping clipping needs.

Each layer computes ``y = f(a; θ)`` and, only when asked, records two things:

* its input ``a`` in the ``dp_taps`` collection, under the name of the rule
  that turns (a, ∂ℓ/∂y) into per-example parameter gradients
  (the registry :data:`dptune.trainer.clipping.rules.RULES`; book-keeping,
  Bu et al. 2023);
* a zero *perturbation* added to ``y`` (Flax ``perturb``), whose gradient is
  ∂ℓ/∂y for every example at once.

Applied normally (without ``dp_taps`` mutable and without ``perturbations``),
both are no-ops, so the layers are ordinary Flax layers. Their parameter
names match ``flax.linen.Dense`` / ``GroupNorm`` (``kernel``, ``bias``,
``scale``), so parameter trees and checkpoints are the same as with Flax's own.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

TAPS = "dp_taps"


def standardize(kernel: jax.Array) -> jax.Array:
    """Weight standardisation (Qiao et al. 2019): each output filter to mean 0, variance 1."""
    mean = kernel.mean(axis=tuple(range(kernel.ndim - 1)), keepdims=True)
    var = kernel.var(axis=tuple(range(kernel.ndim - 1)), keepdims=True)
    return (kernel - mean) * jax.lax.rsqrt(var + 1e-5)


def same_padding(sizes: tuple[int, int], outputs: tuple[int, int], k: int,
                 stride: int) -> list[tuple[int, int]]:
    """(low, high) padding of each spatial axis of a SAME convolution, as XLA pads it (extra cell high)."""
    pads = []
    for size, out in zip(sizes, outputs, strict=True):
        total = max((out - 1) * stride + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def conv_same(x: jax.Array, kernel: jax.Array, strides: int = 1) -> jax.Array:
    """SAME-padded NHWC convolution with an HWIO kernel, as ``lax.conv_general_dilated``.

    Single-channel inputs (grayscale images) are convolved as one matmul of
    their k² shifted copies: XLA:CPU's convolution is slow for one input
    channel, and the book-keeping step was 5–12% faster this way (small CNN
    on 28×28×1, B = 256, 2 host devices).
    """
    k, c = kernel.shape[0], x.shape[-1]
    if c != 1:
        return jax.lax.conv_general_dilated(x, kernel, (strides, strides), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, h, w, _ = x.shape
    ho, wo = -(-h // strides), -(-w // strides)
    pads = same_padding((h, w), (ho, wo), k, strides)
    padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    shifted = [padded[:, i: i + (ho - 1) * strides + 1: strides, j: j + (wo - 1) * strides + 1: strides, 0]
               for i in range(k) for j in range(k)]
    return jnp.stack(shifted, axis=-1) @ kernel.reshape(k * k, -1)


class Dense(nn.Module):
    """``y = a·W + b`` on the last axis (tap rule ``dense``)."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        self.sow(TAPS, "dense", x)
        y = x @ kernel.astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return self.perturb("out", y)


class Conv(nn.Module):
    """2-D convolution (NHWC, SAME padding), optionally weight-standardised (tap rule ``conv`` / ``conv_ws``).

    Weight standardisation depends on parameters only, so it keeps
    per-example independence (De et al. 2022 pair it with GroupNorm).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    use_bias: bool = False
    weight_standardization: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.he_normal(), (k, k, x.shape[-1], self.features), jnp.float32
        )
        self.sow(TAPS, "conv_ws" if self.weight_standardization else "conv", x)
        if self.weight_standardization:
            kernel = standardize(kernel)
        y = conv_same(x, kernel.astype(x.dtype), self.strides)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return self.perturb("out", y)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) per example, then ``x̂·scale + bias`` (tap rule ``norm_affine``).

    Statistics are over each example's own spatial positions and channel
    group, never across examples.
    """

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        # Flax's own normalisation without its affine part (it has no parameters, so
        # the parameter tree is unchanged); on XLA:CPU its backward pass is about
        # twice as fast as the plain two-pass formula.
        x_hat = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, use_scale=False, use_bias=False,
                             name="normalize")(x)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        self.sow(TAPS, "norm_affine", x_hat)
        return self.perturb("out", x_hat * scale + bias)
