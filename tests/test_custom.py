"""Bring your own model, data and loss: import paths, checks at create, the examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dptune
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent

USER_MODULE = textwrap.dedent('''
    import flax.linen as nn
    import numpy as np

    class Mixer(nn.Module):  # stateless, but each output sees the batch mean: mixes examples
        num_classes: int
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(self.num_classes)(x - x.mean(axis=0, keepdims=True))

    class LargeBatchMixer(nn.Module):  # mixes only in batches larger than 8
        num_classes: int
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(self.num_classes)(x - x.mean(axis=0, keepdims=True) if x.shape[0] > 8 else x)

    class FaintMixer(nn.Module):  # mixes at a 1e-7 scale
        num_classes: int
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(self.num_classes)(x + 1e-7 * x.mean(axis=0, keepdims=True))

    class WithBatchNorm(nn.Module):
        num_classes: int
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=False)(x.reshape(x.shape[0], -1))
            return nn.Dense(self.num_classes)(x)

    class Fine(nn.Module):
        num_classes: int
        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

    def mixer(num_classes, **_): return Mixer(num_classes)
    def large_batch_mixer(num_classes, **_): return LargeBatchMixer(num_classes)
    def faint_mixer(num_classes, **_): return FaintMixer(num_classes)
    def batchnorm(num_classes, **_): return WithBatchNorm(num_classes)
    def fine(num_classes, **_): return Fine(num_classes)
    def broken(num_classes, **_): raise RuntimeError("no GPU here")

    def tabular():
        rng = np.random.default_rng(0)
        return rng.standard_normal((300, 5)).astype(np.float32), rng.integers(0, 3, 300)
    def mismatched():
        return np.zeros((10, 5), np.float32), np.zeros(9, np.int64)
    def float_labels():
        return np.zeros((10, 5), np.float32), np.zeros(10, np.float32)
''')


def _study_file(folder: Path, **settings) -> str:
    import yaml

    (folder / "usermod.py").write_text(USER_MODULE)
    (folder / "space.yaml").write_text("batch_size: 64\nlearning_rate: 0.1\nclip_norm: 1.0\nepochs: 1\n")
    cfg = {"name": "own", "dataset": "usermod:tabular", "model": "usermod:fine", "privacy": {"epsilon": 2.0},
           "microbatch_size": 32, "search_space": "space.yaml", **settings}
    (folder / "own.yaml").write_text(yaml.safe_dump(cfg))
    return "own.yaml"


@pytest.mark.parametrize("settings, field", [
    ({"model": "usermod:mixer"}, "the model mixes examples"),
    ({"model": "usermod:large_batch_mixer"}, "the model mixes examples at batch 32"),
    ({"model": "usermod:faint_mixer"}, "the model mixes examples"),
    ({"model": "usermod:batchnorm"}, "model: has state besides parameters"),
    ({"model": "usermod:nope"}, "model: 'usermod' has no 'nope'"),
    ({"model": "nomodule:make"}, "model: cannot import 'nomodule'"),
    ({"model": "usermod:broken"}, "model: 'usermod:broken' raised RuntimeError: no GPU here"),
    ({"dataset": "usermod:mismatched"}, "dataset train: x has 10 examples but y has shape (9,)"),
    ({"dataset": "usermod:float_labels"}, "dataset train: labels must be integer class ids"),
    ({"loss": "usermod:nope"}, "loss: 'usermod' has no 'nope'"),
    # A dataset's prefix as code would be built as the user's model yet escape the user-code rules.
    ({"model": "arrayrecord:fine"}, "model: 'arrayrecord:fine' names a dataset"),
    ({"loss": "tfds:focal"}, "loss: 'tfds:focal' names a dataset"),
])
def test_a_bad_model_or_data_is_refused_at_create_in_one_line_and_nothing_is_written(tmp_path, settings, field):
    path = _study_file(tmp_path, **settings)
    out = run_cli("study", "create", "--config", path, "--storage", "sqlite:///own.db", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], lines
    assert not (tmp_path / "own.db").exists()


def test_user_arrays_any_dtype_and_the_split_that_is_private(tmp_path):
    from dptune.data.custom import from_arrays

    x = np.arange(200 * 3, dtype=np.int64).reshape(200, 3) % 17
    y = np.arange(200) % 4
    data = from_arrays("tokens", (x, y), seed=1)
    assert data.input_dtype == "int32" and data.num_classes == 4 and not data.pixels
    assert len(data.train) + len(data.validation) + len(data.test) == 200 and data.split.train == len(data.train)
    xs, _ = data.train.take(np.arange(3))
    assert xs.dtype == np.int32  # ids reach the model as ids (no pixel normalisation)
    given = from_arrays("given", {"train": (x[:150], y[:150]), "validation": (x[150:], y[150:]), "num_classes": 5})
    assert len(given.train) + len(given.test) == 150 and len(given.validation) == 50 and given.num_classes == 5
    with pytest.raises(dptune.ConfigError, match="dataset num_classes"):
        from_arrays("few", {"train": (x, y), "num_classes": 3})
    # What would wrap to a negative int32 on the device, and inputs no model learns from, are refused.
    with pytest.raises(dptune.ConfigError, match="labels must be below 2\\^31"):
        from_arrays("wide", (x, y + 2**31))
    with pytest.raises(dptune.ConfigError, match="must fit in int32"):
        from_arrays("ids", (x + 2**31, y))
    with pytest.raises(dptune.ConfigError, match="NaN or infinite"):
        from_arrays("nan", (np.where(x == 3, np.nan, x.astype(np.float64)), y))
    # A single run takes arrays directly; an augmentation needs images.
    with pytest.raises(dptune.ConfigError, match="augmentation"):
        dptune.train(
            {"augmentation": {"multiplicity": 2}, "microbatch_size": 32, "model": "examples.tabular_mlp:make_mlp"},
            dataset=(np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32), y[:100] % 2),
            hyperparameters={"batch_size": 32, "epochs": 1},
        )


def _examples_models():
    from examples import tabular_mlp, token_transformer, vit
    from tests.fastclip_models import TiedLM  # a model whose embedding is also its output layer

    rng = np.random.default_rng(0)
    return {
        "tabular_mlp": (tabular_mlp.make_mlp(10, width=16), rng.standard_normal((6, 64)).astype(np.float32)),
        "vit": (
            vit.make_vit(10, patch=7, dim=16, depth=1, heads=2),
            rng.standard_normal((6, 28, 28, 1)).astype(np.float32),
        ),
        "token_transformer": (
            token_transformer.make_transformer(10, (12,), dim=16),
            rng.integers(0, token_transformer.VOCAB, (6, 12)).astype(np.int32),
        ),
        "tied": (TiedLM(), rng.integers(0, 10, (6, 5)).astype(np.int32)),
    }


@pytest.mark.parametrize("name", ["tabular_mlp", "vit", "token_transformer", "tied"])
def test_the_examples_models_take_the_fast_path_and_equal_the_vmap_reference(name):
    from dptune.trainer.clipping import clipped_sum

    model, x = _examples_models()[name]
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    y = jnp.arange(len(x)) % 5
    mask = jnp.ones(len(x)).at[-1].set(0.0)
    fast = clipped_sum(model, params, jnp.asarray(x), y, mask, 0.5, path="fast")
    ref = clipped_sum(model, params, jnp.asarray(x), y, mask, 0.5, path="vmap")
    assert fast.reason is None and "vmap" not in dict(fast.rules).values()
    # Relative to the sum's scale: some leaves are exactly zero in exact arithmetic (attention's key bias) and
    # hold only rounding noise on either path.
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree_util.tree_leaves(ref.grads))
    for a, b in zip(jax.tree_util.tree_leaves(fast.grads), jax.tree_util.tree_leaves(ref.grads), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale


@pytest.mark.slow
@pytest.mark.parametrize("example", ["tabular_mlp", "token_transformer"])
def test_the_python_examples_run(tmp_path, example):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", f"examples.{example}", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ε of releasing it after the search" in out.stdout and "clipping: fast" in out.stdout
    study = dptune.load_study(example, f"sqlite:///{tmp_path / (example + '.db')}")
    best = dptune.summarize(study).best
    assert set(best["clipping_rules"].values()) <= {"dense", "norm_affine", "embed", "layer_vjp", "conv", "tied"}


@pytest.mark.slow
def test_the_vit_study_file_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    storage = f"sqlite:///{tmp_path / 'vit.db'}"
    study = dptune.create_study(
        "examples/vit_mnist5k.yaml",
        storage,
        overrides={"budget.max_epochs": 0.3, "model_args.dim": 16, "model_args.depth": 1},
    )
    dptune.optimize(study, n_trials=1)
    trial = study.trials[0]
    assert trial.user_attrs["touched_data"] and trial.user_attrs["clipping"] == "fast"
    rules = trial.user_attrs["clipping_rules"]
    assert rules["Conv_0/kernel"] == "conv" and rules["cls"] == "layer_vjp", rules
    assert json.dumps(dptune.search_guarantee(study))


def test_a_run_whose_loss_is_nan_says_so(tmp_path):
    run = dptune.train({"dataset": "digits", "privacy": {"epsilon": 3.0}, "microbatch_size": 64,
                        "loss": "tests.helpers.nan_loss:loss"},
                       hyperparameters={"batch_size": 256, "epochs": 1, "learning_rate": 1.0})
    assert run.result.warnings and "not finite" in run.result.warnings[0]
    assert run.as_dict()["warnings"] == run.result.warnings
    fine = dptune.train({"dataset": "digits", "privacy": {"epsilon": 3.0}, "microbatch_size": 64},
                        hyperparameters={"batch_size": 256, "epochs": 1, "learning_rate": 1.0})
    assert fine.result.warnings == []
    # A study's trial records it beside its (chance) value.
    study = dptune.create_study({"name": "nan", "dataset": "digits", "privacy": {"epsilon": 3.0},
                                 "microbatch_size": 64, "loss": "tests.helpers.nan_loss:loss",
                                 "budget": {"max_epochs": 1, "min_steps": 1}, "pruner": {"name": "none"},
                                 "search_space": {"batch_size": 256, "learning_rate": 1.0, "clip_norm": 1.0,
                                                  "epochs": 1}}, storage=f"sqlite:///{tmp_path / 'n.db'}")
    dptune.optimize(study, n_trials=1)
    assert "not finite" in study.trials[0].user_attrs["warnings"][0]


def test_a_model_named_like_a_dataset_is_refused_by_the_builder_too():
    from dptune.errors import ConfigError
    from dptune.models.builtin import build_model

    with pytest.raises(ConfigError, match="model.*names a dataset"):
        build_model("arrayrecord:make", 10, input_shape=(8, 8, 1))
