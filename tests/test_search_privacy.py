"""Privacy of the search: totals against dp-accounting, and the law of the trial count."""

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from scipy import stats

from dptune.errors import PrivacyError
from dptune.privacy import accounting as privacy
from dptune.privacy.search_totals import TrialCount, composed_epsilon, naive_epsilon, noise_for_search, search_epsilon

# The reference example.
N, B, SIGMA, T, DELTA = 50_000, 4_096, 3.0, 2_500, 1e-5
Q = B / N

COUNTS = [
    TrialCount("poisson", 10),
    TrialCount("truncated_negative_binomial", 10, eta=0.5),
    TrialCount("geometric", 10),
    TrialCount("logarithmic", 10),
]


@pytest.mark.parametrize("count", COUNTS, ids=lambda c: c.distribution)
def test_search_total_agrees_with_dp_accounting_and_beats_naive(count):
    trial = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(Q, dp_event.GaussianDpEvent(SIGMA)), T)
    direct = RdpAccountant().compose(dp_event.RepeatAndSelectDpEvent(trial, 10, count.shape)).get_epsilon(DELTA)
    total = search_epsilon(Q, SIGMA, T, DELTA, count)
    assert total == pytest.approx(direct, rel=1e-9)
    single = privacy.epsilon(Q, SIGMA, T, DELTA, "rdp")
    assert single < total < naive_epsilon(Q, SIGMA, T, DELTA, 10)


def test_reference_values():
    # Measured with dp-accounting 0.6: one trial ≈ 7.10, Poisson(10) search ≈ 15.87, ten trials composed ≈ 29.8.
    assert privacy.epsilon(Q, SIGMA, T, DELTA, "rdp") == pytest.approx(7.10, abs=0.01)
    assert search_epsilon(Q, SIGMA, T, DELTA, COUNTS[0]) == pytest.approx(15.87, abs=0.01)
    assert naive_epsilon(Q, SIGMA, T, DELTA, 10) == pytest.approx(29.84, abs=0.01)


def test_noise_for_search_round_trip():
    count = TrialCount("geometric", 8)
    sigma = noise_for_search(0.1, 200, 6.0, DELTA, count)
    assert search_epsilon(0.1, sigma, 200, DELTA, count) <= 6.0
    assert search_epsilon(0.1, sigma * 0.99, 200, DELTA, count) > 6.0


@pytest.mark.parametrize("count", COUNTS, ids=lambda c: c.distribution)
def test_pmf_sums_to_one_with_the_right_mean(count):
    ks = np.arange(0, 4000)
    p = np.array([count.pmf(int(k)) for k in ks])
    assert p.sum() == pytest.approx(1.0, abs=1e-6)
    assert (ks * p).sum() == pytest.approx(count.mean, rel=1e-4)


@pytest.mark.parametrize("count", COUNTS, ids=lambda c: c.distribution)
def test_drawn_trial_counts_follow_the_distribution(count):
    draws = 4000
    ks = np.array([count.sample(np.random.default_rng(seed)) for seed in range(draws)])
    cut = 1
    while sum(count.pmf(k) for k in range(cut, 10_000)) * draws >= 5 * 2:
        cut += 1
    cut -= 1
    support = range(0 if count.distribution == "poisson" else 1, cut)
    observed = [np.sum(ks == k) for k in support] + [np.sum(ks >= cut)]
    expected = np.array([count.pmf(k) for k in support] + [1 - sum(count.pmf(k) for k in range(0, cut))]) * draws
    keep = expected >= 5
    merged_obs = np.append(np.array(observed)[keep], np.array(observed)[~keep].sum())
    merged_exp = np.append(expected[keep], expected[~keep].sum())
    if merged_exp[-1] < 5:
        merged_obs, merged_exp = (
            merged_obs[:-2].tolist() + [merged_obs[-2:].sum()],
            merged_exp[:-2].tolist() + [merged_exp[-2:].sum()],
        )
    _, p = stats.chisquare(merged_obs, merged_exp)
    assert p > 1e-3, (count, p)


def test_bad_distributions():
    with pytest.raises(PrivacyError, match="eta"):
        TrialCount("truncated_negative_binomial", 10)
    with pytest.raises(PrivacyError, match="distribution"):
        TrialCount("uniform", 10)
    with pytest.raises(PrivacyError, match="mean_trials"):
        TrialCount("geometric", 0.5)


def test_composed_epsilon_agrees_with_dp_accounting():
    trials = [(0.1, 1.0, 50), (0.2, 2.0, 30), (0.05, 1.5, 0)]
    events = [
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), t)
        for q, s, t in trials
        if t
    ]
    composed = dp_event.ComposedDpEvent(events)
    got = composed_epsilon(trials, DELTA)
    assert got["rdp"] == pytest.approx(RdpAccountant().compose(composed).get_epsilon(DELTA), rel=1e-9)
    assert got["pld"] == pytest.approx(PLDAccountant().compose(composed).get_epsilon(DELTA), rel=1e-9)
    assert got["rdp"] > privacy.epsilon(0.1, 1.0, 50, DELTA, "rdp")
    assert composed_epsilon([], DELTA) == {"rdp": 0.0, "pld": 0.0}
    assert math.isinf(composed_epsilon([(0.1, 0.0, 3)], DELTA)["rdp"])


def test_a_filter_at_an_order_dp_accounting_cannot_compute_is_bounded_by_the_next_integer_order():
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    from dptune.privacy.search_totals import RenyiFilter

    run = (0.2, 1.36, 10)  # dp-accounting's series fails at order 1.5 for it
    event = privacy.dpsgd_event(*run)
    assert math.isinf(RdpAccountant(orders=[1.5]).compose(event).get_epsilon(DELTA))
    filt = RenyiFilter(60.0, DELTA, 1.5)
    at_two = RdpAccountant(orders=[2.0]).compose(event).rdp[0]
    assert filt.spent([run]) == pytest.approx(compute_epsilon([1.5], [at_two], DELTA)[0], rel=1e-12)
    assert filt.admits([run])


def test_a_filter_cap_converted_to_another_delta_bounds_everything_it_admits():
    from dptune.privacy.search_totals import RenyiFilter, default_filter_order

    order = default_filter_order(4.0, DELTA)
    filt, half = RenyiFilter(4.0, DELTA, order), RenyiFilter(math.inf, DELTA / 2, order)
    assert filt.cap_at(DELTA) == pytest.approx(4.0, rel=1e-12)
    assert filt.cap_at(DELTA / 2) == pytest.approx(4.0 + math.log(2) / (order - 1), rel=1e-12)
    admitted = 0
    for sigma in np.linspace(0.8, 3.0, 12):
        for count in (1, 2, 3, 5):
            trials = [(0.05, float(sigma), 40)] * count
            if filt.admits(trials):
                admitted += 1
                assert half.spent(trials) <= filt.cap_at(DELTA / 2) + 1e-9
    assert admitted > 10
