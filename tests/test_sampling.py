"""The sampler draws what the accountant assumes: independent inclusion with probability q."""

import numpy as np
from scipy import stats

from dptune.data.sampling import microbatches, pad_to_multiple, poisson_batch


def test_batch_sizes_follow_binomial():
    n, q, draws = 1000, 0.05, 4000
    rng = np.random.default_rng(0)
    sizes = np.array([len(poisson_batch(rng, n, q)) for _ in range(draws)])
    # Bin so that every expected count is >= 5, then a chi-square goodness-of-fit test.
    edges = np.arange(int(stats.binom.ppf(0.01, n, q)), int(stats.binom.ppf(0.99, n, q)) + 1)
    observed = [np.sum(sizes < edges[0])] + [np.sum(sizes == k) for k in edges] + [np.sum(sizes > edges[-1])]
    expected = [stats.binom.cdf(edges[0] - 1, n, q)] + [stats.binom.pmf(k, n, q) for k in edges] + [
        stats.binom.sf(edges[-1], n, q)]
    expected = np.asarray(expected) * draws
    assert expected.min() >= 5
    _, p = stats.chisquare(observed, expected)
    assert p > 1e-3, f"batch sizes do not look Binomial(N, q): p = {p:.2e}"


def test_fixed_size_batches_would_fail_the_size_test():
    # The test above can fail: shuffled fixed-size batches have zero size variance.
    n, q = 1000, 0.05
    rng = np.random.default_rng(1)
    sizes = np.array([len(poisson_batch(rng, n, q)) for _ in range(2000)])
    assert sizes.var() > 0.5 * n * q * (1 - q)


def test_each_example_joins_independently_with_probability_q():
    n, q, draws = 50, 0.2, 5000
    rng = np.random.default_rng(2)
    counts = np.zeros(n)
    both = 0
    for _ in range(draws):
        b = poisson_batch(rng, n, q)
        counts[b] += 1
        both += (0 in b) and (1 in b)
    # Same rate for every example, and that rate is q.
    _, p = stats.chisquare(counts, np.full(n, counts.sum() / n))
    assert p > 1e-3
    assert abs(counts.sum() / (n * draws) - q) < 4 * np.sqrt(q * (1 - q) / (n * draws))
    # Pairwise independence: P(0 and 1 both included) = q².
    assert abs(both / draws - q * q) < 4 * np.sqrt(q * q * (1 - q * q) / draws)


def test_full_batch_is_every_example():
    np.testing.assert_array_equal(poisson_batch(np.random.default_rng(0), 7, 1.0), np.arange(7))


def test_padding_and_microbatches():
    idx, mask = pad_to_multiple(np.array([4, 9, 2]), 4)
    np.testing.assert_array_equal(idx, [4, 9, 2, 0])
    np.testing.assert_array_equal(mask, [1, 1, 1, 0])
    chunks = list(microbatches(*pad_to_multiple(np.arange(10), 4), 4))
    assert [len(c[0]) for c in chunks] == [4, 4, 4]
    assert sum(c[1].sum() for c in chunks) == 10
    empty, empty_mask = pad_to_multiple(np.array([], dtype=np.int64), 4)
    assert len(empty) == 0 and list(microbatches(empty, empty_mask, 4)) == []
