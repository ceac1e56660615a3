"""The clipping engine's fast path: the clipped sum of any Flax model equals the vmap reference and keeps the bound."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptune.errors import ConfigError
from dptune.trainer.clipping import RULE_NAMES, clipped_sum, plan
from dptune.trainer.clipping.independence import check_per_example, mixing_reason
from dptune.trainer.clipping.rules import dense_uses_ghost, ghost_dense_norms, robust_norm
from tests.fastclip_models import (
    BatchNormNet,
    MixedCNN,
    TabularMLP,
    TiedLM,
    TinyTransformer,
    TinyViT,
)

B = 6


def _data(name, rng):
    if name == "mlp":
        return TabularMLP(), rng.standard_normal((B, 7)).astype(np.float32), 3
    if name == "vit":
        return TinyViT(), rng.standard_normal((B, 8, 8, 1)).astype(np.float32), 10
    if name == "vit_dense_patches":
        return TinyViT(conv_patches=False), rng.standard_normal((B, 8, 8, 1)).astype(np.float32), 10
    if name == "transformer":
        return TinyTransformer(), rng.integers(0, 13, (B, 6)), 4
    if name == "tied":
        return TiedLM(), rng.integers(0, 11, (B, 6)), 11
    if name == "cnn":
        return MixedCNN(), rng.standard_normal((B, 6, 6, 1)).astype(np.float32), 5
    raise KeyError(name)


@functools.lru_cache
def _setup(name):
    model, x, classes = _data(name, np.random.default_rng(0))
    y = np.random.default_rng(1).integers(0, classes, B)
    params = model.init(jax.random.key(0), jnp.asarray(x))["params"]

    # One compilation per model: both paths, clip norm and mask as arguments.
    @jax.jit
    def both(p, x, y, mask, clip):
        fast = clipped_sum(model, p, x, y, mask, clip, path="fast")
        ref = clipped_sum(model, p, x, y, mask, clip, path="vmap")
        return fast.grads, fast.norms, ref.grads, ref.norms

    return model, params, x, y, both


def _assert_close(a, b, rtol):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=False):
        scale = float(jnp.max(jnp.abs(v))) + 1e-12
        assert float(jnp.max(jnp.abs(u - v))) <= rtol * scale, jax.tree_util.keystr(path)


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(t, np.float64))) for t in jax.tree_util.tree_leaves(tree))))


# The ViT, the CNN and the transformer compile for 10–20 s each on a loaded 2-core machine.
@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        pytest.param("vit", marks=pytest.mark.slow),
        pytest.param("cnn", marks=pytest.mark.slow),
        pytest.param("transformer", marks=pytest.mark.slow),
        "tied",
    ],
)
def test_fast_clipped_sum_equals_the_vmap_reference(name):
    model, params, x, y, both = _setup(name)
    mask = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)
    for clip in (0.05, float("inf")):  # every example clipped; none clipped
        fast, fast_norms, ref, ref_norms = both(params, x, y, mask, clip)
        _assert_close(fast, ref, 1e-5)
        np.testing.assert_allclose(fast_norms, ref_norms, rtol=1e-5)
    assert plan(model, params, x, y, path="fast").reason is None  # the fast path ran, not the fallback


# Which rule each layer takes: the closed forms where they exist, the module's own VJP otherwise.
EXPECTED = {
    "mlp": {"Dense_0": "dense", "Dense_1": "dense", "Dense_2": "dense"},
    "vit": {
        "Conv_0": "conv",
        "cls": "layer_vjp",
        "pos": "layer_vjp",
        "LayerNorm_0": "norm_affine",
        "Dense_0": "dense",
        "EncoderBlock_0/LayerNorm_0": "norm_affine",
        "EncoderBlock_0/MultiHeadDotProductAttention_0/query": "dense",
        # The output projection contracts two axes (heads, head dim): its own VJP.
        "EncoderBlock_0/MultiHeadDotProductAttention_0/out": "layer_vjp",
        "EncoderBlock_0/Dense_1": "dense",
    },
    "vit_dense_patches": {"Dense_0": "dense", "Dense_1": "dense", "cls": "layer_vjp", "pos": "layer_vjp"},
    "transformer": {
        "Embed_0": "embed",
        "PositionalEmbedding_0": "layer_vjp",
        "Dense_0": "dense",
        "EncoderBlock_0/MultiHeadDotProductAttention_0/key": "dense",
        "LayerNorm_0": "norm_affine",
    },
    "tied": {"Embed_0": "tied", "Dense_0": "dense", "LayerNorm_0": "norm_affine"},
    "cnn": {
        "Conv_0": "conv",
        "GroupNorm_0": "norm_affine",
        "Conv_1": "conv",
        "GroupNorm_1": "norm_affine",
        "Conv_2": "layer_vjp",
        "RMSNorm_0": "norm_affine",
        "Dense_0": "dense",
        "Dense_1": "tied",
        "Dense_2": "dense",
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rule_record_names_the_rule_of_each_layer(name):
    model, x, _ = _data(name, np.random.default_rng(0))
    params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
    planned = plan(model, params, jnp.asarray(x), jnp.zeros(B, jnp.int32), path="fast")
    rules, reason = planned.rule_map, planned.reason
    assert reason is None
    leaves = {
        jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in jax.tree_util.tree_leaves_with_path(params)
    }
    assert set(rules) == leaves and set(rules.values()) <= set(RULE_NAMES) - {"vmap"}
    for prefix, rule in EXPECTED[name].items():
        matching = [r for p, r in rules.items() if p == prefix or p.startswith(prefix + "/")]
        assert matching and set(matching) == {rule}, (prefix, matching)


@functools.lru_cache
def _wrong_labels_when_huge():
    # A huge input saturates the softmax: labelled with its predicted class, its gradient is exactly 0.
    # Labelled with another class, its gradient is huge (‖∇‖² overflows float32): that is the case to clip.
    model, params, x, _, _ = _setup("mlp")
    return (np.argmax(np.asarray(model.apply({"params": params}, x * 1e20)), axis=1) + 1) % 3


@settings(max_examples=20, deadline=None)
@given(
    clip=st.sampled_from([1e-3, 0.3, 2.0, 1e6]),
    drop=st.integers(0, B - 1),
    kinds=st.lists(st.sampled_from(["normal", "huge", "nan", "inf", "zero"]), min_size=B, max_size=B),
)
def test_removing_one_example_moves_the_sum_by_at_most_c(clip, drop, kinds):
    _, params, x, y, both = _setup("mlp")
    x, y = x.copy(), y.copy()
    for i, kind in enumerate(kinds):
        if kind == "huge":
            x[i] *= 1e20  # finite, but its squared gradient norm overflows float32
            y[i] = _wrong_labels_when_huge()[i]
        elif kind == "nan":
            x[i, 0] = np.nan
        elif kind == "inf":
            x[i, 1] = -np.inf
        elif kind == "zero":
            x[i] = 0.0
    ones = jnp.ones(B, jnp.float32)
    full, norms, ref, ref_norms = both(params, x, y, ones, clip)
    without = both(params, x, y, ones.at[drop].set(0.0), clip)[0]
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(full))
    change = _norm(jax.tree_util.tree_map(jnp.subtract, full, without))
    assert change <= clip * (1 + 1e-5), (kinds, drop, change)
    if kinds[drop] in ("nan", "inf"):  # dropped
        assert change == 0.0 and not np.isfinite(norms[drop])
    else:  # clipped to C, or kept whole: never dropped, never overflowed
        # The change is a difference of two float32 sums: its rounding follows the largest term in them.
        largest = min(clip, float(np.max(np.where(np.isfinite(ref_norms), ref_norms, 0.0))))
        assert np.isfinite(norms[drop])
        assert change == pytest.approx(min(clip, float(ref_norms[drop])), rel=1e-4, abs=1e-6 * B * largest)
    if kinds[drop] == "huge":
        assert norms[drop] > 1e19
    _assert_close(full, ref, 1e-5)


def test_ghost_dense_norms_equal_the_materialised_gradients():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 7, 4)).astype(np.float32)
    a[1] *= 1e20
    a[2, 3, 1] = np.nan
    a[3, 0, 0] = np.inf
    g = rng.standard_normal((5, 7, 6)).astype(np.float32)
    exact = robust_norm(jnp.einsum("bti,bto->bio", a, g))
    ghost = ghost_dense_norms(jnp.asarray(a), jnp.asarray(g))
    finite = np.array([True, True, False, False, True])
    np.testing.assert_allclose(ghost[finite], exact[finite], rtol=1e-5)
    assert not np.any(np.isfinite(ghost[~finite]))
    assert not any(dense_uses_ghost(*s) for s in ((8, 64, 64), (64, 16, 16), (1, 64, 64)))


def test_an_example_whose_tokens_cancel_moves_the_sum_by_at_most_c():
    """A review found: x₀ = M·u and x₁ = −M·u + δ made Gram-matrix norms rounding error (moves up to 1.96·C)."""
    import flax.linen as nn

    class Seq(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.Dense(16)(x).mean(axis=1))

    model, rng = Seq(), np.random.default_rng(0)
    base = rng.standard_normal((4, 2, 16)).astype(np.float32)
    params = model.init(jax.random.key(0), jnp.asarray(base[:1]))["params"]
    run = jax.jit(lambda x, m: clipped_sum(model, params, x, jnp.asarray([1, 0, 2, 1]), m, 1.0, path="fast").grads)
    worst = 0.0
    for _ in range(40):
        u = rng.standard_normal(16).astype(np.float32)
        u /= np.abs(u).max()
        x = base.copy()
        x[0, 0], x[0, 1] = 1e15 * u, -1e15 * u + (rng.standard_normal(16) * 1e8).astype(np.float32)
        full, without = run(jnp.asarray(x), jnp.ones(4)), run(jnp.asarray(x), jnp.ones(4).at[0].set(0.0))
        moved = float(jnp.sqrt(sum(jnp.sum(jnp.square(a - b)) for a, b in
                                   zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(without),
                                       strict=True))))
        worst = max(worst, moved)
    assert worst <= 1.0 + 1e-4, worst


def test_a_model_that_mixes_examples_is_detected():
    x = np.random.default_rng(5).standard_normal((8, 5)).astype(np.float32)
    mixing = BatchNormNet()
    variables = mixing.init(jax.random.key(0), jnp.asarray(x))
    reason = mixing_reason(mixing, variables, x)
    assert reason is not None and "mixes examples" in reason and "\n" not in reason
    with pytest.raises(ConfigError, match="^model: .*per-example sensitivity"):
        check_per_example(mixing, variables, x)
    mlp = TabularMLP()
    check_per_example(mlp, mlp.init(jax.random.key(0), jnp.asarray(x)), x)  # passes
    tokens = np.random.default_rng(6).integers(0, 11, (4, 6))  # integer inputs: perturbed by random ids
    model = TiedLM()
    assert mixing_reason(model, model.init(jax.random.key(0), jnp.asarray(tokens)), tokens) is None


class _BatchSizeDependent(nn.Module):
    """Per-row, but scales by the batch size: only the run-alone test sees it."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x) * x.shape[0]


