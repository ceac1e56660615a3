"""The printed ε is true: the holes found by the end-to-end privacy review stay closed.

Each test is written so that it fails on the behaviour it guards against (where
the old behaviour can still be built, the test builds it as a negative control).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
import yaml
from dp_accounting import dp_event
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dptune.config import schema as config
from dptune.data.augment import Augmentation
from dptune.data.datasets import load_dataset
from dptune.errors import ConfigError
from dptune.models import checkpoint
from dptune.models.builtin import build_model, init_params
from dptune.privacy import search_totals as search_privacy
from dptune.privacy.search_totals import RenyiFilter, TrialCount
from dptune.randomness import SecretSeed
from dptune.search import objective, results, study
from dptune.trainer.dp_step import step_functions
from dptune.trainer.run import dataset_of
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, augmenter, train_and_evaluate
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd, timeout=600):
    return run_cli(*args, cwd=cwd, timeout=timeout)


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(t)) for t in jax.tree_util.tree_leaves(tree))))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# -- 2. the noise key has the full width of a JAX key -------------------------------------

def test_seeds_differing_above_bit_32_give_different_noise():
    a, b = 12345, 12345 + 2**50
    # The hole: with x64 off, jax.random.key(int) keeps the low 32 bits only.
    assert np.array_equal(jax.random.key_data(jax.random.key(a)), jax.random.key_data(jax.random.key(b)))
    ka, kb = SecretSeed.from_int(a).noise_key(), SecretSeed.from_int(b).noise_key()
    assert not np.array_equal(jax.random.key_data(ka), jax.random.key_data(kb))
    assert not np.allclose(jax.random.normal(ka, (8,)), jax.random.normal(kb, (8,)))
    # The Poisson sampler gets the same width.
    assert not np.array_equal(SecretSeed.from_int(a).sampler().random(4), SecretSeed.from_int(b).sampler().random(4))


def test_default_key_fills_every_word_from_the_os(monkeypatch):
    words = np.stack([np.asarray(jax.random.key_data(SecretSeed.from_os().noise_key())) for _ in range(16)])
    width = np.asarray(jax.random.key_data(jax.random.key(0))).size
    assert words.reshape(16, -1).shape[1] == width
    for column in words.reshape(16, -1).T:  # every 32-bit word of the key varies between draws
        assert len(set(column.tolist())) == 16
    # train_and_evaluate takes its secret from the OS when no private seed is fixed.
    calls = []
    real = SecretSeed.from_os

    def spy():
        calls.append(1)
        return real()

    monkeypatch.setattr(SecretSeed, "from_os", staticmethod(spy))
    digits = load_dataset("digits")
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    r = train_and_evaluate(digits, hp, 2, config=RunConfig(microbatch_size=64), budget=PrivacyBudget(8.0, 1e-5))
    assert calls == [1] and not r.private_seed_fixed


def test_training_with_seeds_differing_above_bit_32_differs(digits):
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    runs = [train_and_evaluate(digits, hp, 3, config=RunConfig(microbatch_size=64, private_seed=s, eval_every=3),
                               budget=PrivacyBudget(8.0, 1e-5)) for s in (7, 7 + 2**40, 7)]
    assert runs[0].val_loss != runs[1].val_loss
    assert runs[0].val_loss == runs[2].val_loss  # a fixed seed still reproduces


def test_a_fixed_private_seed_never_gives_two_different_runs_one_noise(digits, tmp_path):
    """Full batch, one step, clip norms above every gradient: with one noise z for both runs,
    C₂·Δ₁ − C₁·Δ₂ = −(lr/N)(C₂ − C₁)·g holds the noise-free gradient sum, and two such pairs agree."""
    n = len(digits.train)
    start = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(
        init_params(build_model("cnn", digits.num_classes), digits.image_shape, jax.random.key(0)))])

    def update(clip: float, steps: int = 1) -> np.ndarray:
        hp = Hyperparams(batch_size=n, learning_rate=1e-3, clip_norm=clip, noise_multiplier=2.0, optimizer="sgd")
        path = str(tmp_path / f"c{clip}-{steps}.msgpack")
        train_and_evaluate(digits, hp, steps, config=RunConfig(microbatch_size=64, private_seed=3, seed=0,
                                                               save_checkpoint=path), budget=PrivacyBudget(8.0, 1e-5))
        return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(checkpoint.load(path))]) - start

    d1, d2, d4 = update(1e3), update(2e3), update(4e3)
    one, other = 2e3 * d1 - 1e3 * d2, (4e3 * d1 - 1e3 * d4) / 3
    assert np.linalg.norm(one - other) / np.linalg.norm(one) > 0.5  # ≈ 1e-3 when the runs share their noise
    assert np.array_equal(d1, update(1e3))  # the same run, repeated, reproduces itself


# -- 3. augmentation keyed by (secret, step, example) ---------------------------------------

M, K_COPIES, CLIP = 16, 3, 0.05


@pytest.fixture(scope="module")
def aug_setup(digits):
    model = build_model("cnn", digits.num_classes)
    params = init_params(model, digits.image_shape, jax.random.key(0))
    fns = {c: step_functions(model, "sgd", M, tuple(jax.local_devices()[:1]), c) for c in ("bookkeeping", "vmap")}
    return params, fns


def _clipped_sum(fns, params, digits, indices, augment, step):
    padded = np.zeros(M, np.int64)
    padded[:len(indices)] = indices
    mask = (np.arange(M) < len(indices)).astype(np.float32)
    x, y = digits.train.take(padded)
    xk = augment(x, padded, step)
    return fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(xk, y, mask), CLIP)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=st.integers(0, 2**64), step=st.integers(0, 10_000), seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize("clipping", ["bookkeeping", "vmap"])
def test_removing_one_example_moves_the_augmented_sum_by_at_most_c(digits, aug_setup, clipping, secret, step, seed):
    params, all_fns = aug_setup
    fns = all_fns[clipping]
    rng = np.random.default_rng(seed)
    batch = np.sort(rng.choice(len(digits.train), size=M, replace=False))
    augment = augmenter(Augmentation(K_COPIES, shift=2, flip=True), SecretSeed.from_int(secret))
    full = _clipped_sum(fns, params, digits, batch, augment, step)
    for j in range(0, M, 3):
        rest = np.delete(batch, j)
        diff = jax.tree_util.tree_map(jnp.subtract, full, _clipped_sum(fns, params, digits, rest, augment, step))
        assert _norm(diff) <= CLIP * (1 + 1e-4)


def test_position_keyed_augmentation_would_break_the_bound(digits, aug_setup):
    """Negative control: randomness assigned by batch position (the old behaviour) moves the sum by more than C."""
    params, all_fns = aug_setup
    secret, aug = SecretSeed.from_int(1), Augmentation(K_COPIES, shift=2, flip=True)

    def by_position(x, indices, step):
        return aug(x, secret.augmentation_words(step, np.arange(len(indices)), K_COPIES))

    batch = np.arange(M) * 7
    full = _clipped_sum(all_fns["vmap"], params, digits, batch, by_position, 0)
    diff = jax.tree_util.tree_map(jnp.subtract, full,
                                  _clipped_sum(all_fns["vmap"], params, digits, batch[1:], by_position, 0))
    assert _norm(diff) > 1.5 * CLIP


# -- 4. checkpoint provenance --------------------------------------------------------------

def _fake_checkpoint(path, digits, lineage):
    model = build_model("cnn", digits.num_classes)
    params = jax.device_get(init_params(model, digits.image_shape, jax.random.key(3)))
    checkpoint.save(str(path), params, {"model": "cnn", "dataset": lineage[-1]["dataset"],
                                        "private": lineage[-1]["private"], "lineage": lineage})
    return str(path)


def test_public_checkpoint_trained_on_the_private_data_is_refused(tmp_path, digits):
    ck = _fake_checkpoint(tmp_path / "pre.msgpack", digits, [{"dataset": "digits", "private": False, "events": []}])
    p = _cli("train", "--dataset", "digits", "--init-checkpoint", ck, "--batch-size", "200", "--epochs", "1",
             "--save-checkpoint", str(tmp_path / "out.msgpack"), cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained without privacy on 'digits'" in lines[0] and "Traceback" not in p.stderr
    assert not (tmp_path / "out.msgpack").exists()
    # The same in a study file: nothing written.
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "ck", "dataset": "digits", "privacy": {"epsilon": 3.0, "delta": 1e-5}, "init_checkpoint": ck,
        "search_space": str(ROOT / "search_spaces" / "dpsgd_epochs.yaml")}))
    p = _cli("study", "create", "--config", str(study_file), "--storage", f"sqlite:///{tmp_path / 'ck.db'}",
             cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "ck.db").exists()
    # On other data it is public, and an explicit override accepts it (saying so in the statement).
    assert not checkpoint.prior_spend(ck, "mnist5k", private=True)
    assert not checkpoint.prior_spend(ck, "digits", private=True, unsafe_ignore=True)


def test_private_checkpoint_continued_on_its_data_composes(tmp_path, digits):
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=1.5)
    first = train_and_evaluate(digits, hp, 4, budget=PrivacyBudget(8.0, 1e-5, "rdp"), config=RunConfig(
        microbatch_size=64, save_checkpoint=str(tmp_path / "p1.msgpack")))
    second = train_and_evaluate(digits, hp, 5, budget=PrivacyBudget(8.0, 1e-5, "rdp"), config=RunConfig(
        microbatch_size=64, init_checkpoint=str(tmp_path / "p1.msgpack"), save_checkpoint=str(tmp_path / "p2.msgpack")))
    q = 200 / len(digits.train)
    event = lambda t: dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.5)), t)
    direct = RdpAccountant().compose(dp_event.ComposedDpEvent([event(4), event(5)])).get_epsilon(1e-5)
    assert second.epsilon == pytest.approx(RdpAccountant().compose(event(5)).get_epsilon(1e-5))
    assert second.total_epsilon == pytest.approx(direct, rel=1e-9)
    assert second.total_epsilon > max(first.epsilon, second.epsilon)
    assert "composes it with the initial checkpoint" in second.statement("digits", RunConfig(
        init_checkpoint="p1")).text()
    # The lineage carries both runs forward: a third continuation composes all three.
    assert checkpoint.prior_spend(str(tmp_path / "p2.msgpack"), "digits", private=True).events == (
        (q, 1.5, 4), (q, 1.5, 5))


def test_private_checkpoint_without_a_recorded_spend_is_refused(tmp_path, digits):
    ck = _fake_checkpoint(tmp_path / "old.msgpack", digits, [{"dataset": "digits", "private": True, "events": None}])
    with pytest.raises(checkpoint.CheckpointError, match="privacy spend was not recorded"):
        checkpoint.prior_spend(ck, "digits", private=True)


# -- a released model carries the whole search that selected it ------------------------------------------

def _rdp(events, delta=1e-5):
    return RdpAccountant().compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), int(t))
        for q, s, t in events])).get_epsilon(delta)


def _continue_from(model, digits, tmp_path):
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=1.5)
    return train_and_evaluate(digits, hp, 3, budget=PrivacyBudget(8.0, 1e-5, "rdp"), config=RunConfig(
        microbatch_size=64, init_checkpoint=model, save_checkpoint=str(tmp_path / "next.msgpack")))


@pytest.mark.slow
def test_continuing_from_a_released_model_composes_the_whole_search_that_chose_it(tmp_path, digits):
    from dptune.search import release

    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"batch_size": 300, "clip_norm": 1.0, "noise_multiplier": 2.0,
                                                         "effective_learning_rate": {"low": 0.5, "high": 4.0}}))
    cfg = {"name": "chosen", "dataset": "digits", "privacy": {"epsilon": 2.0, "delta": 1e-5},
           "pruner": {"name": "none"}, "budget": {"max_steps": 4, "max_epochs": None, "min_steps": 1},
           "microbatch_size": 128, "search_space": "space.yaml"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study.create_study(config.load_study(str(tmp_path / "s.yaml")), storage)
    s = study.optimize("chosen", storage, n_trials=3)
    searched = [(t.user_attrs["sampling_rate"], t.user_attrs["noise_multiplier"], t.user_attrs["steps"])
                for t in s.trials]
    # The copy kept in the study's store while the search runs does not know what the search will cost.
    (entry,) = release.best_models(s)
    stored = os.path.join(release.folder_of(s, storage), "artifacts", entry["artifact_id"])
    with pytest.raises(checkpoint.CheckpointError, match="while it ran"):
        checkpoint.prior_spend(stored, "digits", private=True)
    release.export_model(s, storage, str(tmp_path / "out"))
    run = _continue_from(str(tmp_path / "out" / release.MODEL_FILE), digits, tmp_path)
    own = (200 / len(digits.train), 1.5, run.steps)
    assert run.total_epsilon == pytest.approx(_rdp([*searched, own]), rel=1e-9)
    assert run.total_epsilon > _rdp([searched[0], own]) + 0.1  # what the trial's own lineage gave
    # ... and what is trained from it carries the search on.
    assert checkpoint.prior_spend(str(tmp_path / "next.msgpack"), "digits", private=True).events == (*searched, own)


@pytest.mark.parametrize("kind", ["filter", "private_search"])
def test_a_model_released_by_a_bounded_search_carries_the_bound(tmp_path, digits, kind):
    from optuna.trial import TrialState, create_trial

    from dptune.search import release

    attrs = {"delta": 1e-5, "dptune_config": {"study": {"dataset": "digits", "artifacts": {"keep": 1},
                                                        "validation_dataset": "mnist5k"}}}
    if kind == "filter":
        attrs.update(search_budget={"epsilon": 4.0, "order": 8.0}, epsilon_target=2.0)
    else:
        attrs["private_search"] = {"n_trials": 2, "distribution": "poisson", "mean_trials": 2, "eta": None,
                                   "sampling_rate": 0.1, "noise_multiplier": 2.0, "steps": 5,
                                   "per_trial_epsilon": 1.0, "total_epsilon": 4.0}
    run_attrs = {"sampling_rate": 0.1, "noise_multiplier": 2.0, "planned_steps": 5, "steps": 5, "touched_data": True,
                 "delta": 1e-5, "epsilon_spent": 1.0, "accountant": "rdp", "filter_request": [0.1, 2.0, 5]}
    storage = f"sqlite:///{tmp_path / 'b.db'}"
    st = optuna.create_study(direction="maximize", storage=storage, study_name="bounded")
    for k, v in attrs.items():
        st.set_user_attr(k, v)
    for value in (0.9, 0.1):
        st.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params={}, distributions={},
                                  user_attrs=run_attrs))
    model = build_model("cnn", digits.num_classes)
    params = jax.device_get(init_params(model, digits.image_shape, jax.random.key(3)))
    checkpoint.save(release.pending_path(release.folder_of(st, storage), 0), params, {
        "model": "cnn", "image_shape": list(digits.image_shape), "num_classes": digits.num_classes,
        "lineage": [{"dataset": "digits", "private": True, "events": [[0.1, 2.0, 5]]}]})
    assert release.keep_best(st, st.trials[0], storage) is not None
    release.export_model(st, storage, str(tmp_path / "out"))
    exported = str(tmp_path / "out" / release.MODEL_FILE)
    bound = results.search_guarantee(st)["total_epsilon"]
    assert checkpoint.prior_spend(exported, "digits", private=True).bounds == ((bound, 1e-5),)
    run = _continue_from(exported, digits, tmp_path)
    assert run.total_epsilon == pytest.approx(bound + run.epsilon) and run.total_delta == pytest.approx(2e-5)
    statement = run.statement("digits", RunConfig(init_checkpoint=exported)).text()
    assert f"{run.total_epsilon:.4g}" in statement and "basic composition" in statement
    # A study composes runs, not a bound: starting one from this model is refused before anything is written.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "next", "dataset": "digits", "privacy": {"epsilon": 3.0, "delta": 1e-5}, "init_checkpoint": exported,
        "search_space": str(ROOT / "search_spaces" / "dpsgd_epochs.yaml")}))
    p = _cli("study", "create", "--config", str(tmp_path / "c.yaml"), "--storage", f"sqlite:///{tmp_path / 'c.db'}",
             cwd=tmp_path)
    assert p.returncode == 2 and "bound" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "c.db").exists()


def test_the_storage_alone_does_not_hold_a_fixed_private_seed(tmp_path):
    import shutil
    import sqlite3

    from dptune.search import release

    cfg = {"name": "seeded", "dataset": "digits", "privacy": {"epsilon": 3.0, "delta": 1e-5},
           "private_seed": 918273645, "search_space": str(ROOT / "search_spaces" / "dpsgd_epochs.yaml")}
    storage = f"sqlite:///{tmp_path / 's.db'}"
    created = study.create_study(cfg, storage)
    with sqlite3.connect(tmp_path / "s.db") as db:
        dump = "\n".join(db.iterdump())
    assert "918273645" not in dump and created.user_attrs["dptune_config"]["study"]["private_seed"] is None
    seed_file = os.path.join(release.folder_of(created, storage), release.SEED_FILE)
    assert os.stat(seed_file).st_mode & 0o777 == 0o600
    # Workers that share the private folder read it back; the same file again is the same study.
    assert study.load("seeded", storage)[1].study.private_seed == 918273645
    assert study.create_study(cfg, storage, skip_if_exists=True).user_attrs == created.user_attrs
    with pytest.raises(study.StudyError, match="different configuration"):
        study.create_study({**cfg, "private_seed": 1}, storage, skip_if_exists=True)
    # A copy of the storage without the folder says where the seed is rather than training on another one.
    shutil.copy(tmp_path / "s.db", tmp_path / "copy.db")
    with pytest.raises(study.StudyError, match="private_seed: .*cannot be read here"):
        study.load("seeded", f"sqlite:///{tmp_path / 'copy.db'}")
    # A configured private folder holds it too.
    shared = {**cfg, "name": "shared", "artifacts": {"path": str(tmp_path / "private")}}
    study.create_study(shared, storage)
    assert study.load("shared", storage)[1].study.private_seed == 918273645


# -- 1 & 5. private search: K enforced in the storage, K and trial numbers kept out of the release ----

SPACE = {"batch_size": 400, "epochs": 1, "effective_learning_rate": {"low": 1.0, "high": 8.0, "log": True},
         "clip_norm": {"low": 0.5, "high": 2.0, "log": True}}


FIXED_STUDY_ID = "ab" * 16


def _private_study(tmp_path, k_wanted, monkeypatch, name="private"):
    """A private-search study file whose fixed private seed draws K = ``k_wanted`` (found by search) for studies
    created in this process, whose random id is fixed here (K is keyed on it)."""
    from dptune.search import release

    monkeypatch.setattr(release, "new_study_id", lambda: FIXED_STUDY_ID)
    count = TrialCount("geometric", 3)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    path = tmp_path / f"{name}.yaml"
    for seed in range(1000):
        cfg = {"name": name, "dataset": "digits", "validation_dataset": "mnist5k", "image_size": 8,
               "search_privacy": {"total_epsilon": 8.0, "delta": 1e-5,
                                  "trials": {"distribution": "geometric", "mean": 3}},
               "budget": {"max_epochs": 1, "min_steps": 1}, "private_seed": seed, "microbatch_size": 128,
               "search_space": "space.yaml"}
        path.write_text(yaml.safe_dump(cfg))
        secret = study.trial_count_secret(config.load_study(str(path)), FIXED_STUDY_ID)
        if count.sample(secret.sampler()) == k_wanted:
            return str(path)
    raise AssertionError(f"no seed below 1000 draws K = {k_wanted}")


@pytest.mark.slow
def test_two_pools_on_one_journal_study_run_exactly_k_trials(tmp_path, monkeypatch):
    storage = f"journal:///{tmp_path / 'shared.journal'}"
    path = _private_study(tmp_path, 4, monkeypatch)
    study.create_study(config.load_study(path), storage)  # here: its id (and so K) is the one fixed above
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "dptune.cli", "optimize", "--study-name", "private", "--storage", storage,
           "--n-trials", "4", "--workers", "2"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    s = optuna.load_study(study_name="private", storage=study.open_storage(storage))
    touched = [t for t in s.trials if results.touched_data(t)]
    assert len(touched) == 4 and sorted(t.number for t in touched) == [0, 1, 2, 3]
    g = results.search_guarantee(s)
    assert g["complete"] and g["valid"]


def test_more_than_k_trials_on_the_data_voids_the_bound(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    s = study.create_study(config.load_study(_private_study(tmp_path, 2, monkeypatch)), storage)
    plan = s.user_attrs["private_search"]
    dist = {"clip_norm": optuna.distributions.FloatDistribution(0.5, 2.0)}
    for _ in range(3):  # what two processes counting K each on their own used to do
        s.add_trial(optuna.trial.create_trial(
            params={"clip_norm": 1.0}, distributions=dist, value=0.5,
            user_attrs={"touched_data": True, "sampling_rate": plan["sampling_rate"],
                        "noise_multiplier": plan["noise_multiplier"], "steps": plan["steps"]}))
    g = results.search_guarantee(s)
    assert not g["valid"] and "EXCEEDED, INVALID" in g["guarantee"]
    direct = search_privacy.composed_epsilon([(plan["sampling_rate"], plan["noise_multiplier"], plan["steps"])] * 3,
                                             1e-5)["rdp"]
    assert g["total_epsilon"] == pytest.approx(direct)


def _walk_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _walk_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_keys(v)


@pytest.mark.slow
def test_private_search_release_shows_neither_k_nor_trial_numbers(tmp_path, monkeypatch, capsys):
    import dptune.cli as cli

    def run(*args):
        code = cli.main(list(args))
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out + out.err

    storage = f"sqlite:///{tmp_path / 's.db'}"
    path = _private_study(tmp_path, 3, monkeypatch)
    printed = [run("study", "create", "--config", path, "--storage", storage),
               run("optimize", "--study-name", "private", "--storage", storage, "--n-trials", "10")]
    s = optuna.load_study(study_name="private", storage=storage)
    assert len(s.trials) == 3  # K really was 3: the checks below are about a known value
    # One public initialisation for every trial: a seed that varied with the trial number would reveal it.
    assert {t.user_attrs["seed"] for t in s.trials} == {0}
    best_number = results.summarize(s).best["number"]
    forbidden = [re.compile(r"\bK[ \t]*=[ \t]*\d"), re.compile(r"\btrials?[ \t]+\d"),
                 re.compile(r"\b\d+[ \t]+trials?\b"), re.compile(r"\bof[ \t]+\d+\b"),
                 re.compile(r"best trial[ \t]+\d")]
    for args in (("study", "show", "private"), ("study", "best", "private")):
        printed.append(run(*args, "--storage", storage))
        keys = set(_walk_keys(json.loads(run(*args, "--storage", storage, "--json"))))
        assert not keys & {"number", "n_trials", "trials_drawn", "trials_run", "trials_touching_data",
                           "retry_of", "compile_seconds", "wall_seconds", "examples_per_second"}, keys
    assert "trial COMPLETE" not in printed[1]  # no line per trial: their count is K
    listed = json.loads(run("study", "list", "--storage", storage, "--json"))
    assert listed[0]["trials"] is None and 7.9 < listed[0]["epsilon_target"] <= 8.0  # the search total
    for out in printed:
        for pattern in forbidden:
            assert not pattern.search(out), (pattern.pattern, out)
    # --internal shows them (so the checks above can fail), labelled as internal.
    internal = run("study", "show", "private", "--storage", storage, "--internal")
    assert "INTERNAL" in internal and "3 trials" in internal and f"best trial {best_number}" in internal


def test_unseeded_random_sampler_draws_from_the_os():
    # What a private search uses: draws differ between samplers, the public seed plays no part.
    a = optuna.samplers.RandomSampler(seed=None)._rng.rng.random_sample()
    b = optuna.samplers.RandomSampler(seed=None)._rng.rng.random_sample()
    assert a != b


# -- 6. a separate public validation dataset ------------------------------------------------

def test_private_search_requires_a_separate_validation_dataset(tmp_path, monkeypatch):
    path = _private_study(tmp_path, 2, monkeypatch)
    data = yaml.safe_load(Path(path).read_text())
    for change, message in (({"validation_dataset": None}, "validation_dataset"),
                            ({"validation_dataset": "digits"}, "not the private"),
                            ({"validation_dataset": "mnist5k", "image_size": None}, "set image_size")):
        Path(path).write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(ConfigError, match=message):
            study.create_study(config.load_study(path), f"sqlite:///{tmp_path / 'v.db'}")
    assert not (tmp_path / "v.db").exists()
    Path(path).write_text(yaml.safe_dump(data))
    s = study.create_study(config.load_study(path), f"sqlite:///{tmp_path / 'v.db'}")
    statement = results.privacy_statement(s).text()
    assert "'mnist5k', treated as public" in statement


# -- 7 & 8. the written statement ---------------------------------------------------------

def test_privacy_epsilon_prints_a_statement(tmp_path):
    p = _cli("privacy", "epsilon", "--dataset-size", "60000", "--batch-size", "256", "--noise-multiplier", "1.1",
             "--epochs", "60", "--delta", "1e-5", "--statement", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for phrase in ("add-or-remove-one-example adjacency", "Poisson sampling", "training examples only",
                   "validation and test examples", "Treated as public", "Realised batch sizes are private",
                   "N = 60,000", "secret"):
        assert phrase in p.stdout, phrase
    js = _cli("privacy", "epsilon", "--dataset-size", "60000", "--batch-size", "256", "--noise-multiplier", "1.1",
              "--epochs", "60", "--delta", "1e-5", "--statement", "--json", cwd=tmp_path)
    assert json.loads(js.stdout)["results"][0]["epsilon"] == pytest.approx(2.38, abs=0.02)
    assert "add-or-remove" in json.loads(js.stdout)["statement"]


def test_realised_batch_sizes_stay_out_of_the_results(digits):
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    r = train_and_evaluate(digits, hp, 3, config=RunConfig(microbatch_size=64, private_seed=5),
                           budget=PrivacyBudget(8.0, 1e-5))
    assert r.examples_processed == 3 * 200  # expected count, not the Poisson realisation


# -- 9. a search budget enforced before each trial ---------------------------------------------

def test_filter_counts_requests_of_running_trials_before_they_are_admitted(tmp_path):
    """Two workers deciding at once: the later reader sees the earlier one's request and stays under the cap."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "batch_size": 400, "epochs": 2, "learning_rate": 1.0, "clip_norm": 1.0}))
    per_trial = 2.5  # one trial fits under the cap of 3 (at the filter's order), two do not
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({
        "name": "f", "dataset": "digits", "privacy": {"epsilon": per_trial, "delta": 1e-5, "accountant": "rdp"},
        "search_budget": {"epsilon": 3.0}, "budget": {"max_epochs": 2, "min_steps": 1},
        "search_space": "space.yaml"}))
    storage = f"sqlite:///{tmp_path / 'f.db'}"
    s = study.create_study(config.load_study(str(tmp_path / "f.yaml")), storage)
    cap = s.user_attrs["search_budget"]
    assert cap["order"] == pytest.approx(search_privacy.default_filter_order(3.0, 1e-5))
    resolved = study.load("f", storage)[1]
    obj = objective.Objective(resolved, dataset_of(resolved.study), 1e-5, None, cap)
    from dptune.search.space import plan_trial

    first, second = s.ask(), s.ask()
    plans = [plan_trial(t, resolved.space, 1258, obj.budget, resolved.study.budget) for t in (first, second)]
    # The first writes its request but has not decided yet; the second must count it.
    first.set_user_attr("filter_request", [plans[0].sampling_rate, plans[0].hparams.noise_multiplier, plans[0].steps])
    assert RenyiFilter(3.0, 1e-5, cap["order"]).admits([tuple(first.user_attrs["filter_request"])] * 1)
    assert "search_budget" in obj._admit(second, plans[1])
    assert s.trials[second.number].user_attrs["filter_admitted"] is False


