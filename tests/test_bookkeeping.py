"""Book-keeping clipping equals the vmap reference, keeps the sensitivity bound, and says when it cannot apply."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dptune import bookkeeping, xla_options
from dptune.dp_step import clipped_sum, step_functions
from dptune.layers import Dense
from dptune.models import ResNet, WideResNet, _BasicBlock, build_model, init_params


@functools.lru_cache
def _jitted(model, path):
    # One compilation per (model, path): the clip norm and mask are arguments.
    def reference(p, x, y, mask, clip):
        def loss(p, xi, yi):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xi[None])[0], yi)

        return clipped_sum(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, x, y), mask, clip)

    def book(p, x, y, mask, clip):
        return bookkeeping.clipped_sum(model, p, x, y, mask, clip)

    # The options the trainer compiles with, so that this is the code that runs.
    return jax.jit(reference if path == "vmap" else book, compiler_options=xla_options.for_devices(jax.devices()))


def _reference(model, params, x, y, mask, clip):
    return _jitted(model, "vmap")(params, x, y, mask, clip)


def _bookkeeping(model, params, x, y, mask, clip):
    return _jitted(model, "bookkeeping")(params, x, y, mask, clip)


def _assert_close(a, b, rtol):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        scale = float(jnp.max(jnp.abs(u))) + 1e-12
        assert float(jnp.max(jnp.abs(u - v))) <= rtol * scale, jax.tree_util.keystr(path)


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(t)) for t in jax.tree_util.tree_leaves(tree))))


# Small members of each shipped family keep compile times low; the layers are the same.
@pytest.mark.parametrize("model,shape", [
    (build_model("cnn", 10), (28, 28, 1)),                               # dense, conv with bias, GroupNorm
    (build_model("cnn", 10, weight_standardization=True), (8, 8, 1)),    # standardisation through its VJP
    (WideResNet(10, depth=10, width=1, weight_standardization=True), (10, 10, 3)),  # strided 3×3 and 1×1, odd sizes
    (ResNet(10, (1, 1), _BasicBlock), (12, 12, 3)),                      # 7×7 stride-2 convolution
])
def test_equals_the_vmap_reference(model, shape):
    params = init_params(model, shape, jax.random.key(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((6, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 6))
    mask = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)
    assert bookkeeping.plan(model, params, x, y) is None
    for clip in (0.5, float("inf")):  # most examples clipped; none clipped
        _assert_close(_reference(model, params, x, y, mask, clip), _bookkeeping(model, params, x, y, mask, clip), 2e-5)


def test_adversarial_examples_keep_the_bound_and_match_the_reference():
    model = build_model("cnn", 10)
    params = init_params(model, (8, 8, 1), jax.random.key(0))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 8, 8, 1)).astype(np.float32)
    x[1] *= 1e20         # huge but finite: its squared gradient norm overflows float32
    x[2] = np.nan        # dropped
    x[3, 0, 0, 0] = np.inf
    x[4] = 0.0
    y = jnp.asarray(rng.integers(0, 10, 8))
    ones = jnp.ones(8, jnp.float32)
    clip = 0.25
    full = _bookkeeping(model, params, jnp.asarray(x), y, ones, clip)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(full))
    _assert_close(_reference(model, params, jnp.asarray(x), y, ones, clip), full, 2e-5)
    for i in range(8):
        without = _bookkeeping(model, params, jnp.asarray(x), y, ones.at[i].set(0.0), clip)
        change = _norm(jax.tree_util.tree_map(jnp.subtract, full, without))
        assert change <= clip * (1 + 1e-5), (i, change)
        if i in (2, 3):
            assert change == 0.0
        if i == 1:  # the huge example is clipped, not dropped
            assert change == pytest.approx(clip, rel=1e-4)


def test_robust_norm_does_not_overflow():
    x = jnp.asarray([[3e30, 4e30], [0.0, 0.0], [1.0, jnp.nan], [jnp.inf, 1.0]], jnp.float32)
    n = bookkeeping.robust_norm(x)
    assert float(n[0]) == pytest.approx(5e30, rel=1e-6)
    assert float(n[1]) == 0.0
    assert np.isnan(n[2]) and not np.isfinite(n[3])


class _FlaxDenseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class _SharedDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        flat = x.reshape(x.shape[0], -1)
        layer = Dense(flat.shape[-1])
        return Dense(10)(layer(layer(flat)))


@pytest.mark.parametrize("module,reason", [(_FlaxDenseNet(), "outside dptune.layers"), (_SharedDense(), "shared weights")])
def test_unsupported_models_fall_back_to_vmap(module, reason):
    x = jnp.ones((4, 3, 3, 1))
    y = jnp.zeros(4, jnp.int32)
    params = module.init(jax.random.key(0), x)["params"]
    assert reason in bookkeeping.plan(module, params, x, y)
    fns = step_functions(module, "sgd", 4, tuple(jax.local_devices()[:1]), "auto")
    acc = fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(np.ones((4, 3, 3, 1), np.float32),
                         np.zeros(4, np.int32), np.ones(4, np.float32)), 1.0)
    assert fns.clipping_used == "vmap" and reason in fns.fallback_reason
    _assert_close(_reference(module, params, x, y, jnp.ones(4), 1.0), acc, 1e-5)


def test_auto_uses_bookkeeping_for_the_shipped_models():
    model = build_model("cnn", 10)
    params = init_params(model, (8, 8, 1), jax.random.key(0))
    fns = step_functions(model, "sgd", 4, tuple(jax.local_devices()[:1]), "auto")
    fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(np.ones((4, 8, 8, 1), np.float32),
                   np.zeros(4, np.int32), np.ones(4, np.float32)), 1.0)
    assert fns.clipping_used == "bookkeeping" and fns.fallback_reason is None
