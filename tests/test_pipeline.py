"""The input pipeline (dptune.data.pipeline): real ArrayRecord files, Poisson batches decoded by grain workers."""

import numpy as np
import pytest
from scipy import stats

from dptune.data import pipeline
from dptune.data.datasets import load_dataset
from dptune.data.sampling import poisson_batch
from dptune.errors import DataError
from dptune.randomness import SecretSeed


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """240 PNG training images and 40 JPEG test images, written with array_record in this test."""
    directory = tmp_path_factory.mktemp("arrayrecord")
    rng = np.random.default_rng(0)
    # Smooth (blocky) images, so that JPEG's loss stays small enough to recognise them.
    images = np.kron(rng.integers(0, 256, (280, 2, 2, 3)), np.ones((1, 8, 8, 1))).astype(np.uint8)
    labels = np.arange(280) % 10  # label = position in the file mod 10: a record can be recognised
    pipeline.write_arrayrecord(str(directory), "train", images[:240], labels[:240], num_classes=10,
                               image_format="png", shards=2)
    pipeline.write_arrayrecord(str(directory), "test", images[240:], labels[240:], num_classes=10,
                               image_format="jpeg")
    return str(directory), images


def test_prepared_dataset_reads_back_exactly(records):
    directory, images = records
    ds = load_dataset("arrayrecord:" + directory, validation_fraction=0.25)
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (180, 60, 40)
    x, y = ds.train.take_raw(np.arange(len(ds.train)))
    np.testing.assert_array_equal(x, images[ds.train.indices])  # PNG is lossless
    np.testing.assert_array_equal(y, ds.train.indices % 10)
    xt, _ = ds.test.take_raw(np.arange(5))
    assert xt.shape == (5, 16, 16, 3) and np.abs(xt.astype(int) - images[240:245]).mean() < 8  # JPEG: lossy


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sampled_index_arrives_once_per_step(records, workers):
    directory, _ = records
    ds = load_dataset("arrayrecord:" + directory, validation_fraction=0.25)
    secret, q, mb, steps = SecretSeed.from_int(5), 0.3, 16, 12
    reader = pipeline.PoissonBatches(ds.train.source, ds.train.indices, ds.train.decode, secret, q, mb)
    loader = pipeline.Loader(reader, steps, num_workers=workers)
    for t in range(steps):
        # The loop's own draw for step t: the loader must deliver exactly these examples, in this order.

        drawn = poisson_batch(secret.batch_sampler(t), len(ds.train), q)
        padded = np.zeros(-(-len(drawn) // mb) * mb, np.int64)
        padded[:len(drawn)] = drawn
        x, y = loader.batch(t, padded)
        want_x, want_y = ds.train.take_raw(padded)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    with pytest.raises(DataError, match="out of step"):
        pipeline.Loader(reader, steps, num_workers=0).batch(3, padded)


def test_inclusion_rate_is_q():
    """Each example joins each step independently w.p. q: per-example counts over T steps are Binomial(T, q)."""
    n, q, steps = 400, 0.1, 300
    reader = pipeline.PoissonBatches(None, np.arange(n), None, SecretSeed.from_int(9), q, 16)
    counts = np.zeros(n)
    for t in range(steps):
        idx = reader.indices(t)
        assert len(np.unique(idx)) == len(idx)
        counts[idx] += 1
    total = counts.sum()
    assert stats.binomtest(int(total), n * steps, q).pvalue > 1e-3
    # Spread across examples as a Binomial(T, q) would (chi-square dispersion test).
    dispersion = ((counts - steps * q) ** 2).sum() / (steps * q * (1 - q))
    assert stats.chi2.sf(dispersion, n - 1) > 1e-3 and stats.chi2.cdf(dispersion, n - 1) > 1e-3


def test_bad_records_input_is_named():
    with pytest.raises(DataError, match="labels"):
        pipeline.write_arrayrecord("/tmp/unused", "train", np.zeros((3, 4, 4, 1), np.uint8), np.zeros(2), num_classes=2)
    with pytest.raises(DataError, match="integer"):
        pipeline.write_arrayrecord("/tmp/unused", "train", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2), num_classes=2)
    with pytest.raises(DataError, match="allowed: png, jpeg"):
        pipeline.encode_image(np.zeros((4, 4, 1), np.uint8), "gif")


def test_an_empty_poisson_batch_keeps_its_shape(records):
    """An empty batch (probability (1-q)^N) must neither crash the loader nor change the step's shape."""
    directory, _ = records
    ds = load_dataset("arrayrecord:" + directory, validation_fraction=0.25)
    reader = pipeline.PoissonBatches(ds.train.source, ds.train.indices, ds.train.decode, SecretSeed.from_int(1),
                                     1e-12, 16)
    item = reader(0)
    assert len(item["positions"]) == 0 and item["images"].shape == (0, 16, 16, 3)
    assert pipeline.read_records(ds.train.source, np.zeros(0, np.int64)) == []