@pytest.mark.slow
def test_search_budget_stops_the_search_before_the_cap(tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "batch_size": 400, "epochs": 1, "effective_learning_rate": {"low": 1.0, "high": 4.0}, "clip_norm": 1.0}))
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({
        "name": "f", "dataset": "digits", "privacy": {"epsilon": 1.0, "delta": 1e-5}, "search_budget": {"epsilon": 2.5},
        "budget": {"max_epochs": 1, "min_steps": 1}, "pruner": {"name": "none"}, "microbatch_size": 128,
        "search_space": "space.yaml"}))
    storage = f"sqlite:///{tmp_path / 'f.db'}"
    study.create_study(config.load_study(str(tmp_path / "f.yaml")), storage)
    s = study.optimize("f", storage, n_trials=20)
    admitted = [t for t in s.trials if t.user_attrs.get("filter_admitted")]
    refused = [t for t in s.trials if t.user_attrs.get("filter_admitted") is False]
    assert len(admitted) >= 2 and len(refused) == 1 and len(s.trials) == len(admitted) + 1
    cap = s.user_attrs["search_budget"]
    requests = [tuple(t.user_attrs["filter_request"]) for t in admitted]
    filt = RenyiFilter(2.5, 1e-5, cap["order"])
    assert filt.spent(requests) <= 2.5 < filt.spent(requests + [tuple(refused[0].user_attrs["filter_request"])])
    # The single-order figure is what dp-accounting gives at that order.
    acc = RdpAccountant(orders=[cap["order"]])
    acc.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sg)), t) for q, sg, t in requests]))
    assert filt.spent(requests) == pytest.approx(acc.get_epsilon(1e-5))
    g = results.search_guarantee(s)
    assert g["mode"] == "filter" and g["total_epsilon"] == 2.5 and "Pre-committed" in g["guarantee"]
    assert refused[0].user_attrs["epsilon_spent"] == 0.0 and not results.touched_data(refused[0])


