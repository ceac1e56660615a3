"""Sensitivity under adversarial inputs: token ids the lookup wraps or drops, one-row tables, cancelling
tokens, and bf16 models, on every clipping path. Removing one example moves the clipped sum by at most C,
measured on the sums themselves, and the fast path's sum equals the vmap reference's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptune.trainer import clipping
from dptune.trainer.clipping.rules import embed_pieces, embed_rows, robust_norm
from tests.fastclip_models import Bf16Book, Bf16Layer, TokenBag
from tests.test_dp_step import _diff, _norm

B, T = 4, 4
INT32 = np.iinfo(np.int32)


def largest_term(run, n, clip):
    """maxᵢ ‖run(all) − run(all but i)‖ / C: each example's contribution as summed, in float64."""
    ones = np.ones(n, np.float32)
    full = run(jnp.asarray(ones))
    return max(_norm(_diff(full, run(jnp.asarray(ones * (np.arange(n) != i))))) for i in range(n)) / clip


def adversarial_ids(vocab, n):
    """n ids: in range, wrapped once (−vocab ≤ id < 0), beyond the table either way, and the extremes."""
    edges = [0, vocab - 1, vocab, -1, -vocab, -vocab - 1, INT32.min, INT32.max]
    return st.lists(st.one_of(st.integers(-3 * vocab, 3 * vocab), st.sampled_from(edges)), min_size=n, max_size=n)


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(2, 6), data=st.data())
def test_embed_rows_and_rule_follow_the_lookup_and_its_vjp(vocab, data):
    ids = jnp.asarray(data.draw(adversarial_ids(vocab, B * T)), jnp.int32).reshape(B, T)
    # Gradient rows ±v, 2v, 0: a repeated id's rows can cancel exactly.
    signs = jnp.asarray(data.draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0, 2.0]), min_size=B * T, max_size=B * T)))
    g = signs.reshape(B, T, 1) * jnp.asarray([0.5, -1.0, 2.0])
    table = jnp.arange(vocab * 3, dtype=jnp.float32).reshape(vocab, 3)
    rows = embed_rows(ids, vocab)
    forward = jnp.take(table, ids, axis=0)  # what nn.Embed does for vocab > 1
    np.testing.assert_array_equal(np.isnan(forward[..., 0]), rows < 0)
    np.testing.assert_array_equal(forward[rows >= 0], table[rows[rows >= 0]])
    per_example = jax.vmap(lambda i, gi: jax.vjp(lambda t: jnp.take(t, i, axis=0), table)[1](gi)[0])(ids, g)
    piece = embed_pieces(ids, g, vocab)
    np.testing.assert_allclose(piece.norms, robust_norm(per_example), rtol=1e-6, atol=1e-6)
    w, keep = jnp.asarray([0.5, 2.0, 0.1, 1.0]), jnp.asarray([True, True, False, True])
    np.testing.assert_allclose(
        piece.weighted(w, keep), jnp.tensordot(jnp.where(keep, w, 0.0), per_example, axes=1), rtol=1e-6, atol=1e-6
    )


def _linear(logits, yi):
    # No softmax to saturate: every logit's gradient is yi, whatever the table's size.
    return jnp.vdot(logits, yi)


