"""The input pipeline: Poisson batches decoded in worker processes, one logical batch ahead.

dptune keeps the privacy-critical part: step t's batch is drawn from the
secret per-step stream ``secret.batch_sampler(t)`` (:mod:`dptune.randomness`),
the same draw the training loop makes. Everything else is Google's ``grain``
loader: a ``MapDataset`` over step numbers whose elements are whole decoded
logical batches, read with batched random access (``__getitems__``) from
ArrayRecord files, decoded and resized in ``num_workers`` processes
(``mp_prefetch``), each working ahead on its own steps, so the next batches
are ready while the current one trains.

The workers receive the secret (pickled into their memory on this machine);
they hold it exactly as long and as privately as the training process does.

Datasets written by :func:`write_arrayrecord` (``arrayrecord:<dir>`` in
:func:`dptune.data.datasets.load_dataset`) hold one msgpack record per example: the
encoded image (PNG or JPEG) and its label. TFDS ArrayRecord datasets are read
through the same loader.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from dptune.data.sampling import poisson_batch
from dptune.errors import DataError
from dptune.randomness import SecretSeed

MANIFEST = "dptune_dataset.json"
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg")


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """uint8 HWC → PNG or JPEG bytes (JPEG at quality 95)."""
    from PIL import Image

    if fmt not in IMAGE_FORMATS:
        raise DataError(f"image format: unknown {fmt!r}; allowed: {', '.join(IMAGE_FORMATS)}")
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = io.BytesIO()
    pil.save(out, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return out.getvalue()


def write_arrayrecord(directory: str, split: str, images: np.ndarray, labels: np.ndarray, *,
                      num_classes: int, image_format: str = "png", shards: int = 1) -> list[str]:
    """Write ``images`` (uint8 [N, H, W, C]) and integer ``labels`` as ArrayRecord files for ``arrayrecord:<dir>``.

    Returns:
      The paths written. ``dptune_dataset.json`` in ``directory`` records the
      image shape, the number of classes and each split's files.

    Raises:
      DataError: mismatched lengths, non-integer labels, or an unknown format.
    """
    import msgpack
    from array_record.python.array_record_module import ArrayRecordWriter

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"images: uint8 of shape [N, H, W, C] expected, got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise DataError(f"labels: {len(labels)} labels for {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels: integer class labels expected, got {labels.dtype}")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for shard, part in enumerate(np.array_split(np.arange(len(images)), shards)):
        path = os.path.join(directory, f"{split}.array_record-{shard:05d}-of-{shards:05d}")
        writer = ArrayRecordWriter(path, "group_size:1")
        for i in part:
            writer.write(msgpack.packb({"image": encode_image(images[i], image_format), "label": int(labels[i])}))
        writer.close()
        paths.append(path)
    manifest_path = os.path.join(directory, MANIFEST)
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {"splits": {}}
    manifest.update(image_shape=list(images.shape[1:]), num_classes=int(num_classes))
    manifest["splits"][split] = [os.path.basename(p) for p in paths]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return paths


class DecodeRecord:
    """A picklable decoder of one msgpack record → (uint8 image resized to ``image_shape``, label)."""

    def __init__(self, image_shape: Sequence[int]):
        self.image_shape = tuple(image_shape)

    def __call__(self, record: bytes) -> tuple[np.ndarray, int]:
        import msgpack
        from PIL import Image

        item = msgpack.unpackb(record)
        h, w, c = self.image_shape
        pil: Image.Image = Image.open(io.BytesIO(item["image"])).convert("L" if c == 1 else "RGB")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.Resampling.BILINEAR)
        image = np.asarray(pil, np.uint8)
        return (image[..., None] if c == 1 else image), int(item["label"])


def read_records(source: Any, ids: np.ndarray) -> list[Any]:
    """Records ``ids`` with one batched read where the source offers it.

    ArrayRecord's ``__getitems__`` reads many records in one call (parallel
    within the file); sources without it (or that fail on it, as TFDS's
    mocked sources did) are read one record at a time.
    """
    wanted = [int(i) for i in ids]
    if not wanted:
        return []  # ArrayRecord's batched read refuses an empty request
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            records = getitems(wanted)
            if len(records) == len(wanted):
                return list(records)
        except (TypeError, NotImplementedError, AttributeError):
            pass
    return [source[i] for i in wanted]


class PoissonBatches:
    """Step t → the decoded logical batch of step t (picklable: it runs in grain's workers).

    The batch is ``poisson_batch(secret.batch_sampler(t), n, q)`` over positions
    of the split, mapped to record ids; ``rows`` = (start, stop) limits the
    read to this process's share of each microbatch (several hosts).
    """

    def __init__(self, source: Any, record_ids: np.ndarray, decode: Callable[[Any], tuple[np.ndarray, int]],
                 secret: SecretSeed, sampling_rate: float, microbatch_size: int,
                 rows: tuple[int, int] | None = None):
        self.source = source
        self.record_ids = np.asarray(record_ids)
        self.decode = decode
        self.secret = secret
        self.sampling_rate = sampling_rate
        self.microbatch_size = microbatch_size
        self.rows = rows

    def indices(self, step: int) -> np.ndarray:
        return poisson_batch(self.secret.batch_sampler(step), len(self.record_ids), self.sampling_rate)

    def __call__(self, step: int) -> dict[str, Any]:
        indices = self.indices(step)
        mb = self.microbatch_size
        used = -(-len(indices) // mb)
        padded = np.zeros(used * mb, np.int64)
        padded[:len(indices)] = indices
        if self.rows is not None:
            lo, hi = self.rows
            padded = padded.reshape(used, mb)[:, lo:hi].reshape(-1)
        # Sorted, de-duplicated reads are faster; the batch is then put back in order.
        unique, inverse = np.unique(self.record_ids[padded], return_inverse=True)
        decoded = [self.decode(r) for r in read_records(self.source, unique)]
        if decoded:
            images = np.stack([d[0] for d in decoded])[inverse]
            labels = np.asarray([d[1] for d in decoded], np.int32)[inverse]
        else:  # an empty Poisson batch: right rank, so the step's shape does not change
            shape = tuple(getattr(self.decode, "image_shape", ()))
            images, labels = np.zeros((0, *shape), np.uint8), np.zeros(0, np.int32)
        return {"step": step, "positions": padded, "images": images, "labels": labels}


class Loader:
    """Iterates decoded logical batches for steps ``start, start+1, …`` with ``num_workers`` processes.

    ``num_workers=0`` decodes on the calling thread (still through grain).
    :meth:`batch` hands step t's batch to :class:`dptune.trainer.feed.StreamedFeed`
    and checks it is the batch the loop drew.
    """

    def __init__(self, reader: PoissonBatches, steps: int, *, num_workers: int = 2, buffer: int = 2, start: int = 0):
        import grain

        dataset = grain.MapDataset.range(start, steps).map(reader).to_iter_dataset(grain.ReadOptions(num_threads=0))
        if num_workers > 0:
            from absl import flags

            # grain's workers read absl flags, which only an absl `app.run` program has parsed.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                       per_worker_buffer_size=buffer))
        self.reader = reader
        self._dataset = dataset
        # Workers start on the first batch asked for: a loader never used starts (and leaves) nothing.
        self._iterator: Iterator[dict[str, Any]] | None = None

    def batch(self, step: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._dataset)
        item = next(self._iterator)
        if item["step"] != step or not np.array_equal(item["positions"], positions):
            raise DataError(f"pipeline: loader out of step (got step {item['step']}, expected {step})")
        return item["images"], item["labels"]
