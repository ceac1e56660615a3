"""Book-keeping clipping equals the vmap reference, keeps the sensitivity bound, and says when it cannot apply."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dptune.errors import ConfigError
from dptune.models.builtin import ResNet, WideResNet, _BasicBlock, build_model, init_params
from dptune.models.layers import Dense
from dptune.trainer import clipping, xla_options
from dptune.trainer.clipping import rules
from dptune.trainer.dp_step import clipped_sum, step_functions


@functools.lru_cache
def _jitted(model, path, conv_norms="auto"):
    # One compilation per (model, path): the clip norm and mask are arguments.
    def reference(p, x, y, mask, clip):
        def loss(p, xi, yi):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xi[None])[0], yi)

        return clipped_sum(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, x, y), mask, clip)

    def book(p, x, y, mask, clip):
        return clipping.clipped_sum(model, p, x, y, mask, clip, path="bookkeeping", conv_norms=conv_norms).grads

    # The options the trainer compiles with, so that this is the code that runs.
    return jax.jit(reference if path == "vmap" else book, compiler_options=xla_options.for_devices(jax.devices()))


def _reference(model, params, x, y, mask, clip):
    return _jitted(model, "vmap")(params, x, y, mask, clip)


def _bookkeeping(model, params, x, y, mask, clip, conv_norms="auto"):
    return _jitted(model, "bookkeeping", conv_norms)(params, x, y, mask, clip)


def _assert_close(a, b, rtol):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=False):
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
    assert clipping.plan(model, params, x, y, path="bookkeeping").reason is None
    for clip in (0.5, float("inf")):  # most examples clipped; none clipped
        _assert_close(_reference(model, params, x, y, mask, clip), _bookkeeping(model, params, x, y, mask, clip), 2e-5)


@pytest.mark.parametrize("conv_norms", ["materialise", "ghost"])
def test_adversarial_examples_keep_the_bound_and_match_the_reference(conv_norms):
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
    full = _bookkeeping(model, params, jnp.asarray(x), y, ones, clip, conv_norms)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(full))
    _assert_close(_reference(model, params, jnp.asarray(x), y, ones, clip), full, 2e-5)
    for i in range(8):
        without = _bookkeeping(model, params, jnp.asarray(x), y, ones.at[i].set(0.0), clip, conv_norms)
        change = _norm(jax.tree_util.tree_map(jnp.subtract, full, without))
        assert change <= clip * (1 + 1e-5), (i, change)
        if i in (2, 3):
            assert change == 0.0
        if i == 1:  # the huge example is clipped, not dropped
            assert change == pytest.approx(clip, rel=1e-4)


# (input size, c_in, c_out, kernel, output size): stride 1 and 2, 1×1, 7×7 stride 2, odd sizes.
@pytest.mark.parametrize(
    "h,c,o,k,ho", [(8, 4, 5, 3, 8), (9, 3, 4, 3, 5), (10, 2, 3, 1, 5), (12, 3, 4, 7, 6), (7, 2, 2, 3, 7)]
)
def test_ghost_conv_norms_and_sums_equal_the_per_example_gradients(h, c, o, k, ho):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, h, h, c)).astype(np.float32)
    a[1] *= 1e20  # huge but finite
    a[2, 0, 0, 0] = np.nan
    a[3, 0, 0, 0] = np.inf
    g = jnp.asarray(rng.standard_normal((5, ho, ho, o)), jnp.float32)
    a = jnp.asarray(a)
    per_example = rules.conv_kernel_grads(a, g, k)
    ghost = rules.conv_ghost_norms(a, g, k)
    exact = rules.robust_norm(per_example)
    finite = np.array([True, True, False, False, True])
    np.testing.assert_allclose(ghost[finite], exact[finite], rtol=1e-5)
    assert np.all(np.isnan(ghost[~finite]))
    w = jnp.asarray([0.5, 1e-20, 0.3, 0.7, 0.2], jnp.float32)
    keep = jnp.asarray(finite)
    expected = jnp.tensordot(
        jnp.where(keep, w, 0.0), jnp.where(keep[:, None, None, None, None], per_example, 0.0), axes=1
    )
    got = rules.conv_weighted_sum(a, g, (k, k, c, o), w, keep)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_ghost_norms_only_when_asked_for():
    # Gram-matrix norms can fall below what the batched sum holds for an example whose positions cancel
    # (a float32 cancellation finding): by default every layer forms its per-example kernel gradients.
    for shapes in (((1, 28, 28, 1), (1, 28, 28, 16)), ((1, 16, 16, 128), (1, 16, 16, 128)),
                   ((1, 8, 8, 256), (1, 8, 8, 256))):
        assert not rules.conv_uses_ghost(*shapes, 3)
    assert rules.conv_uses_ghost((1, 8, 8, 256), (1, 8, 8, 256), 3, mode="ghost") is True
    assert rules.conv_uses_ghost((1, 8, 8, 256), (1, 8, 8, 256), 3, mode="materialise") is False
    with pytest.raises(ConfigError, match="conv_norms"):
        rules.conv_uses_ghost((1, 8, 8, 256), (1, 8, 8, 256), 3, mode="gost")


def test_ghost_norms_on_every_layer_equal_the_vmap_reference():
    # (Under "auto" this ResNet mixes both rules: test_equals_the_vmap_reference.)
    conv_norms = "ghost"
    model = ResNet(10, (1, 1), _BasicBlock)  # 7×7 stride 2, strided 3×3 and 1×1 projections
    shape = (12, 12, 3)
    params = init_params(model, shape, jax.random.key(0))
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((6, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 6))
    mask = jnp.asarray([1, 0, 1, 1, 1, 1], jnp.float32)
    for clip in (0.5, float("inf")):
        _assert_close(
            _reference(model, params, x, y, mask, clip), _bookkeeping(model, params, x, y, mask, clip, conv_norms), 2e-5
        )


def test_robust_norm_does_not_overflow():
    x = jnp.asarray([[3e30, 4e30], [0.0, 0.0], [1.0, jnp.nan], [jnp.inf, 1.0]], jnp.float32)
    n = rules.robust_norm(x)
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


@pytest.mark.parametrize(
    "module,reason", [(_FlaxDenseNet(), "outside dptune.models.layers"), (_SharedDense(), "shared weights")]
)
def test_models_book_keeping_does_not_cover_take_the_fast_path(module, reason):
    x = jnp.ones((4, 3, 3, 1))
    y = jnp.zeros(4, jnp.int32)
    params = module.init(jax.random.key(0), x)["params"]
    assert reason in clipping.plan(module, params, x, y).reason
    fns = step_functions(module, "sgd", 4, tuple(jax.local_devices()[:1]), "auto")
    acc = fns.accumulate(
        params,
        fns.zeros_like(params),
        *fns.shard_batch(np.ones((4, 3, 3, 1), np.float32), np.zeros(4, np.int32), np.ones(4, np.float32)),
        1.0,
    )
    # Book-keeping says why it does not cover the model; the general fast path clips it.
    used = fns.clipping_plan(params, (3, 3, 1), jnp.float32)
    assert used.path == "fast" and reason in used.reason
    _assert_close(_reference(module, params, x, y, jnp.ones(4), 1.0), acc, 1e-5)


def test_auto_uses_bookkeeping_for_the_shipped_models():
    model = build_model("cnn", 10)
    params = init_params(model, (8, 8, 1), jax.random.key(0))
    fns = step_functions(model, "sgd", 4, tuple(jax.local_devices()[:1]), "auto")
    fns.accumulate(
        params,
        fns.zeros_like(params),
        *fns.shard_batch(np.ones((4, 8, 8, 1), np.float32), np.zeros(4, np.int32), np.ones(4, np.float32)),
        1.0,
    )
    used = fns.clipping_plan(params, (8, 8, 1), jnp.float32)
    assert used.path == "bookkeeping" and used.reason is None