@functools.lru_cache
def _token_bag(vocab, tied, weights=TokenBag.weights):
    model = TokenBag(vocab, tied, weights=weights)
    ids = jnp.zeros((B, len(weights)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]

    @jax.jit
    def both(params, ids, y, mask, clip):
        fast = clipping.clipped_sum(model, params, ids, y, mask, clip, path="fast", loss_fn=_linear)
        ref = clipping.clipped_sum(model, params, ids, y, mask, clip, path="vmap", loss_fn=_linear)
        return fast.grads, ref.grads

    planned = clipping.plan(model, params, ids, jnp.zeros((B, vocab if tied else 3)), path="fast", loss_fn=_linear)
    rules, reason = planned.rule_map, planned.reason
    return params, both, rules, reason, (vocab if tied else 3)


@settings(max_examples=40, deadline=None)
@given(vocab=st.sampled_from([1, 2, 5]), tied=st.booleans(), clip=st.sampled_from([1e-3, 0.5]),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_adversarial_ids_move_the_sum_by_at_most_c_on_every_embedding_rule(vocab, tied, clip, seed, data):
    params, both, rules, reason, classes = _token_bag(vocab, tied)
    assert reason is None
    # A one-row table is broadcast to every id, which no scatter of ids reproduces: its own VJP.
    assert rules["Embed_0/embedding"] == ("tied" if tied else "layer_vjp" if vocab == 1 else "embed")
    assert tied or rules["Embed_1/embedding"] == "embed"  # the attend head
    ids = jnp.asarray(data.draw(adversarial_ids(vocab, B * T)), jnp.int32).reshape(B, T)
    y = jnp.asarray(np.random.default_rng(seed).standard_normal((B, classes)), jnp.float32)
    assert largest_term(lambda m: both(params, ids, y, m, clip)[0], B, clip) <= 1 + 1e-5
    fast, ref = both(params, ids, y, jnp.ones(B), clip)
    for u, v in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(ref), strict=True):
        # An entry is a sum of B terms of size up to C that may cancel to a small fraction of C: the two paths'
        # float32 rounding then shows at about 1e-5·C, so the bound is on C's scale, where a wrong weight is ~C.
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-4 * clip)


def test_the_review_case_one_row_table_ids_0_and_minus_2():
    # Both ids read the one row: 1.414·C when the rule grouped them apart. A small row keeps the head's
    # gradient (∝ the row) small beside the table's.
    params, both, _, _, _ = _token_bag(1, False, (1.0, 1.0))
    params = {**params, "Embed_0": {"embedding": params["Embed_0"]["embedding"] * 1e-4}}
    ids = jnp.asarray([[0, -2]] * B, jnp.int32)
    y = jnp.ones((B, 3), jnp.float32)
    assert largest_term(lambda m: both(params, ids, y, m, 1e-3)[0], B, 1e-3) <= 1 + 1e-5


# bf16 models: (model, input shape or "ids", clipping path, the rule the bf16 layer takes).
BF16 = {
    "dense": (Bf16Layer("dense"), (6,), "fast", "dense"),
    "conv": (Bf16Layer("conv"), (4, 4, 2), "fast", "conv"),
    "norm": (Bf16Layer("norm"), (4, 4, 2), "fast", "norm_affine"),
    "embed": (Bf16Layer("embed"), "ids", "fast", "embed"),
    "vmap": (Bf16Layer("dense", jnp.bfloat16), (6,), "vmap", "vmap"),  # bf16 parameters: bf16 gradients
}
N_BF16 = 16


def _bf16_batch(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 7, (N_BF16, 5)) if shape == "ids" else rng.standard_normal((N_BF16, *shape))
    return jnp.asarray(x, jnp.int32 if shape == "ids" else jnp.float32), jnp.asarray(rng.integers(0, 3, N_BF16))


@pytest.mark.parametrize("case", sorted(BF16))
def test_bf16_models_keep_every_fast_and_vmap_term_within_c(case):
    model, shape, path, rule = BF16[case]
    x, y = _bf16_batch(shape)
    params = model.init(jax.random.key(0), x)["params"]
    clip = 1e-4  # every example clipped
    run = jax.jit(lambda m: clipping.clipped_sum(model, params, x, y, m, clip, path=path))
    assert rule in set(run(jnp.ones(N_BF16)).rule_map.values())
    assert largest_term(lambda m: run(m).grads, N_BF16, clip) <= 1 + 1e-5


@pytest.mark.parametrize("conv_norms", ["materialise", "ghost"])
def test_bf16_activations_keep_every_bookkeeping_term_within_c(conv_norms):
    model = Bf16Book()
    x, y = _bf16_batch((4, 4, 1))
    params = model.init(jax.random.key(0), x)["params"]
    assert clipping.plan(model, params, x, y, path="bookkeeping").reason is None
    clip = 1e-4
    run = jax.jit(lambda m: clipping.clipped_sum(model, params, x, y, m, clip, path="bookkeeping",
                                                conv_norms=conv_norms).grads)
    assert largest_term(run, N_BF16, clip) <= 1 + 1e-5