def test_ordinary_total_says_it_is_an_accounting_not_a_precommitment(tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "o.yaml").write_text(yaml.safe_dump({
        "name": "o", "dataset": "digits", "privacy": {"epsilon": 2.0, "delta": 1e-5}, "search_space": "space.yaml"}))
    s = study.create_study(config.load_study(str(tmp_path / "o.yaml")), f"sqlite:///{tmp_path / 'o.db'}")
    text = results.privacy_statement(s).text()
    assert "an accounting of what ran, not a guarantee fixed in advance" in text
    assert "training examples only" in text


# -- smaller: C must be finite in private training ----------------------------------------------

def test_infinite_clip_norm_is_refused_in_private_mode(digits):
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=float("inf"), noise_multiplier=2.0)
    with pytest.raises(ConfigError, match="clip_norm: must be a finite number > 0 in private training"):
        train_and_evaluate(digits, hp, 2, config=RunConfig(microbatch_size=64), budget=PrivacyBudget(8.0, 1e-5))
    hp.validate(len(digits.train), private=False)  # the non-private baseline ignores C


@pytest.mark.parametrize("clip", [float("inf"), {"low": 0.5, "high": float("inf")}, 0.0])
def test_infinite_clip_norm_is_refused_at_study_create(tmp_path, clip):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**SPACE, "clip_norm": clip}))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "c", "dataset": "digits", "privacy": {"epsilon": 2.0}, "search_space": "space.yaml"}))
    with pytest.raises(ConfigError, match="clip_norm: must be a finite number > 0"):
        config.load_study(str(tmp_path / "c.yaml"))


