"""The training loop: compile once, stop at the budget, report what was spent, learn."""

import math

import jax
import pytest

from dptune.data.datasets import load_dataset
from dptune.errors import ConfigError, PrivacyError
from dptune.models.builtin import build_model
from dptune.privacy import accounting as privacy
from dptune.trainer import compile_stats
from dptune.trainer.dp_step import step_functions
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate

BUDGET = PrivacyBudget(epsilon=8.0, delta=1e-5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def cnn_steps(digits):
    """The step functions every run of the cnn on digits shares in this process (other tests may have used them)."""
    fns = step_functions(build_model("cnn", digits.num_classes), "momentum", 64, tuple(jax.local_devices()))
    return fns, dict(fns.traces)


def test_second_trial_compiles_nothing(digits):
    cfg = RunConfig(private_seed=0, microbatch_size=64, eval_every=2)
    fns, before = cnn_steps(digits)
    train_and_evaluate(digits, Hyperparams(batch_size=100, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0),
                       3, config=cfg, budget=BUDGET)
    traces, compiles = dict(fns.traces), compile_stats.backend_compiles()
    assert traces["accumulate"] - before.get("accumulate", 0) <= 1 and traces["apply"] - before.get("apply", 0) <= 1
    # Different learning rate, clip norm, noise, momentum and batch size (so q and the
    # number of microbatches per step): same compiled functions.
    r = train_and_evaluate(digits, Hyperparams(batch_size=333, learning_rate=0.1, clip_norm=3.0,
                                               noise_multiplier=4.0, momentum=0.5),
                           3, config=cfg, budget=PrivacyBudget(epsilon=3.0, delta=1e-5))
    assert dict(fns.traces) == traces
    assert compile_stats.backend_compiles() == compiles
    assert r.compile_seconds < 0.5


def test_resident_feed_compiles_one_step_for_every_trial(digits):
    """Data on the device, one compiled call per logical batch: the batch size is data, not shape."""
    cfg = RunConfig(private_seed=0, microbatch_size=64, eval_every=2, feed="resident")
    fns, before = cnn_steps(digits)
    first = train_and_evaluate(digits, Hyperparams(batch_size=100, learning_rate=0.5, noise_multiplier=2.0),
                               3, config=cfg, budget=BUDGET)
    assert first.feed == "resident"
    traces, compiles = dict(fns.traces), compile_stats.backend_compiles()
    assert traces["step_resident"] - before.get("step_resident", 0) <= 1
    train_and_evaluate(digits, Hyperparams(batch_size=333, learning_rate=0.1, clip_norm=3.0, noise_multiplier=4.0),
                       3, config=cfg, budget=PrivacyBudget(epsilon=3.0, delta=1e-5))
    assert dict(fns.traces) == traces
    assert compile_stats.backend_compiles() == compiles


def test_run_stops_at_the_budget(digits):
    hp = Hyperparams(batch_size=300, learning_rate=0.5, clip_norm=1.0, noise_multiplier=1.5)
    budget = PrivacyBudget(epsilon=2.0, delta=1e-5)
    q = hp.batch_size / len(digits.train)
    allowed = privacy.max_steps(q, 1.5, 2.0, 1e-5)
    assert 0 < allowed < 1000
    r = train_and_evaluate(digits, hp, 1000, config=RunConfig(private_seed=0, microbatch_size=64, eval_every=50),
                           budget=budget)
    assert r.steps == allowed and r.budget_limited
    assert r.epsilon <= budget.epsilon
    assert privacy.epsilon(q, 1.5, allowed + 1, 1e-5) > budget.epsilon


def test_callback_stop_reports_what_was_spent(digits):
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=3.0)
    seen = []

    def stop_at_first_eval(step, metrics):
        seen.append((step, metrics["val_accuracy"]))
        return True

    r = train_and_evaluate(digits, hp, 20, config=RunConfig(private_seed=0, microbatch_size=64, eval_every=4),
                           budget=BUDGET, callback=stop_at_first_eval)
    assert r.stopped_early and r.steps == 4 and seen[0][0] == 4
    assert r.epsilon == pytest.approx(privacy.epsilon(200 / len(digits.train), 3.0, 4, 1e-5))
    assert r.epsilon < privacy.epsilon(200 / len(digits.train), 3.0, 20, 1e-5)


def test_a_budget_no_step_fits_is_refused(digits):
    hp = Hyperparams(batch_size=len(digits.train), learning_rate=0.5, clip_norm=1.0, noise_multiplier=0.3)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        train_and_evaluate(digits, hp, 5, config=RunConfig(private_seed=0, microbatch_size=64),
                           budget=PrivacyBudget(1.0, 1e-5))


@pytest.mark.parametrize(
    "hp,field",
    [
        (Hyperparams(batch_size=0, learning_rate=0.1), "batch_size"),
        (Hyperparams(batch_size=10**6, learning_rate=0.1), "batch_size"),
        (Hyperparams(batch_size=10, learning_rate=-1.0), "learning_rate"),
        (Hyperparams(batch_size=10, learning_rate=0.1, clip_norm=0.0), "clip_norm"),
        (Hyperparams(batch_size=10, learning_rate=0.1, optimizer="lbfgs"), "optimizer"),
    ],
)
def test_bad_hyperparameters_name_the_field(digits, hp, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        train_and_evaluate(digits, hp, 5, config=RunConfig(private_seed=0), budget=BUDGET)


def test_delta_not_below_one_over_n_is_refused(digits):
    hp = Hyperparams(batch_size=100, learning_rate=0.1)
    with pytest.raises(PrivacyError, match="delta"):
        train_and_evaluate(digits, hp, 5, config=RunConfig(private_seed=0), budget=PrivacyBudget(3.0, 0.01))


@pytest.mark.slow
def test_mnist5k_learns_with_dp(mnist):
    q_steps, eps = 25, 8.0
    hp = Hyperparams(batch_size=700, learning_rate=2.0, clip_norm=1.0,
                     noise_multiplier=privacy.noise_for_epsilon(700 / len(mnist.train), q_steps, eps, 1e-5),
                     ema_decay=0.9)
    r = train_and_evaluate(mnist, hp, q_steps, config=RunConfig(private_seed=0, microbatch_size=256, eval_every=25),
                           budget=PrivacyBudget(eps, 1e-5))
    assert r.steps == q_steps and r.epsilon <= eps
    assert r.val_accuracy > 0.6 and r.test_accuracy > 0.6, r.history
    assert r.ema_val_accuracy is not None and r.ema_val_accuracy > 0.3
    assert r.examples_per_second > 0 and math.isfinite(r.wall_seconds)


@pytest.mark.slow
def test_mnist5k_learns_without_dp(mnist):
    hp = Hyperparams(batch_size=128, learning_rate=0.05)
    r = train_and_evaluate(mnist, hp, 60, config=RunConfig(private=False, private_seed=0, microbatch_size=128))
    assert r.privacy is None and r.epsilon is None
    assert r.val_accuracy > 0.85 and r.test_accuracy > 0.85
