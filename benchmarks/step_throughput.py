"""Examples/s of dptune's DP-SGD step (each clipping path) vs its non-private step, same model, same process.

    python benchmarks/step_throughput.py [--model cnn] [--batch-sizes 64 256 1024] [--steps 20]

For each logical batch size B, one microbatch of B examples (so the step is
accumulate + apply, as in training) is timed for ``--steps`` steps after a
warm-up step, for the book-keeping DP step, the vmap (reference) DP step and the
non-private step, interleaved step by step so that machine noise hits all
alike. The table reports median examples/s, the DP ÷ non-private time ratio,
compile seconds and XLA's temporary-buffer size of each compiled accumulate
(the step's working memory beyond inputs and parameters). ``--smoke``: tiny.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from dptune import compile_stats
from dptune.dp_step import step_functions
from dptune.models import build_model, count_params, init_params


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
    ap.add_argument("--smoke", action="store_true", help="B = 16, 3 steps: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.batch_sizes, args.steps = (16,), 3

    model = build_model(args.model, 10)
    params = init_params(model, args.image_shape, jax.random.key(0))
    rng = np.random.default_rng(0)
    print(f"model {args.model} ({count_params(params):,} params), input {tuple(args.image_shape)}, "
          f"device {jax.devices()[0].device_kind} ×{jax.local_device_count()}, median of {args.steps} steps")
    paths = (("book-keeping", "bookkeeping", True), ("vmap", "vmap", True), ("non-private", "vmap", False))
    cols = ["B"] + [f"{p} ex/s" for p, _, _ in paths] + ["BK ÷ NP time", "vmap ÷ NP time", "BK vs vmap"] \
        + [f"{p} compile s" for p, _, _ in paths] + [f"{p} temp MiB" for p, _, _ in paths]
    print(" | ".join(cols))
    print("-" * (sum(len(c) for c in cols) + 3 * len(cols)))
    for b in args.batch_sizes:
        x = rng.standard_normal((b, *args.image_shape)).astype(np.float32)
        y = rng.integers(0, 10, b).astype(np.int32)
        runs = []
        for _, clipping, private in paths:
            fns = step_functions(model, "momentum", b, tuple(jax.local_devices()[: args.devices]), clipping)
            xs, ys, ms = fns.shard_batch(x, y, np.ones(b, np.float32))
            one, temp = make_step(fns, xs, ys, ms, private)
            state = fns.init_state(jax.device_put(params, fns.replicated))
            before = compile_stats.seconds()
            state = one(state, 0)
            runs.append({"one": one, "state": state, "compile": compile_stats.seconds() - before,
                         "temp": temp(state) / 2**20, "times": []})
        for t in range(args.steps):
            for r in runs:
                tick = time.perf_counter()
                r["state"] = r["one"](r["state"], t + 1)
                r["times"].append(time.perf_counter() - tick)
        rate = [b / statistics.median(r["times"]) for r in runs]
        row = [f"{b}"] + [f"{v:,.0f}" for v in rate] + [
            f"{rate[2] / rate[0]:.2f}", f"{rate[2] / rate[1]:.2f}", f"{rate[0] / rate[1]:.2f}×"]
        row += [f"{r['compile']:.2f}" for r in runs] + [f"{r['temp']:.1f}" for r in runs]
        print(" | ".join(row))


if __name__ == "__main__":
    main()