# -- from the independent review ---------------------------------------------------------

def test_a_checkpoint_replaced_after_create_is_refused_before_touching_data(tmp_path, digits):
    ck = _fake_checkpoint(tmp_path / "pub.msgpack", digits, [{"dataset": "mnist5k", "private": False, "events": []}])
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "c", "dataset": "digits", "privacy": {"epsilon": 2.0, "delta": 1e-5}, "init_checkpoint": ck,
        "budget": {"max_epochs": 1, "min_steps": 1}, "microbatch_size": 128, "search_space": "space.yaml"}))
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    study.create_study(config.load_study(str(tmp_path / "c.yaml")), storage)
    # Re-written with more (private) training on the same data after the study recorded its spend.
    _fake_checkpoint(tmp_path / "pub.msgpack", digits, [{"dataset": "digits", "private": True,
                                                          "events": [[0.1, 1.0, 500]]}])
    with pytest.raises(study.StudyError, match="changed since the study was created"):
        study.optimize("c", storage, n_trials=1)
    t = optuna.load_study(study_name="c", storage=storage).trials[0]
    assert t.state == optuna.trial.TrialState.FAIL and not results.touched_data(t)


def test_a_queued_retry_is_not_counted_before_it_runs_and_private_search_does_not_retry(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'r.db'}"
    s = study.create_study(config.load_study(_private_study(tmp_path, 1, monkeypatch)), storage)
    plan = s.user_attrs["private_search"]
    attrs = {"touched_data": True, "sampling_rate": plan["sampling_rate"], "noise_multiplier": plan["noise_multiplier"],
             "steps": plan["steps"]}
    s.add_trial(optuna.trial.create_trial(params={"clip_norm": 1.0}, value=0.5, user_attrs=attrs,
                                          distributions={"clip_norm": optuna.distributions.FloatDistribution(0.5, 2)}))
    # What Optuna's retry callback does: a WAITING copy with every attribute of its parent.
    s.enqueue_trial({"clip_norm": 1.0}, user_attrs=attrs)
    assert results.search_guarantee(s)["valid"]
    loaded, resolved = study.load("private", storage, heartbeat=True)
    # A stale trial fails but is never re-queued in a private search.
    loaded._storage._backend.heartbeat_stale_trial_callback(loaded, loaded.trials[0])
    assert len(loaded.trials) == 2
    obj = objective.Objective(resolved, dataset_of(resolved.study), 1e-5, plan)
    loaded.optimize(obj, n_trials=1)  # the copy is number 1 ≥ K: skipped, and it touched nothing
    copy = loaded.trials[1]
    assert "skipped_reason" in copy.user_attrs and copy.user_attrs["touched_data"] is False
    assert results.search_guarantee(loaded)["valid"]


