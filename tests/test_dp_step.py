"""DP invariants of the step, tested as properties (see dptune/trainer/dp_step.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dptune.data.datasets import load_dataset
from dptune.errors import ConfigError
from dptune.models.builtin import build_model, init_params
from dptune.trainer import clipping as engine
from dptune.trainer.dp_step import clipped_sum, normalized_sum, privatize, step_functions
from dptune.trainer.train import Hyperparams, train_step
from tests.fastclip_models import Bf16Layer

B = 6
SHAPES = [(3,), (2, 2)]

special = st.sampled_from([0.0, 1e30, -1e30, 3e38, np.nan, np.inf, -np.inf, 1e-30])
values = st.one_of(st.floats(-1e6, 1e6, width=32), special)


def _tree(draw_arrays):
    return {"a": draw_arrays[0], "b": draw_arrays[1]}


grad_batches = st.tuples(*[arrays(np.float32, (B, *s), elements=values) for s in SHAPES]).map(_tree)


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(tree))))


def _diff(a, b):
    return jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])  # bf16 parameters give bf16 gradients
@pytest.mark.parametrize("combine", [clipped_sum, normalized_sum], ids=["clip", "normalize"])
@settings(max_examples=60, deadline=None)
@given(grads=grad_batches, clip=st.sampled_from([0.1, 1.0, 7.5]), i=st.integers(0, B - 1))
def test_sensitivity_add_remove_one(combine, dtype, grads, clip, i):
    grads = jax.tree_util.tree_map(lambda g: jnp.asarray(g, dtype), grads)
    full = combine(grads, jnp.ones(B), clip)
    mask = np.ones(B, np.float32)
    mask[i] = 0.0
    without = combine(grads, jnp.asarray(mask), clip)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(full)), "one bad example poisoned the sum"
    assert _norm(_diff(full, without)) <= clip * (1 + 1e-5)


@settings(max_examples=40, deadline=None)
@given(grads=grad_batches, other=grad_batches, clip=st.sampled_from([0.5, 2.0]), i=st.integers(0, B - 1))
def test_sensitivity_replace_one(grads, other, clip, i):
    replaced = jax.tree_util.tree_map(lambda g, o: g.copy(), grads, other)
    for k in replaced:
        replaced[k][i] = other[k][i]
    a = clipped_sum(grads, jnp.ones(B), clip)
    b = clipped_sum(replaced, jnp.ones(B), clip)
    assert _norm(_diff(a, b)) <= 2 * clip * (1 + 1e-5)


def test_each_term_is_clipped_and_small_ones_untouched():
    g = {"w": jnp.asarray([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])}
    s = clipped_sum(g, jnp.ones(3), 1.0)
    np.testing.assert_allclose(s["w"], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)


def test_noise_std_matches_sigma_c_over_expected_batch():
    sigma, clip, denom, n = 1.3, 0.7, 50.0, 200_000
    zeros = {"w": jnp.zeros((n,))}
    noisy = np.asarray(privatize(zeros, jax.random.key(0), sigma, clip, denom)["w"], np.float64)
    expected = sigma * clip / denom
    # The sample std of n normals has standard error ≈ std / sqrt(2n); allow 5 of them.
    assert abs(noisy.std() - expected) < 5 * expected / math.sqrt(2 * n)
    assert abs(noisy.mean()) < 5 * expected / math.sqrt(n)


def test_no_noise_when_sigma_zero_even_with_infinite_clip():
    out = privatize({"w": jnp.ones(4)}, jax.random.key(0), 0.0, math.inf, 2.0)
    np.testing.assert_array_equal(out["w"], 0.5 * np.ones(4))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(params=["bookkeeping", "vmap"])
def clipping(request):
    """Every trainer-level invariant below is checked on each clipping path."""
    return request.param


def _setup(digits, microbatch=32, optimizer="sgd", clipping="auto"):
    model = build_model("cnn", digits.num_classes)
    fns = step_functions(model, optimizer, microbatch, tuple(jax.local_devices()[:1]), clipping)
    params = init_params(model, digits.image_shape, jax.random.key(0))
    return model, fns, params


def _step(fns, params, digits, indices, *, sigma=0.0, clip=1.0, denom=64.0, lr=1.0, key=0):
    hp = Hyperparams(batch_size=64, learning_rate=lr, clip_norm=clip, noise_multiplier=sigma, optimizer="sgd")
    state = fns.init_state(params)
    new = train_step(fns, state, digits, indices, jax.random.key(key), 0, hp, denom, clip, sigma, lr)
    return new.params


def test_unclipped_noiseless_update_is_the_mean_gradient(digits, clipping):
    model, fns, params = _setup(digits, clipping=clipping)
    idx = np.arange(40)
    denom = 64.0
    new = _step(fns, params, digits, idx, clip=math.inf, denom=denom)
    x, y = digits.train.take(idx)
    # The non-private path (batched gradient, no per-example work) gives the same update.
    hp = Hyperparams(batch_size=64, learning_rate=1.0, clip_norm=math.inf, noise_multiplier=0.0, optimizer="sgd")
    baseline = train_step(fns, fns.init_state(params), digits, idx, jax.random.key(0), 0, hp, denom,
                          math.inf, 0.0, 1.0, private=False).params
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(baseline), strict=False):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)

    def total_loss(p):
        logits = model.apply({"params": p}, x)
        return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y] * -1.0)

    g = jax.grad(total_loss)(params)
    expected = jax.tree_util.tree_map(lambda p, gi: p - gi / denom, params, g)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(expected), strict=False):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_update_does_not_depend_on_microbatch_size(digits, clipping):
    idx = np.sort(np.random.default_rng(0).choice(len(digits.train), 70, replace=False))
    results = []
    for m in (8, 32, 128):
        _, fns, params = _setup(digits, microbatch=m, clipping=clipping)
        results.append(_step(fns, params, digits, idx, sigma=1.0, clip=0.5, key=7))
    for other in results[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(other), strict=False):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_noise_added_once_per_logical_batch(digits, clipping):
    # 96 examples in microbatches of 32 = 3 accumulation calls. The noisy update
    # minus the noiseless one (same key) must have std σC/denominator — not √3 times it.
    _, fns, params = _setup(digits, microbatch=32, clipping=clipping)
    idx = np.arange(96)
    sigma, clip, denom = 2.0, 0.5, 64.0
    noisy = _step(fns, params, digits, idx, sigma=sigma, clip=clip, denom=denom, key=3)
    clean = _step(fns, params, digits, idx, sigma=0.0, clip=clip, denom=denom, key=3)
    pairs = zip(jax.tree_util.tree_leaves(noisy), jax.tree_util.tree_leaves(clean), strict=True)
    diff = np.concatenate([np.ravel(a - b) for a, b in pairs])
    expected = sigma * clip / denom
    assert abs(diff.std() - expected) < 5 * expected / math.sqrt(2 * diff.size)


def test_padding_rows_have_no_effect_even_with_garbage(digits, clipping):
    _, fns, params = _setup(digits, microbatch=32, clipping=clipping)
    x, y = digits.train.take(np.arange(20))
    acc0 = fns.zeros_like(params)
    real = fns.accumulate(
        params,
        acc0,
        *fns.shard_batch(
            np.concatenate([x, np.zeros((12, *x.shape[1:]), np.float32)]),
            np.concatenate([y, np.zeros(12, np.int32)]),
            (np.arange(32) < 20).astype(np.float32),
        ),
        1.0,
    )
    garbage = np.full((12, *x.shape[1:]), np.nan, np.float32)
    padded = fns.accumulate(
        params,
        acc0,
        *fns.shard_batch(
            np.concatenate([x, garbage]),
            np.concatenate([y, np.full(12, 3, np.int32)]),
            (np.arange(32) < 20).astype(np.float32),
        ),
        1.0,
    )
    for a, b in zip(jax.tree_util.tree_leaves(real), jax.tree_util.tree_leaves(padded), strict=False):
        np.testing.assert_array_equal(a, b)


def test_model_gradient_sensitivity_with_a_poisoned_example(digits, clipping):
    _, fns, params = _setup(digits, microbatch=32, clipping=clipping)
    x, y = digits.train.take(np.arange(32))
    x = x.copy()
    x[5] = np.inf
    x[9] *= 1e20
    clip = 0.3
    full = fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(x, y, np.ones(32, np.float32)), clip)
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(full))
    for i in (0, 5, 9):
        mask = np.ones(32, np.float32)
        mask[i] = 0
        without = fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(x, y, mask), clip)
        assert _norm(_diff(full, without)) <= clip * (1 + 1e-4)


@pytest.mark.parametrize("path", ["vmap", "fast"])
def test_bf16_parameters_accumulate_in_float32(path):
    # Clipped sums are float32 whatever the parameters' dtype, and so is the step's accumulator (a bf16 carry
    # met float32 sums in the loop over microbatches).
    model = Bf16Layer("dense", jnp.bfloat16)
    rng = np.random.default_rng(0)
    images, labels = jnp.asarray(rng.integers(0, 256, (16, 6)), jnp.uint8), jnp.asarray(rng.integers(0, 3, 16))
    params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
    fns = step_functions(model, "sgd", 8, tuple(jax.local_devices()[:1]), path)
    zeros = fns.zeros_like(params)
    assert {a.dtype for a in jax.tree_util.tree_leaves(zeros)} == {jnp.dtype(jnp.float32)}
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    # σ = 0, C = 0.5, denominator 16, lr 1, no momentum, no EMA.
    new = fns.step_resident(True, fns.init_state(params), images, labels, jnp.arange(16).reshape(2, 8),
                            jnp.ones((2, 8)), jnp.asarray(2), jax.random.key(0), jnp.asarray(0), f32(0.0), f32(0.5),
                            f32(16.0), f32(1.0), f32(0.0), f32(0.0)).params
    acc = fns.accumulate(params, zeros, *fns.shard_batch(np.asarray(images) / 127.5 - 1.0, labels, np.ones(16)), 0.5)
    assert {a.dtype for a in jax.tree_util.tree_leaves(acc)} == {jnp.dtype(jnp.float32)}
    for a, p, g in zip(*(jax.tree_util.tree_leaves(t) for t in (new, params, acc)), strict=True):
        assert a.dtype == p.dtype  # the head is float32, the rest bf16
        expected = np.asarray(p, np.float32) - g / 16.0
        np.testing.assert_allclose(np.asarray(a, np.float32), expected, rtol=1e-2, atol=1e-3)


# -- the clipping engine's result and setting -----------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["clip", "normalize"])
def test_every_path_returns_the_same_sum_norms_and_weights_as_values(weighting):
    model = build_model("cnn", 10)
    params = init_params(model, (8, 8, 1), jax.random.key(0))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((6, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 6))
    mask = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)
    out = {path: jax.jit(lambda p, path=path: engine.clipped_sum(model, p, x, y, mask, 0.5, path=path,
                                                                    weighting=weighting))(params)
           for path in ("bookkeeping", "fast", "vmap")}
    ref = out["vmap"]
    for path, got in out.items():
        assert isinstance(got, engine.ClipResult) and got.path == path and got.weighting == weighting
        assert set(got.rule_map) == {"/".join(str(k.key) for k in kp)
                                     for kp, _ in jax.tree_util.tree_leaves_with_path(params)}
        np.testing.assert_allclose(got.norms, ref.norms, rtol=2e-5)
        np.testing.assert_allclose(got.weights, ref.weights, rtol=2e-5)
        assert float(got.weights[2]) == 0.0  # padding
        for a, b in zip(jax.tree_util.tree_leaves(got.grads), jax.tree_util.tree_leaves(ref.grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(b))))
    # Each kept term's norm: min(1, C/‖g‖)·‖g‖ ≤ C, or C·‖g‖/(‖g‖ + γ) < C.
    assert float(jnp.max(ref.weights * ref.norms)) <= 0.5 * (1 + 1e-6)


def test_the_step_keeps_no_clipping_state_and_reports_its_plan_as_a_value():
    model = build_model("cnn", 10)
    params = init_params(model, (8, 8, 1), jax.random.key(0))
    fns = step_functions(model, "sgd", 4, tuple(jax.local_devices()[:1]), "normalize")
    assert not any(hasattr(fns, name) for name in ("clipping_used", "fallback_reason", "clipping_rules"))
    used = fns.clipping_plan(params, (8, 8, 1), jnp.float32)
    assert (used.label, used.path, used.weighting, used.reason) == ("normalize", "bookkeeping", "normalize", None)
    assert set(used.rule_map.values()) == {"conv", "norm_affine", "dense"}
    assert fns.clipping_plan(params, (8, 8, 1), jnp.float32, copies=2).path == "bookkeeping"


def test_the_clipping_setting_is_resolved_in_one_place():
    assert engine.resolve("auto") == ("auto", "clip")
    assert engine.resolve("normalize") == ("auto", "normalize")
    assert engine.resolve("auto", custom_model=True) == ("fast", "clip")
    assert engine.resolve("normalize", custom_model=True) == ("fast", "normalize")
    assert engine.resolve("vmap", custom_model=True) == ("vmap", "clip")
    with pytest.raises(ConfigError, match="built-in models"):
        engine.resolve("bookkeeping", custom_model=True)
    with pytest.raises(ConfigError, match="clipping"):
        engine.resolve("ghost")
    assert set(engine.SETTINGS) == {"auto", "bookkeeping", "fast", "vmap", "normalize"}