class _UnusedBranch(nn.Module):
    """Has parameters (created at init only) that no call in the forward pass uses."""

    @nn.compact
    def __call__(self, x):
        if self.is_initializing():
            nn.Dense(2, name="extra")(x)
        return nn.Dense(3)(x)


class _Tanh(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.Dense(x.shape[-1])(x))


class _Rematerialised(nn.Module):
    """A lifted transform inside the model: calls under nn.remat run in another trace."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.remat(_Tanh)()(x))


def test_lifted_transforms_fall_back_to_vmap_with_the_reason():
    model = _Rematerialised()
    x = jnp.asarray(np.random.default_rng(9).standard_normal((4, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    planned = plan(model, params, x, jnp.asarray([0, 1, 2, 0]), path="fast")
    rules, reason = planned.rule_map, planned.reason
    assert "lifted transform" in reason and set(rules.values()) == {"vmap"}


def test_batch_dependence_is_detected():
    x = np.random.default_rng(7).standard_normal((4, 3)).astype(np.float32)
    model = _BatchSizeDependent()
    assert "run alone" in mixing_reason(model, model.init(jax.random.key(0), jnp.asarray(x)), x)


def test_uncovered_parameters_fall_back_to_vmap_with_the_reason():
    model = _UnusedBranch()
    x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0])
    params = model.init(jax.random.key(0), x)["params"]
    planned = plan(model, params, x, y, path="fast")
    rules, reason = planned.rule_map, planned.reason
    assert "extra/kernel" in reason and set(rules.values()) == {"vmap"}
    out = jax.jit(lambda p: clipped_sum(model, p, x, y, jnp.ones(4), 0.1, path="fast"))(params)
    assert out.reason == reason
    assert float(jnp.max(jnp.abs(out.grads["extra"]["kernel"]))) == 0.0
    with pytest.raises(ConfigError, match="clipping"):
        clipped_sum(model, params, x, y, jnp.ones(4), 0.1, path="ghost")


@pytest.mark.slow
def test_four_devices_equal_one():
    # Inside shard_map the parameters and taps are made device-varying, so no example's gradient is summed
    # with another device's examples before its norm; the sums then meet in one psum.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = Path(__file__).parent / "helpers" / "fastclip_devices.py"
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reason"] is None
    assert result["grad_diff"] <= 1e-5 * result["grad_scale"], result
    assert result["norm_diff"] <= 1e-5 * result["norm_scale"], result
