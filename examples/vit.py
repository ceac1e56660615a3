"""(b) A small Vision Transformer (patch embedding, attention, LayerNorm, MLP) for a study file.

``examples/vit_mnist5k.yaml`` names it as ``model: "examples.vit:make_vit"``; dptune calls
``make_vit(num_classes=…, input_shape=(28, 28, 1), **model_args)``. Every layer works on one example
at a time (LayerNorm, attention within an image), so DP-SGD can clip per example; the class token and
the position table are parameters of the top module (clipped by its own VJP on the fast path).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        h = nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.dim)(h)


class ViT(nn.Module):
    num_classes: int
    patch: int = 7
    dim: int = 32
    depth: int = 2
    heads: int = 2

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID")(images)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, h * w + 1, d))
        for _ in range(self.depth):
            x = Block(self.dim, self.heads)(x)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x[:, 0]))


def make_vit(num_classes: int, input_shape=None, patch: int = 7, dim: int = 32, depth: int = 2, heads: int = 2):
    return ViT(num_classes, patch, dim, depth, heads)
