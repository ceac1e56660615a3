"""`dptune train` examples/s, the whole loop as users run it, with the old and the new feed, beside Opacus.

    python benchmarks/train_loop.py [--batch-sizes 64 256 1024] [--steps 30] [--rounds 3]

Each cell is one `dptune train --json` process on mnist5k (the 106k-parameter
CNN, ε = 8, microbatch chosen by measurement and cached, evaluation only at the
end): ``--feed loop`` is the host loop (a host gather, a transfer
and a dispatch per microbatch, then one for the update); ``--compare resident``
(the default) keeps the training split on the device and runs each logical batch
as one compiled call (:mod:`dptune.trainer.feed`); ``--compare auto`` is what a
user gets by default (the loop on CPU). Examples/s are those the run reports (expected batch
× steps over compute time, compilation excluded). Opacus 1.6's faster mode
(hooks or ghost, whichever is faster in that round) is timed by
``benchmarks/peer_opacus.py``'s worker on the same CNN and threads: a pure
step on a batch held in memory, no data loading, so the ratio is conservative
for dptune. Every round runs all cells of a batch size back to back; the table
gives medians over rounds and the per-round ratios' median and range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN = 3500  # mnist5k's training split (70 %)


def dptune_rate(feed: str, batch: int, steps: int) -> float:
    epochs = steps * batch / N_TRAIN
    cmd = [sys.executable, "-m", "dptune.cli", "train", "--dataset", "mnist5k", "--batch-size", str(batch),
           "--epochs", f"{epochs:.6f}", "--epsilon", "8", "--microbatch-size", "auto", "--feed", feed,
           "--eval-every", "1000000", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    if out.returncode != 0:
        raise SystemExit(f"dptune train failed: {out.stderr.strip().splitlines()[-1]}")
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["feed"] == feed or feed == "auto", result["feed"]
    return float(result["examples_per_second"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=(64, 256, 1024))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", choices=("resident", "streamed", "auto"), default="resident",
                    help="the feed timed beside the host loop (default: resident)")
    ap.add_argument("--no-opacus", action="store_true", help="skip Opacus (no torch venv needed)")
    ap.add_argument("--venv", type=Path, default=HERE.parent / ".bench" / "opacus-venv")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import peer_opacus

    python = None if args.no_opacus else peer_opacus.ensure_venv(args.venv)
    threads = os.cpu_count() or 1
    other = args.compare
    print(f"{'B':>5} {'loop ex/s':>10} {other + ' ex/s':>14} {other + '÷loop':>18} {'Opacus best':>12} "
          f"{'loop÷Opacus':>18} {other + '÷Opacus':>20}", flush=True)
    for b in args.batch_sizes:
        rounds = []
        for _ in range(args.rounds):
            cell = {"loop": dptune_rate("loop", b, args.steps), other: dptune_rate(other, b, args.steps)}
            if python is not None:
                modes = [
                    peer_opacus.run(python, "opacus", m, b, min(args.steps, 20), threads) for m in ("hooks", "ghost")
                ]
                cell["opacus"] = max(m["rate"] for m in modes if "rate" in m)
            rounds.append(cell)

        def med(key: str, rounds: list = rounds) -> float:
            return statistics.median(r[key] for r in rounds)

        def ratio(a: str, c: str, rounds: list = rounds) -> str:
            values = [r[a] / r[c] for r in rounds]
            return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

        opacus = f"{med('opacus'):>12,.0f}" if python else f"{'—':>12}"
        print(
            f"{b:>5} {med('loop'):>10,.0f} {med(other):>14,.0f} {ratio(other, 'loop'):>18} {opacus} "
            f"{ratio('loop', 'opacus') if python else '—':>18} {ratio(other, 'opacus') if python else '—':>20}",
            flush=True,
        )


if __name__ == "__main__":
    main()
