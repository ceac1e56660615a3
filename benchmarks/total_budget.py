"""A total budget vs per-trial budgets: the released model's accuracy at the ε it really costs, tuning included.

For each total ε and seed, two strategies on the same search space (batch and epochs fixed, learning rate and
clip norm searched), each with ``--trials`` tuning trials:

* ``total``: ``privacy: {total_epsilon: ε}``, planned at create: ``--trials`` proxies on a secret subset take
  ``--share`` of ε, the final run the rest; the released model is the final run's.
* ``per_trial``: the ordinary study, ``privacy: {epsilon: ε}`` per trial; the released model is its best trial,
  and its real total (the composition of every trial) is in the same row.

One table: released test accuracy mean ± sd over seeds, the real total ε, the split of the budget (tuning /
final run), examples processed, wall time.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/total_budget.py --dataset digits --epsilons 3 --seeds 1 \
        --trials 2 --epochs 1
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/total_budget.py --epsilons 1,3,8 --seeds 3 --trials 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import dptune

BATCH = {"digits": 256, "mnist5k": 1000}
STRATEGIES = ("total", "per_trial")


def config(name: str, strategy: str, epsilon: float, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    privacy: dict[str, Any] = ({"total_epsilon": epsilon, "proxies": args.trials, "tuning_share": args.share,
                                "subset_fraction": args.fraction} if strategy == "total" else {"epsilon": epsilon})
    return {"name": name, "dataset": args.dataset, "privacy": {**privacy, "delta": 1e-5},
            "budget": {"max_epochs": args.epochs, "min_steps": 1}, "microbatch_size": args.microbatch,
            "seed": seed, "sampler": {"name": "tpe", "n_startup_trials": args.startup}, "pruner": {"name": "none"},
            "search_space": {"batch_size": BATCH[args.dataset], "epochs": args.epochs,
                             "effective_learning_rate": {"low": 0.5, "high": 8.0, "log": True},
                             "clip_norm": {"low": 0.1, "high": 10.0, "log": True}}}


def run_one(strategy: str, epsilon: float, args: argparse.Namespace, seed: int, folder: str) -> dict[str, Any]:
    name = f"{strategy}_{epsilon:g}_{seed}"
    started = time.perf_counter()
    study = dptune.create_study(config(name, strategy, epsilon, args, seed), storage=f"sqlite:///{folder}/{name}.db")
    dptune.optimize(study, n_trials=args.trials)
    if strategy == "total":
        study = dptune.finalize(study)
    wall = time.perf_counter() - started
    summary = dptune.summarize(study)
    g = summary.search
    if strategy == "total":
        parts = g["planned"]["parts"]
        released, split = g["final"]["test_accuracy"], f"{parts['tuning']:.2f} / {parts['final']:.2f}"
    else:
        released, split = (summary.best or {}).get("test_accuracy"), f"{epsilon:g} × {args.trials} trials"
    return {"test": float(released or 0.0), "epsilon": g["total_epsilon"], "split": split,
            "examples": summary.examples_processed, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(BATCH), default="mnist5k")
    p.add_argument("--epsilons", default="1,3,8", help="total ε values, comma-separated (a subset of 1,3,8)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--trials", type=int, default=8, help="tuning trials (the total budget's K proxies)")
    p.add_argument("--epochs", type=float, default=8.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--share", type=float, default=0.15, help="the total budget's tuning share")
    p.add_argument("--fraction", type=float, default=0.2, help="the total budget's subset fraction")
    p.add_argument("--startup", type=int, default=3, help="TPE's random start-up trials")
    p.add_argument("--microbatch", type=int, default=64)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        # Compile once before timing anything, so that the first strategy does not pay for the first trace.
        run_one("per_trial", 3.0, argparse.Namespace(**{**vars(args), "trials": 1}), 99, folder)
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            for strategy in args.strategies.split(","):
                runs = [run_one(strategy, epsilon, args, seed, folder) for seed in range(args.seeds)]
                for seed, r in enumerate(runs):
                    print(f"ε = {epsilon:g} {strategy} seed {seed}: {r}", flush=True)
                rows.append((epsilon, strategy, runs))
    print(f"\n{args.dataset}, batch {BATCH[args.dataset]}, {args.epochs:g} epochs, {args.trials} tuning trials "
          f"(+ the final run under a total budget), δ = 1e-5, mean ± sd over {args.seeds} seed(s)")
    print("| stated ε | strategy | released test acc | real total ε | split (tuning / final) | examples processed "
          "| wall s |")
    print("|---|---|---|---|---|---|---|")
    for epsilon, strategy, runs in rows:
        tests = [r["test"] for r in runs]
        print(f"| {epsilon:g} | {strategy} | {statistics.mean(tests):.3f} ± {statistics.pstdev(tests):.3f} | "
              f"{statistics.mean(r['epsilon'] for r in runs):.2f} | {runs[0]['split']} | "
              f"{statistics.mean(r['examples'] for r in runs):,.0f} | {statistics.mean(r['wall'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
