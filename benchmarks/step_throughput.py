"""Examples/s of dptune's DP-SGD step (each clipping path) vs its non-private step, same model, same process.

    python benchmarks/step_throughput.py [--model cnn] [--batch-sizes 64 256 1024] [--steps 20] [--xla-options both]

For each logical batch size B, one microbatch of B examples (so the step is
accumulate + apply, as in training) is timed for ``--steps`` steps after a
warm-up step, for the book-keeping DP step, the vmap (reference) DP step and the
non-private step, interleaved step by step so that machine noise hits all
alike. The table reports median examples/s, the DP ÷ non-private time ratio,
compile seconds and XLA's temporary-buffer size of each compiled accumulate
(the step's working memory beyond inputs and parameters). ``--xla-options
both`` times every path also with XLA's default compiler options, to show what
:mod:`dptune.trainer.xla_options` buys on this backend. ``--smoke``: tiny.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from dptune.models.builtin import build_model, count_params, init_params
from dptune.trainer import compile_stats, xla_options
from dptune.trainer.dp_step import StepFunctions


def make_step(fns, x, y, mask, private: bool):
    accumulate = fns.accumulate if private else fns.accumulate_nonprivate
    key = jax.random.key(0)
    sigma, clip = (1.0, 1.0) if private else (0.0, float("inf"))
    denominator = float(len(y))

    def one(state, t):
        acc = accumulate(state.params, fns.zeros_like(state.params), x, y, mask, clip)
        state = fns.apply(state, acc, key, t, sigma, clip, denominator, 0.1, 0.9, 0.0)
        jax.block_until_ready(state.params)
        return state

    def temp_bytes(state) -> int:
        lowered = accumulate.lower(state.params, fns.zeros_like(state.params), x, y, mask, clip)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    return one, temp_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--image-shape", type=int, nargs=3, default=(28, 28, 1))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=(64, 256, 1024))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--devices", type=int, default=1, help="local devices to shard each microbatch over")
    ap.add_argument("--xla-options", choices=("dptune", "xla", "both"), default="dptune",
                    help="compile with dptune's backend options (dptune.trainer.xla_options), XLA's defaults, or both")
    ap.add_argument("--smoke", action="store_true", help="B = 16, 3 steps: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.batch_sizes, args.steps = (16,), 3

    model = build_model(args.model, 10)
    params = init_params(model, args.image_shape, jax.random.key(0))
    rng = np.random.default_rng(0)
    devices = tuple(jax.local_devices()[: args.devices])
    print(f"model {args.model} ({count_params(params):,} params), input {tuple(args.image_shape)}, "
          f"device {devices[0].device_kind} ×{len(devices)}, median of {args.steps} steps, "
          f"dptune options on this backend: {xla_options.for_devices(devices) or 'none'}")
    options = {"dptune": ("dptune",), "xla": ("xla",), "both": ("dptune", "xla")}[args.xla_options]
    paths = [(name, clipping, private, opt) for opt in options
             for name, clipping, private in (("book-keeping", "bookkeeping", True), ("vmap", "vmap", True),
                                             ("non-private", "vmap", False))]
    cols = ["B", "path", "options", "ex/s", "÷ NP time", "vs vmap", "compile s", "temp MiB"]
    print(" | ".join(cols))
    print(" | ".join("-" * len(c) for c in cols))
    for b in args.batch_sizes:
        x = rng.standard_normal((b, *args.image_shape)).astype(np.float32)
        y = rng.integers(0, 10, b).astype(np.int32)
        runs = []
        for name, clipping, private, opt in paths:
            # Built directly (not the per-process cache) so that each option set gets its own compilation.
            os.environ[xla_options.ENV] = "1" if opt == "dptune" else "0"
            fns = StepFunctions(model, "momentum", b, devices, clipping)
            xs, ys, ms = fns.shard_batch(x, y, np.ones(b, np.float32))
            one, temp = make_step(fns, xs, ys, ms, private)
            state = fns.init_state(jax.device_put(params, fns.replicated))
            before = compile_stats.seconds()
            state = one(state, 0)
            runs.append({"key": (name, opt), "one": one, "state": state, "compile": compile_stats.seconds() - before,
                         "temp": temp(state) / 2**20, "times": []})
        # Interleaved step by step, so that machine noise hits every path alike.
        for t in range(args.steps):
            for r in runs:
                tick = time.perf_counter()
                r["state"] = r["one"](r["state"], t + 1)
                r["times"].append(time.perf_counter() - tick)
        rate = {r["key"]: b / statistics.median(r["times"]) for r in runs}
        for r in runs:
            name, opt = r["key"]
            ratio = f"{rate[('non-private', opt)] / rate[r['key']]:.2f}" if name != "non-private" else ""
            vs = f"{rate[r['key']] / rate[('vmap', opt)]:.2f}×" if name == "book-keeping" else ""
            print(f"{b} | {name} | {opt} | {rate[r['key']]:,.0f} | {ratio} | {vs} | {r['compile']:.2f} | "
                  f"{r['temp']:.1f}")


if __name__ == "__main__":
    main()
