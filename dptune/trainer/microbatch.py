"""Choosing the microbatch size by measurement, once per (model, input, device) and cached on disk.

The microbatch fixes the compiled shapes and the step's working memory (the
clipped sum is accumulated microbatch by microbatch, so peak memory grows with
the microbatch, never with the logical batch). Larger microbatches use the
device better until they stop fitting or stop getting faster. ``choose``
times the DP accumulation at doubling sizes, stops when a size does not fit,
exceeds the memory allowance, or is clearly slower than the best so far, and
returns the fastest. The choice is stored in ``microbatch.json`` in the cache
directory, so later trials and workers pay nothing.

Only public quantities are measured (random inputs of the data's shape); no
private data is touched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from dptune.config.schema import is_import_path
from dptune.models.builtin import build_model, init_params
from dptune.models.custom import load_loss
from dptune.trainer import compile_stats, xla_options
from dptune.trainer.dp_step import step_functions

SMALLEST = 16
MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class Choice:
    """The chosen size, and what each tried size measured (examples/s, temporary MiB)."""

    microbatch_size: int
    measured: dict[int, tuple[float, float]]
    cached: bool = False


def _memory_limit(device: jax.Device) -> float:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _key(model: str, ws: bool, image_shape: Sequence[int], num_classes: int, clipping: str,
         devices: Sequence[jax.Device], upper: int) -> str:
    shape = "x".join(str(s) for s in image_shape)
    # Compiler options change the timings, so a choice made under others is not reused.
    options = ",".join(f"{k}={v}" for k, v in sorted(xla_options.for_devices(devices).items())) or "xla-defaults"
    return (f"{model}|ws={int(ws)}|{shape}|{num_classes}|{clipping}|{devices[0].device_kind}x{len(devices)}"
            f"|<={upper}|{options}")


def _cache_path() -> str:
    return os.path.join(compile_stats.default_cache_dir(), "microbatch.json")


def choose(model: str, image_shape: Sequence[int], num_classes: int, devices: Sequence[jax.Device], *,
           weight_standardization: bool = False, clipping: str = "auto", optimizer: str = "momentum",
           upper: int = 4096, repeats: int = 3, use_cache: bool = True, model_args: dict | None = None,
           input_dtype: str = "float32", loss: str | None = None) -> Choice:
    """The fastest microbatch size in {16, 32, …} × devices, at most ``upper`` (e.g. the logical batch)."""
    devices = tuple(devices)
    key = _key(model, weight_standardization, image_shape, num_classes, clipping, devices, upper)
    if model_args or loss or input_dtype != "float32":
        key += f"|{json.dumps(model_args or {}, sort_keys=True)}|{loss}|{input_dtype}"
    path = _cache_path()
    table: dict = {}
    if use_cache and os.path.exists(path):
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        if key in table:
            entry = table[key]
            return Choice(entry["microbatch_size"], {int(k): tuple(v) for k, v in entry["measured"].items()}, True)

    net = build_model(model, num_classes, weight_standardization=weight_standardization, input_shape=image_shape,
                      args=model_args)
    params = init_params(net, image_shape, jax.random.key(0), input_dtype)
    integer_inputs = np.issubdtype(np.dtype(input_dtype), np.integer)
    limit = MEMORY_FRACTION * _memory_limit(devices[0])
    rng = np.random.default_rng(0)
    measured: dict[int, tuple[float, float]] = {}
    size = SMALLEST * len(devices)
    while size <= max(upper, SMALLEST * len(devices)):
        fns = step_functions(net, optimizer, size, devices, clipping, load_loss(loss),
                             custom_model=is_import_path(model))
        p = jax.device_put(params, fns.replicated)
        x = (np.zeros((size, *image_shape), input_dtype) if integer_inputs  # id 0: valid for any vocabulary
             else rng.standard_normal((size, *image_shape)).astype(np.float32))
        batch = fns.shard_batch(x, rng.integers(0, num_classes, size).astype(np.int32), np.ones(size, np.float32))
        try:
            temp = fns.accumulate.lower(p, fns.zeros_like(p), *batch, 1.0).compile().memory_analysis()
            temp_bytes = float(getattr(temp, "temp_size_in_bytes", 0) or 0)
            if temp_bytes > limit:
                break
            jax.block_until_ready(fns.accumulate(p, fns.zeros_like(p), *batch, 1.0))
            best_time = float("inf")
            for _ in range(repeats):
                tick = time.perf_counter()
                jax.block_until_ready(fns.accumulate(p, fns.zeros_like(p), *batch, 1.0))
                best_time = min(best_time, time.perf_counter() - tick)
        except jax.errors.JaxRuntimeError as e:  # out of device memory
            if "RESOURCE_EXHAUSTED" in str(e):
                break
            raise
        measured[size] = (size / best_time, temp_bytes / 2**20)
        if size / best_time < 0.9 * max(r for r, _ in measured.values()):
            break
        size *= 2
    chosen = max(measured, key=lambda s: measured[s][0])
    if use_cache:
        table[key] = {"microbatch_size": chosen, "measured": {str(k): list(v) for k, v in measured.items()}}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
    return Choice(chosen, measured)

