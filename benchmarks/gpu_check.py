"""The accelerator check: DP and non-private examples/s of dptune's training loop, peak memory, and the input pipeline.

    python benchmarks/gpu_check.py [--smoke] [--json FILE]

Two workloads of the seed paper's scale, on synthetic data of the real shapes:

* ResNet-18 at 224×224×3, 1000 classes: the batch is streamed from the host
  each step (ImageNet does not fit on a device);
* WRN-16-4 at 32×32×3, 10 classes, CIFAR-10-sized (50,000 examples): the
  training split lives on the device (``feed: resident``).

For each: the whole ``train_and_evaluate`` loop (what ``dptune train`` runs),
private (book-keeping clipping, σ = 1) and non-private, examples/s with
compilation excluded, their ratio, the feed used and the device's peak memory.
Then the input pipeline (:mod:`dptune.data.pipeline`) reading locally written
ArrayRecord files of ImageNet-shaped JPEGs (decoded and resized to 224²) and
CIFAR-shaped PNGs with 1, 2 and (on an accelerator) 8 worker processes, beside
the DP step's consumption. ``--smoke`` runs tiny shapes on any backend (the
test suite runs it on CPU, with the small ``cnn`` model in place of both).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from dptune.data import pipeline
from dptune.data.datasets import ArraySplit, Dataset, SplitInfo, load_dataset
from dptune.randomness import SecretSeed
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate


def synthetic(name: str, n: int, shape: tuple[int, int, int], classes: int) -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, n).astype(np.int32)
    held = ArraySplit(images[:64], labels[:64])
    return Dataset(name, ArraySplit(images, labels), held, held, shape, classes,
                   SplitInfo(name, 0, n, 64, 64, "synthetic"))


def peak_bytes() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def loop_rate(ds: Dataset, model: str, batch: int, microbatch: int, steps: int, private: bool,
              feed: str) -> dict:
    hp = Hyperparams(batch_size=batch, learning_rate=0.1, clip_norm=1.0, noise_multiplier=1.0 if private else 0.0)
    cfg = RunConfig(model=model, private=private, microbatch_size=microbatch, eval_every=10**9,
                    eval_batch_size=64, feed=feed, num_devices=1)
    r = train_and_evaluate(ds, hp, steps, config=cfg, budget=PrivacyBudget(100.0, 1e-6) if private else None)
    return {"examples_per_s": r.examples_per_second, "feed": r.feed, "compile_s": r.compile_seconds,
            "clipping": r.clipping, "steps": r.steps, "peak_gib": (peak_bytes() or 0) / 2**30}


def pipeline_rate(kind: str, n: int, workers: int, directory: str, batch: int) -> float:
    ds = load_dataset("arrayrecord:" + directory, validation_fraction=0.0)
    q = batch / len(ds.train)
    reader = pipeline.PoissonBatches(ds.train.source, ds.train.indices, ds.train.decode, SecretSeed.from_os(), q, 16)
    steps = max(3, (2 * n) // batch)
    loader = pipeline.Loader(reader, steps + 1, num_workers=workers)
    first = reader.indices(0)
    padded = np.zeros(-(-len(first) // 16) * 16, np.int64)
    padded[:len(first)] = first
    loader.batch(0, padded)  # workers started and warm
    tick, images = time.perf_counter(), 0
    for t in range(1, steps + 1):
        idx = reader.indices(t)
        padded = np.zeros(-(-len(idx) // 16) * 16, np.int64)
        padded[:len(idx)] = idx
        images += len(loader.batch(t, padded)[0])
    return images / (time.perf_counter() - tick)


def write_images(directory: str, kind: str, n: int) -> None:
    rng = np.random.default_rng(1)
    if kind == "imagenet-jpeg":
        # Smooth random images at a typical ImageNet size, decoded and resized to 224².
        small = rng.integers(0, 256, (n, 12, 16, 3))
        images = np.kron(small, np.ones((1, 25, 25, 1))).astype(np.uint8)  # 300×400
        fmt, classes = "jpeg", 1000
    else:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fmt, classes = "png", 10
    pipeline.write_arrayrecord(directory, "train", images, np.arange(n) % classes, num_classes=classes,
                               image_format=fmt)
    pipeline.write_arrayrecord(directory, "test", images[:8], np.arange(8) % classes, num_classes=classes,
                               image_format=fmt)
    if kind == "imagenet-jpeg":
        # Readers resize to the training shape, as TFDS ImageNet needs (image_size: 224).
        manifest = json.load(open(os.path.join(directory, pipeline.MANIFEST)))
        manifest["image_shape"] = [224, 224, 3]
        json.dump(manifest, open(os.path.join(directory, pipeline.MANIFEST), "w"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few steps: checks the script runs")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--compare-feeds", action="store_true",
                    help="also run the DP loop with feed=loop (one dispatch per microbatch: the old path)")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--pipeline-only", action="store_true", help="only the input pipeline's images/s")
    args = ap.parse_args()
    accel = jax.devices()[0].platform != "cpu"
    print(f"devices: {jax.devices()}  jax {jax.__version__}", flush=True)
    if args.smoke:
        # The small CNN stands in for both models: the smoke run checks the paths, not the speed.
        workloads = [("cnn", (16, 16, 3), 10, 256, 32, 16, 2, "streamed"),
                     ("cnn", (8, 8, 1), 10, 512, 64, 32, 2, "resident")]
        pipes = [("imagenet-jpeg", 24, (1,)), ("cifar-png", 64, (1,))]
    else:
        workloads = [("resnet18", (224, 224, 3), 1000, 4096, 1024, 128, 8, "streamed"),
                     ("wrn16_4", (32, 32, 3), 10, 50000, 4096, 512, 12, "resident")]
        pipes = [
            ("imagenet-jpeg", 1024, (1, 2, 8) if accel else (1, 2)),
            ("cifar-png", 8192, (1, 2, 8) if accel else (1, 2)),
        ]
    results: dict = {"device": str(jax.devices()[0].device_kind), "workloads": [], "pipeline": []}
    print(
        f"{'model':<10} {'input':<13} {'B':>6} {'mb':>5} {'feed':<9} {'DP ex/s':>9} {'plain ex/s':>10} "
        f"{'DP/plain':>8} {'peak GiB':>8} {'compile s':>9}",
        flush=True,
    )
    for model, shape, classes, n, batch, mb, steps, feed in [] if args.pipeline_only else workloads:
        ds = synthetic(model, n, shape, classes)
        dp = loop_rate(ds, model, batch, mb, steps, True, feed)
        plain = loop_rate(ds, model, batch, mb, steps, False, feed)
        row = {
            "model": model,
            "shape": shape,
            "batch": batch,
            "microbatch": mb,
            "dp": dp,
            "plain": plain,
            "ratio": dp["examples_per_s"] / plain["examples_per_s"],
        }
        if args.compare_feeds:
            row["dp_loop"] = loop_rate(ds, model, batch, mb, steps, True, "loop")
            print(
                f"  {model}: DP with feed=loop {row['dp_loop']['examples_per_s']:.0f} ex/s; "
                f"{dp['feed']} ÷ loop = {dp['examples_per_s'] / row['dp_loop']['examples_per_s']:.2f}",
                flush=True,
            )
        results["workloads"].append(row)
        print(
            f"{model:<10} {'x'.join(map(str, shape)):<13} {batch:>6} {mb:>5} {dp['feed']:<9} "
            f"{dp['examples_per_s']:>9.0f} {plain['examples_per_s']:>10.0f} {row['ratio']:>8.2f} "
            f"{dp['peak_gib']:>8.2f} {dp['compile_s']:>9.1f}",
            flush=True,
        )
    print(f"\n{'pipeline':<14} {'workers':>7} {'images/s':>9}", flush=True)
    for kind, n, worker_counts in [] if args.skip_pipeline else pipes:
        with tempfile.TemporaryDirectory() as directory:
            write_images(directory, kind, n)
            for workers in worker_counts:
                rate = pipeline_rate(kind, n, workers, directory, batch=min(256, n // 2))
                results["pipeline"].append({"kind": kind, "workers": workers, "images_per_s": rate})
                print(f"{kind:<14} {workers:>7} {rate:>9.0f}", flush=True)
    consumption = {w["model"]: w["dp"]["examples_per_s"] for w in results["workloads"]}
    print(f"\nDP step consumption (examples/s): {json.dumps({k: round(v) for k, v in consumption.items()})}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
