"""Does pruning save compute? One study file, run with its pruner and with none.

    python benchmarks/pruning_savings.py [--config studies/mnist5k_eps3.yaml] [--n-trials 12]

Both runs use the same sampler seed and the same private seed, so they start
from the same samples; the table reports best validation and test accuracy,
trial counts, total trial-steps, training examples processed (the compute
measure that does not depend on machine load; a step's cost grows with its
batch) and wall time, measured in this run.
Studies are written to a temporary SQLite file and discarded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dptune.config import schema as config
from dptune.search import results, study
from dptune.trainer import compile_stats


def run(resolved: config.ResolvedStudy, storage: str, n_trials: int) -> dict:
    study.create_study(resolved, storage)
    tick = time.perf_counter()
    s = study.optimize(resolved.study.name, storage, n_trials=n_trials)
    wall = time.perf_counter() - tick
    summary = results.summarize(s)
    best = summary.best or {}
    return {
        "pruner": resolved.study.pruner.name,
        "best_val": best.get("value"),
        "best_test": best.get("test_accuracy"),
        "trials": summary.n_trials,
        "pruned": summary.pruned,
        "rejected": summary.rejected,
        "trial_steps": summary.trial_steps,
        "examples": summary.examples_processed,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="studies/mnist5k_eps3.yaml")
    ap.add_argument("--n-trials", type=int, default=12)
    ap.add_argument("--smoke", action="store_true", help="2 trials of 1 epoch: checks the script runs")
    args = ap.parse_args()
    compile_stats.enable_persistent_cache()
    base = config.load_study(args.config)
    overrides = {"private_seed": 1234}
    if args.smoke:
        args.n_trials = 2
        overrides["budget"] = base.study.budget.model_copy(update={"max_epochs": 1.0})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'pruning.db'}"
        for pruner in (base.study.pruner, config.PrunerConfig(name="none")):
            cfg = base.study.model_copy(update={**overrides, "pruner": pruner,
                                                "name": f"{base.study.name}_{pruner.name}"})
            rows.append(run(config.ResolvedStudy(study=cfg, space=base.space), storage, args.n_trials))
    print(f"{base.study.name}: ε = {base.study.privacy.epsilon:g}, {args.n_trials} trials each")
    header = (f"{'pruner':>10} | {'best val':>8} | {'its test':>8} | {'trials':>6} | {'pruned':>6} | "
              f"{'rejected':>8} | {'trial-steps':>11} | {'examples':>9} | {'wall s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"{r['pruner']:>10} | {fmt(r['best_val']):>8} | {fmt(r['best_test']):>8} | {r['trials']:>6} | "
            f"{r['pruned']:>6} | {r['rejected']:>8} | {r['trial_steps']:>11} | {r['examples']:>9,} | "
            f"{r['wall_s']:>7.1f}"
        )
    if rows[1]["examples"]:
        print(
            f"pruning processed {rows[0]['examples'] / rows[1]['examples']:.2f}× the training examples, "
            f"{rows[0]['trial_steps'] / rows[1]['trial_steps']:.2f}× the trial-steps and took "
            f"{rows[0]['wall_s'] / rows[1]['wall_s']:.2f}× the wall time of no pruning"
        )


if __name__ == "__main__":
    main()
