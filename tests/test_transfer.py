"""Transfer learning and the accuracy techniques: checkpoints, frozen layers, augmentation multiplicity, EMA.

Each DP-relevant claim is tested as a property: frozen layers neither count
toward the clipped norm nor move; K augmented copies averaged before clipping
keep every example's contribution ≤ C; both clipping paths agree.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dptune.data.augment import Augmentation
from dptune.data.datasets import load_dataset
from dptune.models import checkpoint, freezing
from dptune.models.builtin import build_model, init_params
from dptune.randomness import SecretSeed
from dptune.trainer.dp_step import clipped_sum, step_functions
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate, train_step
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _tree_equal(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=False)
    )


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(t)) for t in jax.tree_util.tree_leaves(tree))))


# -- checkpoints -------------------------------------------------------------------


def test_checkpoint_round_trip_and_foreign_formats(tmp_path):
    from flax import serialization

    model = build_model("cnn", 10)
    params = init_params(model, (8, 8, 1), jax.random.key(3))
    path = str(tmp_path / "c.msgpack")
    checkpoint.save(path, params, {"model": "cnn"})
    assert _tree_equal(checkpoint.fit(init_params(model, (8, 8, 1), jax.random.key(0)), checkpoint.load(path)), params)
    assert checkpoint.metadata(path)["model"] == "cnn"
    # A bare tree written by flax.serialization, and an Orbax checkpoint directory.
    bare = tmp_path / "bare.msgpack"
    bare.write_bytes(serialization.to_bytes(params))
    assert _tree_equal(checkpoint.load(str(bare)), params)
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(str(tmp_path / "orbax"), {"params": params})
    assert _tree_equal(checkpoint.load(str(tmp_path / "orbax")), params)


def test_mismatched_checkpoint_names_the_layers(tmp_path):
    ten = init_params(build_model("cnn", 10), (8, 8, 1), jax.random.key(0))
    five = init_params(build_model("cnn", 5), (8, 8, 1), jax.random.key(0))
    path = str(tmp_path / "ten.msgpack")
    checkpoint.save(path, ten, {})
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.fit(five, checkpoint.load(path))
    assert "Dense_1/kernel: checkpoint (64, 10) vs model (64, 5)" in str(e.value)
    assert "Dense_1/bias" in str(e.value) and "Conv_0" not in str(e.value)
    fitted = checkpoint.fit(five, checkpoint.load(path), reinitialize=["Dense_1"])
    assert np.array_equal(fitted["Conv_0"]["kernel"], ten["Conv_0"]["kernel"])
    assert np.array_equal(fitted["Dense_1"]["kernel"], five["Dense_1"]["kernel"])
    with pytest.raises(checkpoint.CheckpointError, match="no module"):
        checkpoint.fit(five, checkpoint.load(path), reinitialize=["Head"])
    (tmp_path / "junk").write_bytes(b"\x00not msgpack")
    with pytest.raises(checkpoint.CheckpointError, match="not a Flax msgpack"):
        checkpoint.load(str(tmp_path / "junk"))


# -- frozen layers -----------------------------------------------------------------


def test_blocks_and_trainable_specs():
    params = init_params(build_model("cnn", 10), (8, 8, 1), jax.random.key(0))
    assert freezing.blocks(params) == [["Conv_0", "GroupNorm_0"], ["Conv_1", "GroupNorm_1"], ["Dense_0"], ["Dense_1"]]
    assert freezing.trainable_modules(params, "head") == ["Dense_1"]
    assert freezing.trainable_modules(params, "last_3") == ["Conv_1", "GroupNorm_1", "Dense_0", "Dense_1"]
    assert len(freezing.trainable_modules(params, "last_99")) == 6
    with pytest.raises(freezing.ConfigError, match="trainable"):
        freezing.trainable_modules(params, "first_2")


@pytest.mark.parametrize("clipping", ["bookkeeping", "vmap"])
def test_frozen_layers_do_not_move_and_do_not_count_toward_the_clip(digits, clipping):
    model = build_model("cnn", digits.num_classes)
    params = init_params(model, digits.image_shape, jax.random.key(0))
    fns = step_functions(model, "momentum", 32, tuple(jax.local_devices()[:1]), clipping)
    mask = freezing.trainable_mask(params, "last_2")
    x, y = digits.train.take(np.arange(32))
    batch = fns.shard_batch(x, y, np.ones(32, np.float32))
    clip = 0.05
    acc = fns.accumulate(params, fns.zeros_like(params), *batch, clip, mask)
    for name in ("Conv_0", "GroupNorm_0", "Conv_1", "GroupNorm_1"):
        assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree_util.tree_leaves(acc[name]))

    # Reference: clip each example's gradient of the trainable layers only.
    def loss(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xi[None])[0], yi)

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    trainable_only = {k: per_example[k] for k in ("Dense_0", "Dense_1")}
    expected = clipped_sum(trainable_only, jnp.ones(32), clip)
    for k in expected:
        for a, b in zip(jax.tree_util.tree_leaves(expected[k]), jax.tree_util.tree_leaves(acc[k]), strict=False):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)

    hp = Hyperparams(batch_size=32, learning_rate=0.5, clip_norm=clip, noise_multiplier=3.0, trainable="last_2")
    state = train_step(
        fns,
        fns.init_state(params),
        digits,
        np.arange(32),
        jax.random.key(0),
        0,
        hp,
        32.0,
        clip,
        3.0,
        0.5,
        trainable=mask,
    )
    for name in params:
        moved = not _tree_equal(state.params[name], params[name])
        assert moved == (name in ("Dense_0", "Dense_1")), name


def test_trials_freezing_other_layers_compile_nothing(digits):
    cfg = RunConfig(private_seed=0, microbatch_size=64, eval_every=3)
    budget = PrivacyBudget(8.0, 1e-5)
    hp = dict(batch_size=100, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    train_and_evaluate(digits, Hyperparams(**hp, trainable="all"), 3, config=cfg, budget=budget)
    fns = step_functions(build_model("cnn", digits.num_classes), "momentum", 64, tuple(jax.local_devices()))
    traces = dict(fns.traces)
    r = train_and_evaluate(digits, Hyperparams(**hp, trainable="head"), 3, config=cfg, budget=budget)
    assert dict(fns.traces) == traces
    assert r.trainable_modules == ["Dense_1"]


# -- augmentation multiplicity -----------------------------------------------------


def test_augmentation_makes_consecutive_shifted_copies():
    images = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6, 1)
    out = Augmentation(3, shift=1)(images, SecretSeed.from_int(0).augmentation_words(0, np.arange(2), 3))
    assert out.shape == (6, 6, 6, 1)
    for i in range(2):
        for c in out[3 * i : 3 * i + 3]:
            # Each copy is example i moved by at most one pixel (edge-padded).
            assert any(
                np.array_equal(c[1:-1, 1:-1], images[i][1 + dy : 5 + dy, 1 + dx : 5 + dx])
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
            )
    assert np.array_equal(
        Augmentation(1)(images, SecretSeed.from_int(0).augmentation_words(0, np.arange(2), 1)), images
    )
    with pytest.raises(freezing.ConfigError, match="multiplicity"):
        Augmentation(0)


def test_augmentation_multiplicity_keeps_the_sensitivity(digits):
    """Copies are averaged before clipping: one example, however many copies, moves the sum by ≤ C."""
    model = build_model("cnn", digits.num_classes)
    params = init_params(model, digits.image_shape, jax.random.key(0))
    k, m, clip = 4, 8, 0.1
    x, y = digits.train.take(np.arange(m))
    xk = Augmentation(k, shift=1)(x, SecretSeed.from_int(0).augmentation_words(0, np.arange(m), k))
    sums = {}
    for clipping in ("bookkeeping", "vmap"):
        fns = step_functions(model, "sgd", m, tuple(jax.local_devices()[:1]), clipping)
        run = lambda mask, fns=fns: fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(xk, y, mask), clip)
        full = run(np.ones(m, np.float32))
        sums[clipping] = full
        for i in range(m):
            mask = np.ones(m, np.float32)
            mask[i] = 0
            assert _norm(jax.tree_util.tree_map(jnp.subtract, full, run(mask))) <= clip * (1 + 1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(sums["vmap"]), jax.tree_util.tree_leaves(sums["bookkeeping"]), strict=False
    ):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)

    # The clipped quantity is the mean of the copies' gradients (unclipped check, C = ∞).
    def loss(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xi[None])[0], yi)

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xk, np.repeat(y, k))
    mean = jax.tree_util.tree_map(lambda g: g.reshape(m, k, *g.shape[1:]).mean(1).sum(0), grads)
    fns = step_functions(model, "sgd", m, tuple(jax.local_devices()[:1]), "bookkeeping")
    got = fns.accumulate(params, fns.zeros_like(params), *fns.shard_batch(xk, y, np.ones(m, np.float32)), np.inf)
    for a, b in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(got), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# -- parameter averaging -----------------------------------------------------------


def test_ema_is_evaluated_beside_raw_and_the_better_is_selected(digits):
    hp = Hyperparams(batch_size=200, learning_rate=1.0, clip_norm=1.0, noise_multiplier=1.0, ema_decay=0.9)
    r = train_and_evaluate(
        digits,
        hp,
        12,
        config=RunConfig(private_seed=0, microbatch_size=64, eval_every=4),
        budget=PrivacyBudget(8.0, 1e-5),
    )
    assert r.ema_val_accuracy is not None and all("ema_val_accuracy" in h for h in r.history)
    assert r.selected == ("ema" if r.ema_val_accuracy > r.val_accuracy else "raw")
    assert r.selected_val_accuracy == max(r.val_accuracy, r.ema_val_accuracy)
    assert r.selected_test_accuracy == (r.ema_test_accuracy if r.selected == "ema" else r.test_accuracy)


# -- the public-pretrain → private-fine-tune path, through the CLI -----------------


def _cli(*args, cwd):
    return run_cli(*args, cwd=cwd)


def test_pretrain_then_private_fine_tune_offline(tmp_path):
    p = _cli("pretrain", "--dataset", "digits", "--output", "pre.msgpack", cwd=tmp_path)
    assert p.returncode == 2 and "--declare-public" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pre.msgpack").exists()
    # Public data that is not the private data: mnist5k resized to digits' 8×8.
    p = _cli(
        "pretrain",
        "--dataset",
        "mnist5k",
        "--image-size",
        "8",
        "--declare-public",
        "--batch-size",
        "256",
        "--epochs",
        "1",
        "--learning-rate",
        "0.1",
        "--microbatch-size",
        "128",
        "--output",
        "pre.msgpack",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / "pre.msgpack.json").read_text())
    assert meta["dataset"] == "mnist5k" and meta["private"] is False

    study = tmp_path / "ft.yaml"
    (tmp_path / "space.yaml").write_text(
        "{batch_size: 400, learning_rate: 1.0, clip_norm: 1.0, epochs: 2, "
        "ema_decay: 0.5, trainable: {choices: [head, all]}}\n"
    )
    base = (
        "dataset: digits\nmodel: cnn\nprivacy: {epsilon: 4, delta: 1.0e-5}\nbudget: {max_epochs: 2}\n"
        f"microbatch_size: 128\naugmentation: {{multiplicity: 2, shift: 1}}\nsearch_space: {tmp_path}/space.yaml\n"
        "storage: sqlite:///s.db\n"
    )
    study.write_text(f"name: ft\ninit_checkpoint: pre.msgpack\n{base}")
    assert _cli("study", "create", "--config", str(study), cwd=tmp_path).returncode == 0
    p = _cli(
        "optimize",
        "--study-name",
        "ft",
        "--storage",
        "sqlite:///s.db",
        "--n-trials",
        "1",
        "--workers",
        "1",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    trial = json.loads(_cli("study", "show", "ft", "--storage", "sqlite:///s.db", "--json", cwd=tmp_path).stdout)[
        "best"
    ]
    assert trial["epsilon_spent"] <= 4 and trial["augmentation_multiplicity"] == 2
    assert trial["selected_parameters"] in ("raw", "ema") and trial["trainable_modules"]

    # A checkpoint for another class count: one line naming the layers, nothing written.
    model5 = build_model("cnn", 5)
    checkpoint.save(str(tmp_path / "five.msgpack"), init_params(model5, (8, 8, 1), jax.random.key(0)), {})
    study.write_text(f"name: bad\ninit_checkpoint: five.msgpack\n{base}")
    p = _cli("study", "create", "--config", str(study), cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "checkpoint" in p.stderr and "Dense_1/kernel: checkpoint (64, 5) vs model (64, 10)" in p.stderr
    listed = _cli("study", "list", "--storage", "sqlite:///s.db", "--json", cwd=tmp_path).stdout
    assert "bad" not in [s["name"] for s in json.loads(listed)]


def test_non_private_study_records_no_privacy(tmp_path):
    (tmp_path / "space.yaml").write_text("{batch_size: 256, learning_rate: 0.1, clip_norm: 1.0, epochs: 2}\n")
    (tmp_path / "np.yaml").write_text(
        "name: np\ndataset: digits\nnon_private: true\nbudget: {max_epochs: 2}\nmicrobatch_size: 128\n"
        f"search_space: {tmp_path}/space.yaml\nstorage: sqlite:///np.db\n"
    )
    assert _cli("study", "create", "--config", "np.yaml", cwd=tmp_path).returncode == 0
    assert (
        _cli(
            "optimize",
            "--study-name",
            "np",
            "--storage",
            "sqlite:///np.db",
            "--n-trials",
            "1",
            "--workers",
            "1",
            cwd=tmp_path,
        ).returncode
        == 0
    )
    show = json.loads(_cli("study", "show", "np", "--storage", "sqlite:///np.db", "--json", cwd=tmp_path).stdout)
    assert show["complete"] == 1 and show["best"]["epsilon_spent"] is None
    assert show["search"]["mode"] == "non_private"