def _ordinary(tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    (tmp_path / "o.yaml").write_text(yaml.safe_dump({
        "name": "o", "dataset": "digits", "privacy": {"epsilon": 2.0, "delta": 1e-5}, "search_space": "space.yaml"}))
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study.create_study(config.load_study(str(tmp_path / "o.yaml")), storage)
    return storage


def test_private_search_calibrates_with_a_private_checkpoints_spend(tmp_path, monkeypatch, digits):
    prior = [[0.1, 2.0, 100]]
    ck = _fake_checkpoint(tmp_path / "priv.msgpack", digits, [{"dataset": "digits", "private": True, "events": prior}])
    path = _private_study(tmp_path, 2, monkeypatch)
    data = yaml.safe_load(Path(path).read_text())
    without = study.create_study(config.load_study(path), f"sqlite:///{tmp_path / 'a.db'}")
    Path(path).write_text(yaml.safe_dump({**data, "init_checkpoint": ck}))
    with_prior = study.create_study(config.load_study(path), f"sqlite:///{tmp_path / 'b.db'}")
    a, b = without.user_attrs["private_search"], with_prior.user_attrs["private_search"]
    assert b["noise_multiplier"] > a["noise_multiplier"] and b["total_epsilon"] <= 8.0
    direct = search_privacy.search_epsilon(b["sampling_rate"], b["noise_multiplier"], b["steps"], 1e-5,
                                           TrialCount("geometric", 3), [(0.1, 2.0, 100)])
    assert b["total_epsilon"] == pytest.approx(direct) and results.search_guarantee(with_prior)["total_epsilon"] == \
        pytest.approx(direct)


def test_lineage_survives_losing_the_sidecar_and_tfds_versions(tmp_path, digits):
    ck = _fake_checkpoint(tmp_path / "pre.msgpack", digits, [{"dataset": "tfds:mnist:3.0.1", "private": False,
                                                               "events": []}])
    os.remove(ck + ".json")
    with pytest.raises(checkpoint.CheckpointError, match="trained without privacy"):
        checkpoint.prior_spend(ck, "tfds:mnist", private=True)
    assert checkpoint.dataset_identity("tfds:cifar10/plain:3.0.2") == checkpoint.dataset_identity("tfds:cifar10")


def test_optimize_refuses_data_that_changed_since_create(tmp_path):
    storage = _ordinary(tmp_path)
    s = optuna.load_study(study_name="o", storage=storage)
    s.set_user_attr("split", {**s.user_attrs["split"], "train": 999})
    with pytest.raises(study.StudyError, match="is not what it was when the study was created"):
        study.optimize("o", storage, n_trials=1)
    assert not optuna.load_study(study_name="o", storage=storage).trials


# -- review of the lineage and fixed-seed changes: what a run identity must hold -------------------------------

def _identity_secret(dataset, config, hp=None):
    from dptune.trainer import train as trainer

    hp = hp or Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    devices = tuple(jax.local_devices()[:1])
    settings = trainer._public_settings(dataset, hp, 3, config, PrivacyBudget(8.0, 1e-5), devices)
    return trainer.run_secret(config, settings).bits


def test_a_fixed_seed_keys_every_setting_that_can_move_a_parameter_and_user_code(digits, tmp_path, monkeypatch):
    import dataclasses

    base = RunConfig(private_seed=3, microbatch_size=64)
    # Engines, microbatches and normalisation agree at most up to rounding (frozen layers may even count
    # differently in an engine's norms): sharing noise would leave a noise-free difference.
    variants = [dataclasses.replace(base, clipping=c) for c in ("vmap", "bookkeeping", "auto", "normalize")]
    variants += [dataclasses.replace(base, microbatch_size=32), dataclasses.replace(base, feed="resident")]
    secrets = [_identity_secret(digits, v) for v in variants]
    assert len(set(secrets)) == len(secrets)
    # What cannot move a parameter leaves the run as it is: the same command replays itself.
    assert _identity_secret(digits, dataclasses.replace(base, eval_every=7, save_checkpoint="x")) == \
        _identity_secret(digits, base)
    # A user's model is its code: an edit of its folder's files is another run.
    module = tmp_path / "seeded_user_model.py"
    module.write_text("from dptune.models.builtin import build_model\n"
                      "def make(num_classes, **_):\n    return build_model('cnn', num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user = RunConfig(private_seed=3, microbatch_size=64, model="seeded_user_model:make")
    before = _identity_secret(digits, user)
    module.write_text(module.read_text() + "# edited\n")
    assert _identity_secret(digits, user) != before


def test_a_fixed_secret_handed_in_is_keyed_on_the_run_too(digits):
    # A study hands each trial a fixed secret keyed on the study's id and the trial's number; two copies of one
    # storage running that trial with other settings must not share its batches and noise.
    import dataclasses

    handed = SecretSeed.from_int(3).child("study s 0123 trial 4")
    base = RunConfig(secret=handed, microbatch_size=64)
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    other = dataclasses.replace(hp, clip_norm=2.0)
    assert _identity_secret(digits, base, hp) != _identity_secret(digits, base, other)
    assert _identity_secret(digits, base, hp) == _identity_secret(digits, base, hp) != handed.bits
    # A secret from the OS is the run's own already: it is used as it is.
    fresh = SecretSeed.from_os()
    assert _identity_secret(digits, dataclasses.replace(base, secret=fresh)) == fresh.bits


def test_a_fixed_seed_on_record_data_is_refused_before_anything_trains(tmp_path):
    from dptune.data import pipeline

    images = np.zeros((60, 8, 8, 1), np.uint8)
    for split, n in (("train", 40), ("test", 20)):
        pipeline.write_arrayrecord(str(tmp_path / "r"), split, images[:n], np.arange(n) % 10, num_classes=10,
                                   image_format="png")
    data = load_dataset("arrayrecord:" + str(tmp_path / "r"), validation_fraction=0.25)
    hp = Hyperparams(batch_size=10, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    with pytest.raises(ConfigError, match="private_seed: a fixed seed needs data whose content"):
        train_and_evaluate(data, hp, 2, config=RunConfig(private_seed=3, microbatch_size=10),
                           budget=PrivacyBudget(8.0, 1e-5))


def test_a_trials_own_checkpoint_is_a_candidate_not_a_release(digits, tmp_path):
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    pending = str(tmp_path / "trial-0.msgpack")
    train_and_evaluate(digits, hp, 2, budget=PrivacyBudget(8.0, 1e-5),
                       config=RunConfig(microbatch_size=64, save_checkpoint=pending, search="s"))
    with pytest.raises(checkpoint.CheckpointError, match="while it ran"):
        checkpoint.prior_spend(pending, "digits", private=True)


def test_a_private_search_reports_no_event_per_trial(tmp_path, monkeypatch):
    events = []
    storage = f"sqlite:///{tmp_path / 'p.db'}"
    study.create_study(config.load_study(_private_study(tmp_path, 2, monkeypatch)), storage)
    study.optimize("private", storage, n_trials=5, progress=events.append)
    assert len(optuna.load_study(study_name="private", storage=storage).trials) == 2
    assert events == []  # no event per trial: their number and timing would tell K


def test_a_fixed_seed_never_runs_two_audits_alike(digits):
    from dptune.search.audit import _audit_secret

    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    cfg = RunConfig(private_seed=3, microbatch_size=64)
    one = _audit_secret(cfg, digits, hp, 3, "white-box", 100, 0).bits
    assert one == _audit_secret(cfg, digits, hp, 3, "white-box", 100, 0).bits  # the same audit replays
    assert one != _audit_secret(cfg, digits, hp, 3, "white-box", 200, 0).bits
    assert one != _audit_secret(cfg, digits, hp, 4, "white-box", 100, 0).bits


def test_one_sqlite_lock_whatever_the_name_of_the_file(tmp_path):
    from dptune.search import storage as storage_lib
    from tests.test_study import holding_the_lock

    (tmp_path / "lk.db").write_bytes(b"")
    os.symlink(tmp_path / "lk.db", tmp_path / "link.db")
    with holding_the_lock(tmp_path / "lk.db"):
        for name in ("lk.db", "link.db"):
            with pytest.raises(storage_lib.StorageError, match="another dptune process"):
                with storage_lib.one_process(f"sqlite:///{tmp_path / name}"):
                    pass
    with storage_lib.one_process(f"sqlite:///{tmp_path / 'link.db'}"):  # free again once it has gone
        # ... and one run of trials in this process at a time too (a thread, a nested call).
        with pytest.raises(storage_lib.StorageError, match="another dptune process"):
            with storage_lib.one_process(f"sqlite:///{tmp_path / 'lk.db'}"):
                pass
    with storage_lib.one_process(f"sqlite:///{tmp_path / 'lk.db'}"):  # released whole by the one that held it
        pass
