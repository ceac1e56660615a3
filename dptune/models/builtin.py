"""Model registry: DP-compatible image classifiers in Flax (linen).

DP-SGD needs each example's gradient on its own, so no model here mixes
examples in its forward pass: normalisation is GroupNorm (optionally with
weight-standardised convolutions, as in De et al. 2022), never BatchNorm.
Input shape and class count come from the dataset. Every parameterised layer
comes from :mod:`dptune.models.layers`, so book-keeping clipping covers every model.

* ``cnn`` — two 3×3 conv layers with GroupNorm and a small dense head, for
  28×28 or 8×8 inputs (≈106k parameters on MNIST).
* ``wrn16_4`` — WideResNet-16-4 for CIFAR-sized inputs.
* ``resnet18`` / ``resnet50`` — ImageNet-sized ResNets (He et al. 2016).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dptune.config.schema import DATASET_PREFIXES
from dptune.errors import ConfigError
from dptune.models.layers import Conv, Dense, GroupNorm


def _groups(channels: int, preferred: int) -> int:
    g = min(preferred, channels)
    while channels % g:
        g -= 1
    return g


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 average pooling with stride 2 (SAME padding, padded cells counted, as ``nn.avg_pool``)."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.avg_pool(x, (2, 2), (2, 2), padding="SAME")
    # Same numbers as nn.avg_pool; its reduce_window backward is ~6x slower on XLA:CPU than this broadcast.
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class SmallCNN(nn.Module):
    """Conv(16)–GN–ReLU–pool, Conv(32)–GN–ReLU–pool, Dense(64), Dense(classes)."""

    num_classes: int
    weight_standardization: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for features in (16, 32):
            x = Conv(features, 3, use_bias=True, weight_standardization=self.weight_standardization)(x)
            x = GroupNorm(num_groups=_groups(features, 8))(x)
            x = nn.relu(x)
            x = _avg_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(64)(x))
        return Dense(self.num_classes)(x)


class _WideBlock(nn.Module):
    features: int
    strides: int
    ws: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = nn.relu(GroupNorm(num_groups=_groups(x.shape[-1], 16))(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = Conv(self.features, 1, self.strides, weight_standardization=self.ws)(out)
        y = Conv(self.features, 3, self.strides, weight_standardization=self.ws)(out)
        y = nn.relu(GroupNorm(num_groups=_groups(self.features, 16))(y))
        y = Conv(self.features, 3, 1, weight_standardization=self.ws)(y)
        return y + shortcut


class WideResNet(nn.Module):
    """WideResNet-(6n+4)-k with pre-activation blocks and GroupNorm (Zagoruyko & Komodakis 2016)."""

    num_classes: int
    depth: int = 16
    width: int = 4
    weight_standardization: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = (self.depth - 4) // 6
        x = Conv(16, 3, weight_standardization=self.weight_standardization)(x)
        for stage, features in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
            for i in range(n):
                x = _WideBlock(features, 2 if (stage > 0 and i == 0) else 1, self.weight_standardization)(x)
        x = nn.relu(GroupNorm(num_groups=_groups(x.shape[-1], 16))(x))
        x = x.mean(axis=(1, 2))
        return Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
    features: int
    strides: int
    ws: bool
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = Conv(self.features, 3, self.strides, weight_standardization=self.ws)(x)
        y = nn.relu(GroupNorm(num_groups=_groups(self.features, 32))(y))
        y = Conv(self.features, 3, 1, weight_standardization=self.ws)(y)
        y = GroupNorm(num_groups=_groups(self.features, 32))(y)
        return nn.relu(y + _projection(x, self.features, self.strides, self.ws))


class _Bottleneck(nn.Module):
    features: int
    strides: int
    ws: bool
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.features * 4
        y = Conv(self.features, 1, 1, weight_standardization=self.ws)(x)
        y = nn.relu(GroupNorm(num_groups=_groups(self.features, 32))(y))
        y = Conv(self.features, 3, self.strides, weight_standardization=self.ws)(y)
        y = nn.relu(GroupNorm(num_groups=_groups(self.features, 32))(y))
        y = Conv(out, 1, 1, weight_standardization=self.ws)(y)
        y = GroupNorm(num_groups=_groups(out, 32))(y)
        return nn.relu(y + _projection(x, out, self.strides, self.ws))


def _projection(x: jax.Array, features: int, strides: int, ws: bool) -> jax.Array:
    if strides == 1 and x.shape[-1] == features:
        return x
    y = Conv(features, 1, strides, weight_standardization=ws)(x)
    return GroupNorm(num_groups=_groups(features, 32))(y)


class ResNet(nn.Module):
    """ResNet with GroupNorm in place of BatchNorm (as in Kurakin et al. 2022)."""

    num_classes: int
    stage_sizes: Sequence[int]
    block: Callable[..., nn.Module]
    weight_standardization: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ws = self.weight_standardization
        x = Conv(64, 7, 2, weight_standardization=ws)(x)
        x = nn.relu(GroupNorm(num_groups=32)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stage_sizes):
            for i in range(blocks):
                x = self.block(64 * 2**stage, 2 if (stage > 0 and i == 0) else 1, ws)(x)
        x = x.mean(axis=(1, 2))
        return Dense(self.num_classes)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": lambda num_classes, ws: SmallCNN(num_classes, ws),
    "wrn16_4": lambda num_classes, ws: WideResNet(num_classes, 16, 4, ws),
    "resnet18": lambda num_classes, ws: ResNet(num_classes, (2, 2, 2, 2), _BasicBlock, ws),
    "resnet50": lambda num_classes, ws: ResNet(num_classes, (3, 4, 6, 3), _Bottleneck, ws),
}


def build_model(name: str, num_classes: int, *, weight_standardization: bool = False,
                input_shape: Sequence[int] | None = None, args: dict[str, Any] | None = None) -> nn.Module:
    """A built-in model by name, or the user's model by import path (``"package.module:make_model"``).

    A user's factory is called as ``factory(num_classes=…, input_shape=…, **args)`` and must return a
    :class:`flax.linen.Module` mapping a batch of inputs to logits [batch, num_classes]
    (:mod:`dptune.models.custom` checks that it does, and that it never mixes examples).

    Raises:
      ConfigError: an unknown name, a factory that cannot be imported, raises, or returns no Module.
    """
    if num_classes < 2:
        raise ConfigError("num_classes", f"must be >= 2, got {num_classes}")
    if name.startswith(DATASET_PREFIXES):
        raise ConfigError("model", f"{name!r} names a dataset; a model is a built-in name or 'package.module:name'")
    if ":" in name:
        from dptune.models.custom import build_custom

        return build_custom(name, num_classes, tuple(input_shape or ()), dict(args or {}))
    if name not in MODELS:
        raise ConfigError("model", f"unknown {name!r}; allowed: {', '.join(MODELS)}, or an import path "
                                   "'package.module:factory'")
    if args:
        raise ConfigError("model_args", f"the built-in {name!r} takes none; got {', '.join(args)}")
    return MODELS[name](num_classes, weight_standardization)


def init_params(model: nn.Module, image_shape: Sequence[int], key: jax.Array, dtype: str = "float32") -> dict:
    """Initial parameters for inputs of shape ``image_shape`` (one example's) and ``dtype``."""
    return model.init(key, jnp.zeros((1, *image_shape), dtype))["params"]


def count_params(params: dict) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
