"""Per-example normalisation ("automatic clipping", Bu et al. 2023): the DP step's invariants hold for it too
(its add-or-remove sensitivity is tested beside clipping's, in test_dp_step.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dptune.config.schema import resolve
from dptune.errors import ConfigError
from dptune.trainer.dp_step import NORMALIZE_GAMMA, normalized_sum
from tests.test_dp_step import _diff, _norm, _setup


def test_each_term_is_normalised_not_clipped():
    g = {"w": jnp.asarray([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [np.nan, 1.0]])}
    s = normalized_sum(g, jnp.ones(4), 2.0)
    # Large and small gradients alike come out at norm ≈ C (clipping would leave the small one at 0.5);
    # the zero gradient adds nothing and the NaN one is dropped.
    big = 2.0 * np.array([3.0, 4.0]) / (5.0 + NORMALIZE_GAMMA)
    small = 2.0 * np.array([0.3, 0.4]) / (0.5 + NORMALIZE_GAMMA)
    np.testing.assert_allclose(s["w"], big + small, rtol=1e-6)
    # Padding contributes nothing, whatever it holds.
    padded = normalized_sum({"w": jnp.asarray([[3.0, 4.0], [1e30, -1e30]])}, jnp.asarray([1.0, 0.0]), 2.0)
    np.testing.assert_allclose(padded["w"], big, rtol=1e-6)


def test_huge_finite_gradients_are_normalised_without_overflow():
    g = {"w": jnp.asarray([[3e38, 3e38], [1.0, 0.0]], jnp.float32)}
    s = np.asarray(normalized_sum(g, jnp.ones(2), 1.0)["w"], np.float64)
    np.testing.assert_allclose(s, [1 / np.sqrt(2) + 1 / (1 + NORMALIZE_GAMMA), 1 / np.sqrt(2)], rtol=1e-5)


@pytest.fixture(scope="module")
def digits():
    from dptune.data.datasets import load_dataset

    return load_dataset("digits")


def test_the_model_path_normalises_and_keeps_the_sensitivity(digits):
    _, fns, params = _setup(digits, microbatch=32, clipping="normalize")
    x, y = digits.train.take(np.arange(32))
    x = x.copy()
    x[5] = np.inf
    x[9] *= 1e20
    clip = 0.3
    full = fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(x, y, np.ones(32, np.float32)), clip)
    assert fns.clipping_plan(params, digits.image_shape, jnp.float32).label == "normalize"
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(full))
    for i in (0, 5, 9):
        mask = np.ones(32, np.float32)
        mask[i] = 0
        without = fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(x, y, mask), clip)
        moved = _norm(_diff(full, without))
        assert moved <= clip * (1 + 1e-4)
        if i == 0:  # an ordinary example moves the sum by almost exactly C (normalised, not clipped to less)
            assert moved > 0.9 * clip


def test_a_sampled_clip_norm_is_refused_with_normalize():
    from dptune.search.modes import check_clipping

    base = {"name": "n", "dataset": "digits", "privacy": {"epsilon": 3.0}, "clipping": "normalize",
            "search_space": {"batch_size": 128, "effective_learning_rate": {"low": 0.5, "high": 8, "log": True},
                             "clip_norm": {"low": 0.1, "high": 10, "log": True}, "epochs": 2}}
    with pytest.raises(ConfigError, match="clip_norm"):
        check_clipping(resolve(base))
    fixed = dict(base, search_space={**base["search_space"], "clip_norm": 1.0})
    check_clipping(resolve(fixed))  # a fixed C is accepted: it only scales the update with the learning rate
