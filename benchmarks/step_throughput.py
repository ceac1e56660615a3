"""Examples/s of dptune's DP-SGD step vs its non-private step, same model, same process.

    python benchmarks/step_throughput.py [--model cnn] [--batch-sizes 64 256 1024] [--steps 20]

For each logical batch size B, one microbatch of B examples (so the step is
accumulate + apply, as in training) is timed for ``--steps`` steps after a
warm-up step; the table reports the median examples/s of each step, their
ratio, and the compile time of the first call. Use ``--smoke`` in CI (tiny).
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


def time_step(fns, state, x, y, mask, private: bool, steps: int) -> tuple[float, list[float]]:
    accumulate = fns.accumulate if private else fns.accumulate_nonprivate
    key = jax.random.key(0)
    sigma, clip = (1.0, 1.0) if private else (0.0, float("inf"))
    denominator = float(len(y))

    def one(state, t):
        acc = accumulate(state.params, fns.zeros_like(state.params), x, y, mask, clip)
        state = fns.apply(state, acc, key, t, sigma, clip, denominator, 0.1, 0.9, 0.0)
        jax.block_until_ready(state.params)
        return state

    before = compile_stats.seconds()
    state = one(state, 0)
    compile_s = compile_stats.seconds() - before
    times = []
    for t in range(steps):
        tick = time.perf_counter()
        state = one(state, t + 1)
        times.append(time.perf_counter() - tick)
    return compile_s, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--image-shape", type=int, nargs=3, default=(28, 28, 1))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=(64, 256, 1024))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="B = 16, 3 steps: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.batch_sizes, args.steps = (16,), 3

    model = build_model(args.model, 10)
    params = init_params(model, args.image_shape, jax.random.key(0))
    rng = np.random.default_rng(0)
    print(f"model {args.model} ({count_params(params):,} params), input {tuple(args.image_shape)}, "
          f"device {jax.devices()[0].device_kind} ×{jax.local_device_count()}, median of {args.steps} steps")
    header = f"{'B':>6} | {'DP ex/s':>10} | {'non-private ex/s':>16} | {'DP ÷ non-private time':>21} | {'DP compile s':>12} | {'NP compile s':>12}"
    print(header)
    print("-" * len(header))
    for b in args.batch_sizes:
        fns = step_functions(model, "momentum", b, tuple(jax.local_devices()[:1]))
        x = rng.standard_normal((b, *args.image_shape)).astype(np.float32)
        y = rng.integers(0, 10, b).astype(np.int32)
        xs, ys, ms = fns.shard_batch(x, y, np.ones(b, np.float32))
        state = fns.init_state(jax.device_put(params, fns.replicated))
        dp_compile, dp_t = time_step(fns, state, xs, ys, ms, True, args.steps)
        np_compile, np_t = time_step(fns, state, xs, ys, ms, False, args.steps)
        dp, nonpriv = b / statistics.median(dp_t), b / statistics.median(np_t)
        print(f"{b:>6} | {dp:>10,.0f} | {nonpriv:>16,.0f} | {nonpriv / dp:>21.2f} | {dp_compile:>12.2f} | {np_compile:>12.2f}")


if __name__ == "__main__":
    main()
