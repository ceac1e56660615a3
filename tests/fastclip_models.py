"""Small user-style Flax models for tests/test_fastclip.py, tests/test_sensitivity_adversarial.py and
benchmarks/fastclip_step.py.

Written the way a user would write them (plain ``flax.linen``), not with dptune's layers (but for ``Bf16Book``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class TabularMLP(nn.Module):
    """A user's MLP on tabular floats [B, features] (ReLU only, so that a huge input gives a huge gradient)."""

    num_classes: int = 3
    hidden: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(2 * self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: Flax's multi-head attention (DenseGeneral q/k/v/out) and an MLP."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
        return x + nn.Dense(x.shape[-1])(h)


class TinyViT(nn.Module):
    """Patch embedding (a strided ``nn.Conv`` or a ``nn.Dense`` on flattened patches), a cls token and
    positional embedding owned directly by this module, encoder blocks, LayerNorm, a linear head."""

    num_classes: int = 10
    patch: int = 4
    dim: int = 16
    depth: int = 1
    heads: int = 2
    mlp: int = 32
    conv_patches: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch
        if self.conv_patches:
            tokens = nn.Conv(self.dim, (p, p), strides=p, padding="VALID")(x).reshape(b, -1, self.dim)
        else:
            patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
            tokens = nn.Dense(self.dim)(patches)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), tokens], axis=1)
        tokens = tokens + self.param("pos", nn.initializers.normal(0.02), tokens.shape[1:])
        for _ in range(self.depth):
            tokens = EncoderBlock(self.heads, self.mlp)(tokens)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(tokens[:, 0]))


class PositionalEmbedding(nn.Module):
    """A learned positional table (a user's own layer with no closed-form rule: ``layer_vjp``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.param("table", nn.initializers.normal(0.02), x.shape[1:])


class TinyTransformer(nn.Module):
    """A transformer classifier over token ids [B, T] with ``nn.Embed``; mean-pooled tokens → classes."""

    vocab: int = 13
    num_classes: int = 4
    dim: int = 16
    depth: int = 1
    heads: int = 2
    mlp: int = 32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = PositionalEmbedding()(nn.Embed(self.vocab, self.dim)(ids))
        for _ in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp)(x)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x).mean(axis=1))


class TiedLM(nn.Module):
    """Tied weights: the token embedding is also the output projection (``embed.attend``).

    Classifies a sequence by the logits of its last position over the vocabulary.
    """

    vocab: int = 11
    dim: int = 8

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        embed = nn.Embed(self.vocab, self.dim)
        x = embed(ids)
        x = x + nn.Dense(self.dim)(nn.tanh(x))
        return embed.attend(nn.LayerNorm()(x[:, -1]))


class BatchNormNet(nn.Module):
    """Mixes examples: BatchNorm with batch statistics (training mode)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x)))


class MixedCNN(nn.Module):
    """dptune's own layers beside Flax's conv/norm variants, a conv with no closed form, and a shared layer."""

    num_classes: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        from dptune.models import layers

        x = layers.GroupNorm(num_groups=2)(layers.Conv(4, 3, weight_standardization=True)(x))
        x = nn.GroupNorm(num_groups=2)(nn.Conv(6, (3, 3), strides=2, padding="SAME")(nn.relu(x)))
        x = nn.RMSNorm()(nn.Conv(6, (3, 3), padding="CIRCULAR")(nn.relu(x)))  # circular padding: layer_vjp
        x = layers.Dense(8)(x.reshape(x.shape[0], -1))
        shared = layers.Dense(8)
        return nn.Dense(self.num_classes)(shared(nn.tanh(shared(x))))  # one layer called twice: tied


@jax.custom_jvp
def straight_through_finite(x: jax.Array) -> jax.Array:
    """NaN → 0 forward, the gradient passed through unchanged (a user's NaN guard with a straight-through grad)."""
    return jnp.nan_to_num(x)


@straight_through_finite.defjvp
def _straight_through_jvp(primals: tuple, tangents: tuple) -> tuple:
    return straight_through_finite(primals[0]), tangents[0]


class TokenBag(nn.Module):
    """Token ids of any value through ``nn.Embed``, for adversarial ids.

    ``vocab`` may be 1 (Flax broadcasts a one-row table to every id). Each
    position has a weight of either sign, so the gradient rows of a repeated
    id can cancel. An id outside the table reads a NaN row; the guard makes it
    0 forward but passes its gradient back, so that row's gradient is nonzero
    and only the lookup's scatter decides whether it counts. The logits come
    from ``attend``: of another table (the embed rule) or, ``tied``, the same.
    """

    vocab: int
    tied: bool = False
    classes: int = 3
    dim: int = 3
    weights: tuple[float, ...] = (1.0, -1.0, 2.0, -0.5)

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        embed = nn.Embed(self.vocab, self.dim)
        w = jnp.asarray(self.weights[: ids.shape[-1]])
        x = jnp.einsum("t,btd->bd", w, straight_through_finite(embed(ids)))
        return (embed if self.tied else nn.Embed(self.classes, self.dim)).attend(x)


class Bf16Layer(nn.Module):
    """One kind of layer computing in bf16 (the rule under test), then a float32 head.

    ``kind``: "dense", "conv", "norm" (GroupNorm then LayerNorm) or "embed"
    (a lookup and an ``attend`` head, both bf16).
    """

    kind: str
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bf16 = {"dtype": jnp.bfloat16, "param_dtype": self.param_dtype}
        if self.kind == "embed":
            return nn.Embed(3, 8, **bf16).attend(nn.Embed(7, 8, **bf16)(x).mean(axis=1))
        if self.kind == "dense":
            h = nn.Dense(8, **bf16)(x)
        elif self.kind == "conv":
            h = nn.Conv(3, (3, 3), **bf16)(x)
        else:
            h = nn.LayerNorm(**bf16)(nn.GroupNorm(num_groups=1, **bf16)(x).reshape(x.shape[0], -1))
        return nn.Dense(3)(h.reshape(h.shape[0], -1).astype(jnp.float32))


class Bf16Book(nn.Module):
    """dptune's own layers (book-keeping) on bf16 activations."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        from dptune.models import layers

        x = layers.GroupNorm(num_groups=2)(layers.Conv(4, 3)(x.astype(jnp.bfloat16)))
        return layers.Dense(3)(x.reshape(x.shape[0], -1).astype(jnp.bfloat16))
