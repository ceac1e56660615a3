"""The user's own data: arrays, or a loader by import path (``dataset: "package.module:load"``).

A loader returns ``(x, y)`` (the training arrays: dptune carves validation and
test splits from them by the public seed, as for the built-in data), or a dict
``{"train": (x, y), "validation": (x, y), "test": (x, y), "num_classes": C}``
where everything but ``train`` is optional. ``x`` is any array whose first axis
is the example (images, token ids, tabular features; any dtype); ``y`` holds
integer class labels ≥ 0.

The **train** split is the private one: N = its length is what the accounting
uses. Validation and test examples are read to select, prune and report and are
not protected by the ε (as for every dataset). The number of classes (given, or
the largest label + 1) and the split sizes are treated as public.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dptune.config.schema import import_object
from dptune.data.datasets import ArraySplit, Dataset, SplitInfo, _split_sizes
from dptune.errors import ConfigError

Arrays = tuple[np.ndarray, np.ndarray]
_INT32_MAX = 2**31 - 1


def _pair(value: Any, where: str) -> Arrays:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ConfigError(where, "must be a pair (x, y) of arrays")
    x, y = np.asarray(value[0]), np.asarray(value[1])
    if x.ndim < 1 or len(x) == 0:
        raise ConfigError(where, "x must hold at least one example along its first axis")
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(where, f"x has {len(x)} examples but y has shape {y.shape}: one integer label per example")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(where, f"labels must be integer class ids, got dtype {y.dtype}")
    if y.min() < 0:
        raise ConfigError(where, f"labels must be >= 0, got {int(y.min())}")
    # Labels and ids are int32 on the device: a larger value would wrap to a negative one.
    if y.max() > _INT32_MAX:
        raise ConfigError(where, f"labels must be below 2^31 (int32 on the device), got {int(y.max())}")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ConfigError(where, "x holds NaN or infinite values; a model cannot learn from them")
    elif np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < -_INT32_MAX - 1 or x.max() > _INT32_MAX):
            raise ConfigError(where, "integer inputs must fit in int32 (ids in [-2^31, 2^31)), got "
                                     f"[{int(x.min())}, {int(x.max())}]")
        x = x.astype(np.int32)
    else:
        raise ConfigError(where, f"x must be numbers (floats or integer ids), got dtype {x.dtype}")
    return x, y.astype(np.int32)


def from_arrays(name: str, data: Any, *, seed: int = 0, validation_fraction: float = 0.1,
                test_fraction: float = 0.2) -> Dataset:
    """A :class:`Dataset` from ``(x, y)`` or ``{"train": (x, y), "validation": …, "test": …, "num_classes": C}``.

    Missing validation and test splits are carved out of ``train`` by a permutation of the public
    ``seed`` (recorded in the split); given ones are used as they are.

    Raises:
      ConfigError: naming ``dataset`` (or the split) and what is wrong: not a pair, mismatched
        lengths, non-integer or negative labels, splits of different input shapes, too few classes.
    """
    if isinstance(data, Dataset):
        return data
    parts = data if isinstance(data, dict) else {"train": data}
    unknown = set(parts) - {"train", "validation", "test", "num_classes"}
    if unknown or "train" not in parts:
        raise ConfigError("dataset", f"{name!r} must give 'train' (and optionally validation, test, num_classes); "
                                     f"got {', '.join(map(str, parts))}")
    splits = {k: _pair(parts[k], f"dataset {k}") for k in ("train", "validation", "test") if k in parts}
    shape, dtype = splits["train"][0].shape[1:], splits["train"][0].dtype
    for k, (x, _) in splits.items():
        if x.shape[1:] != shape or x.dtype != dtype:
            raise ConfigError(f"dataset {k}", f"inputs {x.shape[1:]} {x.dtype} differ from train's {shape} {dtype}")
    x, y = splits["train"]
    carved: dict[str, Arrays] = {}
    missing = [k for k in ("validation", "test") if k not in splits]
    if missing:
        fractions = {"validation": validation_fraction if "validation" in missing else 0.0,
                     "test": test_fraction if "test" in missing else 0.0}
        n_train, n_val, _ = _split_sizes(len(y), fractions["validation"], fractions["test"])
        perm = np.random.default_rng(seed).permutation(len(y))
        t, v, s = np.split(perm, [n_train, n_train + n_val])
        x, y, carved = x[t], y[t], {"validation": (splits["train"][0][v], splits["train"][1][v]),
                                    "test": (splits["train"][0][s], splits["train"][1][s])}
    val = splits.get("validation", carved.get("validation"))
    test = splits.get("test", carved.get("test"))
    assert val is not None and test is not None
    largest = max(int(a.max()) if len(a) else 0 for a in (y, val[1], test[1]))
    num_classes = int(parts.get("num_classes", largest + 1))
    if num_classes < 2 or largest >= num_classes:
        raise ConfigError("dataset num_classes", f"must be >= 2 and above every label (largest {largest}), "
                                                 f"got {num_classes}")
    # No digest of the data: anything computed from the training examples and stored beside the study or
    # the released model would be released with it. The split sizes are checked instead.
    source = name
    return Dataset(name=name, train=ArraySplit(x, y, pixels=False), validation=ArraySplit(*val, pixels=False),
                   test=ArraySplit(*test, pixels=False), image_shape=tuple(shape), num_classes=num_classes,
                   split=SplitInfo(name, seed, len(y), len(val[1]), len(test[1]), source=source),
                   input_dtype=str(dtype), pixels=False)


def load_custom(path: str, *, seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.2) -> Dataset:
    """The dataset that the loader at ``path`` (``"package.module:load"``) returns.

    Raises:
      ConfigError: the loader cannot be imported, raises, or returns something :func:`from_arrays` refuses.
    """
    loader = import_object(path, "dataset")
    if not callable(loader):
        raise ConfigError("dataset", f"{path!r} is not callable")
    try:
        data = loader()
    except Exception as e:  # the user's code
        raise ConfigError("dataset", f"{path!r} raised {type(e).__name__}: {e}") from None
    return from_arrays(path, data, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction)


Loader = Callable[[], Any]
