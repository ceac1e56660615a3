"""What watching a run costs: the whole training loop with progress off, as log lines, and as a live view.

    python benchmarks/progress_overhead.py [--dataset mnist5k] [--batch-size 256] [--steps 60] [--rounds 5]

Each round runs the same `dptune train` loop (``train_and_evaluate``, evaluation every 10 steps) three
times, interleaved (in an order that rotates from round to round) so that machine noise hits all alike:
no reporter, :class:`dptune.progress.LogLines` into a discarded stream, and :class:`dptune.progress.Live`
on a recording console that is never shown. The table reports the median milliseconds per step over the
rounds (compilation excluded: from the trainer's own examples per second) and each mode's ratio to "off"
within its round (median, min–max).
"""

from __future__ import annotations

import argparse
import io
import statistics

from rich.console import Console

from dptune.data.datasets import load_dataset
from dptune.progress import Live, LogLines
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate


def one_run(data, hp, steps: int, report) -> float:
    r = train_and_evaluate(data, hp, steps, config=RunConfig(microbatch_size=hp.batch_size, eval_every=10),
                           budget=PrivacyBudget(100.0, 1e-5), progress=report)
    return 1000 * hp.batch_size / r.examples_per_second  # the trainer's compute time per step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    data = load_dataset(args.dataset)
    hp = Hyperparams(batch_size=args.batch_size, learning_rate=1.0, clip_norm=1.0, noise_multiplier=1.0)
    one_run(data, hp, 3, None)  # compile once, outside the rounds
    modes = ("off", "log lines", "live view")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        live = Live(console=Console(file=io.StringIO(), record=True, force_terminal=True, width=160))
        reporters = {"off": None, "log lines": LogLines(io.StringIO()), "live view": live}
        for mode in modes[r % 3:] + modes[:r % 3]:  # the order rotates: no mode always runs first
            times[mode].append(one_run(data, hp, args.steps, reporters[mode]))
        live.close()
    print(f"{'progress':<10} {'ms/step (median)':>17} {'÷ off (median, min–max)':>26}")
    for mode in modes:
        ratios = [t / o for t, o in zip(times[mode], times["off"], strict=True)]
        print(f"{mode:<10} {statistics.median(times[mode]):>17.2f} "
              f"{statistics.median(ratios):>10.3f} ({min(ratios):.3f}–{max(ratios):.3f})")


if __name__ == "__main__":
    main()
