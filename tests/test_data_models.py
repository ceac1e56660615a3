"""Datasets (built-in and the TFDS path under mock data) and the model registry."""

import jax
import numpy as np
import pytest

from dptune.data.datasets import load_dataset
from dptune.errors import ConfigError, DataError
from dptune.models.builtin import build_model, count_params, init_params


def test_mnist5k_is_real_mnist_split_deterministically():
    a = load_dataset("mnist5k", seed=3)
    b = load_dataset("mnist5k", seed=3)
    c = load_dataset("mnist5k", seed=4)
    assert a.image_shape == (28, 28, 1) and a.num_classes == 10
    assert (a.split.train, a.split.validation, a.split.test) == (3500, 500, 1000)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert not np.array_equal(a.train.labels, c.train.labels)
    x, y = a.train.take(np.arange(8))
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1 and y.dtype == np.int32
    # Every class is present in every split (the file is sorted by label; the split shuffles).
    for split in (a.train, a.validation, a.test):
        assert len(np.unique(split.labels)) == 10


def test_digits():
    d = load_dataset("digits")
    assert d.image_shape == (8, 8, 1) and d.num_classes == 10
    assert d.split.train + d.split.validation + d.split.test == 1797


def test_unknown_dataset_lists_available():
    with pytest.raises(DataError, match="mnist5k.*digits.*tfds:"):
        load_dataset("cifar100k")


def test_tfds_needs_a_data_dir():
    with pytest.raises(DataError, match="data_dir"):
        load_dataset("tfds:mnist")


def test_tfds_unknown_name(tmp_path):
    with pytest.raises(DataError, match="no dataset"):
        load_dataset("tfds:not_a_dataset_xyz", data_dir=str(tmp_path))


def test_tfds_unprepared_dir_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="tfds build"):
        load_dataset("tfds:mnist", data_dir=str(tmp_path))


def test_tfds_path_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        ds = load_dataset("tfds:mnist", data_dir=str(tmp_path), validation_fraction=0.25)
        assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
        assert (ds.split.train, ds.split.validation, ds.split.test) == (30, 10, 40)
        x, y = ds.train.take(np.arange(5))
        assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32 and y.shape == (5,)
        cifar = load_dataset("tfds:cifar10", data_dir=str(tmp_path))
        assert cifar.image_shape == (32, 32, 3)
        assert cifar.test.take(np.arange(3))[0].shape == (3, 32, 32, 3)


@pytest.mark.parametrize("name,shape", [("cnn", (28, 28, 1)), ("cnn", (8, 8, 1)), ("wrn16_4", (32, 32, 3)),
                                        ("resnet18", (32, 32, 3)), ("resnet50", (32, 32, 3))])
def test_models_build_and_keep_examples_independent(name, shape):
    model = build_model(name, 10, weight_standardization=(name == "wrn16_4"))
    params = init_params(model, shape, jax.random.key(0))
    assert count_params(params) > 0
    x = jax.random.normal(jax.random.key(1), (3, *shape))
    out = model.apply({"params": params}, x)
    assert out.shape == (3, 10)
    # No cross-example statistics: an example's output ignores the others.
    alone = model.apply({"params": params}, x[:1])
    np.testing.assert_allclose(out[:1], alone, rtol=1e-4, atol=1e-5)
    x2 = x.at[1:].set(100.0)
    np.testing.assert_allclose(model.apply({"params": params}, x2)[:1], alone, rtol=1e-4, atol=1e-5)


def test_cnn_size_matches_the_reference_cnn():
    params = init_params(build_model("cnn", 10), (28, 28, 1), jax.random.key(0))
    assert 100_000 < count_params(params) < 110_000


def test_unknown_model():
    with pytest.raises(ConfigError, match="^model:.*cnn"):
        build_model("vit", 10)


@pytest.mark.parametrize("size", [8, 7])
def test_fast_average_pooling_equals_flax(size):
    import flax.linen as nn

    from dptune.models.builtin import _avg_pool_2x2

    x = jax.random.normal(jax.random.key(0), (3, size, size, 5))
    np.testing.assert_allclose(_avg_pool_2x2(x), nn.avg_pool(x, (2, 2), (2, 2), padding="SAME"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size,k,stride", [(28, 3, 1), (9, 3, 2), (12, 7, 2), (10, 1, 2)])
def test_single_channel_convolution_equals_xla(size, k, stride):
    from dptune.models.layers import conv_same

    x = jax.random.normal(jax.random.key(1), (2, size, size, 1))
    kernel = jax.random.normal(jax.random.key(2), (k, k, 1, 5))
    expected = jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv_same(x, kernel, stride), expected, rtol=1e-5, atol=1e-5)
