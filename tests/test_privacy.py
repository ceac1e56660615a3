"""Contract tests of dptune.privacy.accounting against direct dp_accounting calls."""

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from dptune.errors import PrivacyError
from dptune.privacy import accounting as privacy

DIRECT = {"pld": PLDAccountant, "rdp": RdpAccountant}


def direct_epsilon(acc: str, q: float, sigma: float, steps: int, delta: float) -> float:
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )
    return DIRECT[acc]().compose(event).get_epsilon(delta)


@pytest.mark.parametrize("acc", ["pld", "rdp"])
@pytest.mark.parametrize(
    "q,sigma,steps,delta",
    [(0.01, 1.0, 100, 1e-5), (0.1, 2.0, 50, 1e-6), (0.5, 4.0, 20, 1e-5), (256 / 60000, 1.1, 1000, 1e-5)],
)
def test_epsilon_agrees_with_dp_accounting(acc, q, sigma, steps, delta):
    assert privacy.epsilon(q, sigma, steps, delta, acc) == pytest.approx(
        direct_epsilon(acc, q, sigma, steps, delta), rel=1e-9
    )


def test_tf_privacy_mnist_tutorial_values():
    # TF Privacy's MNIST tutorial printed ε = 2.92 for these settings, from an
    # older RDP-to-(ε, δ) conversion. dp-accounting's RDP conversion is tighter
    # (≈ 2.60) and PLD accounting tighter still (≈ 2.38).
    q, sigma, steps, delta = 256 / 60000, 1.1, math.ceil(60 * 60000 / 256), 1e-5
    rdp = privacy.epsilon(q, sigma, steps, delta, "rdp")
    pld = privacy.epsilon(q, sigma, steps, delta, "pld")
    assert rdp == pytest.approx(2.60, abs=0.02)
    assert pld == pytest.approx(2.38, abs=0.02)
    assert pld < rdp < 2.92


@pytest.mark.parametrize("acc", ["pld", "rdp"])
def test_full_batch_equals_gaussian_composition(acc):
    sigma, steps, delta = 5.0, 10, 1e-5
    gaussian = DIRECT[acc]().compose(
        dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), steps)
    ).get_epsilon(delta)
    assert privacy.epsilon(1.0, sigma, steps, delta, acc) == pytest.approx(gaussian, rel=1e-6)


def test_edge_values():
    assert privacy.epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.1, 0.0, 1, 1e-5) == math.inf
    assert privacy.max_steps(0.1, 0.0, 3.0, 1e-5) == 0
    # One full-batch step at tiny σ is already far over ε = 1.
    assert privacy.max_steps(1.0, 0.3, 1.0, 1e-5) == 0


@pytest.mark.parametrize("acc", ["pld", "rdp"])
def test_noise_calibration_round_trip(acc):
    q, steps, target, delta = 0.02, 500, 3.0, 1e-5
    sigma = privacy.noise_for_epsilon(q, steps, target, delta, acc)
    assert privacy.epsilon(q, sigma, steps, delta, acc) <= target
    assert privacy.epsilon(q, sigma * 0.99, steps, delta, acc) > target


@pytest.mark.parametrize("acc", ["pld", "rdp"])
def test_steps_calibration_round_trip(acc):
    q, sigma, target, delta = 0.05, 1.2, 2.0, 1e-5
    t = privacy.max_steps(q, sigma, target, delta, acc)
    assert t > 0
    assert privacy.epsilon(q, sigma, t, delta, acc) <= target
    assert privacy.epsilon(q, sigma, t + 1, delta, acc) > target


def test_max_steps_respects_limit():
    assert privacy.max_steps(0.01, 5.0, 8.0, 1e-5, "rdp", limit=7) == 7


def test_pld_is_tighter_than_rdp():
    args = (0.05, 1.0, 200, 1e-5)
    assert privacy.epsilon(*args, "pld") < privacy.epsilon(*args, "rdp")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -2.0}, "epsilon"),
        ({"steps": -1}, "steps"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(PrivacyError, match=f"^{field}:"):
        privacy.validate(**kwargs)


def test_delta_must_be_below_one_over_n():
    privacy.check_delta(1e-5, 5000)
    with pytest.raises(PrivacyError, match="delta"):
        privacy.check_delta(1e-3, 5000)
    assert privacy.default_delta(5000) < 1 / 5000
    assert privacy.default_delta(60000) == pytest.approx(1e-6)


def test_pld_work_is_bounded_at_any_epsilon():
    # σ = 0.01 asked the PLD accountant for a grid of ~10^9 points; beyond PLD_LIMIT the RDP bound is reported.
    huge = privacy.epsilon(256 / 3500, 0.01, 137, 1e-5, "pld")
    assert privacy.PLD_LIMIT < huge <= privacy.epsilon(256 / 3500, 0.01, 137, 1e-5, "rdp")
    # Above ε = 10 the grid coarsens in proportion to ε: pessimistic, and within 1e-4 of the full-resolution PLD.
    exact = direct_epsilon("pld", 0.2, 0.5, 50, 1e-5)
    assert exact > 10 and exact <= privacy.epsilon(0.2, 0.5, 50, 1e-5, "pld") <= exact * (1 + 1e-4)


@pytest.mark.parametrize("ask", [lambda: privacy.noise_for_epsilon(0.01, 100, 1e5, 1e-5),
                                 lambda: privacy.max_steps(0.01, 1.0, 1e9, 1e-5),
                                 lambda: privacy.validate(epsilon=100.5)])
def test_target_epsilon_above_the_maximum_is_refused(ask):
    with pytest.raises(PrivacyError, match="epsilon: .* is above the maximum 100"):
        ask()


def test_orders_dp_accounting_drops_for_one_run_are_bounded_from_above_not_lost():
    """At q = 0.2, σ = 1.36 dp-accounting's series fails below order 1.7 and it sets those orders to inf, which a
    composition then loses for every run. The filled accountant bounds each by the smallest value at a higher order
    (Rényi divergence grows with the order) and leaves every order dp-accounting computed as it was."""
    import numpy as np

    event = privacy.dpsgd_event(0.2, 1.36, 10)
    plain, filled = RdpAccountant().compose(event), privacy.FilledRdpAccountant().compose(event)
    dropped = ~np.isfinite(plain.rdp)
    assert dropped[:6].all() and np.array_equal(filled.rdp[~dropped], plain.rdp[~dropped])
    for i in np.flatnonzero(dropped):
        assert filled.rdp[i] == min(plain.rdp[i + 1:])
    # Composed with a run whose low orders matter, the kept orders are what bring ε near PLD.
    mix = dp_event.ComposedDpEvent([event, privacy.dpsgd_event(0.02, 0.17, 10)])
    pld = PLDAccountant(value_discretization_interval=1e-2).compose(mix).get_epsilon(1e-5)
    assert pld <= privacy.FilledRdpAccountant().compose(mix).get_epsilon(1e-5) <= 1.3 * pld
    assert RdpAccountant().compose(mix).get_epsilon(1e-5) > 3 * pld
    # PLD answers for the mix (its RDP screen no longer overstates it past the limit where PLD is skipped).
    assert privacy.make_accountant("pld").compose(mix).get_epsilon(1e-5) == pytest.approx(pld, rel=1e-2)
