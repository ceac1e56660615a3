"""The default study against a plain random search: best model found for the compute spent.

Arms (each ``--trials`` trials, ``--seeds`` seeds, ε = 3 per trial as in ``studies/mnist5k_eps3.yaml``):

* ``shipped``: ``studies/mnist5k_eps3.yaml`` as it is in this checkout (TPE, median pruner, its search space);
* ``random``: a random sampler, no pruner, over a wide space (batch 256..N, 2..20 epochs, η 0.1..10, C 0.1..10);
* ``previous``: the earlier defaults (batch 256..N, 2..8 epochs, η 0.2..5, C 0.1..5, TPE + median).

For each: the chosen trial's validation accuracy and its 95% interval, its test
accuracy, the honest ε of releasing it (as ``dptune study show`` states it),
the examples processed by all trials and the wall time.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/default_study.py --trials 15 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import yaml

import dptune

WIDE = {"batch_size": {"low": 256, "high": "full", "log": True},
        "effective_learning_rate": {"low": 0.1, "high": 10, "log": True},
        "clip_norm": {"low": 0.1, "high": 10, "log": True},
        "epochs": {"low": 2, "high": 20}, "optimizer": "momentum", "momentum": 0.9}
PREVIOUS = {"batch_size": {"low": 256, "high": "full", "log": True},
            "effective_learning_rate": {"low": 0.2, "high": 5, "log": True},
            "clip_norm": {"low": 0.1, "high": 5, "log": True},
            "epochs": {"low": 2, "high": 8}, "optimizer": "momentum", "momentum": 0.9}


def arm_config(arm: str, seed: int) -> dict[str, Any]:
    with open("studies/mnist5k_eps3.yaml") as f:
        cfg: dict[str, Any] = yaml.safe_load(f)
    cfg.update(name=f"{arm}_{seed}", seed=seed, private_seed=7000 + seed)
    if arm == "random":
        cfg.update(sampler={"name": "random"}, pruner={"name": "none"}, search_space=WIDE,
                   budget={**cfg.get("budget", {}), "max_epochs": 20})
    elif arm == "previous":
        cfg.update(sampler={"name": "tpe", "n_startup_trials": 5},
                   pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2},
                   search_space=PREVIOUS, budget={"max_epochs": 8, "min_steps": 5})
    return cfg


def run_arm(arm: str, seed: int, trials: int, folder: str) -> dict[str, Any]:
    started = time.perf_counter()
    study = dptune.create_study(arm_config(arm, seed), storage=f"sqlite:///{folder}/{arm}_{seed}.db")
    dptune.optimize(study, n_trials=trials)
    wall = time.perf_counter() - started
    s = dptune.summarize(study)
    best = s.best or {}
    interval = best.get("val_accuracy_interval") or [float("nan"), float("nan")]
    return {"val": best.get("val_accuracy", float("nan")), "low": interval[0], "high": interval[1],
            "test": best.get("test_accuracy", float("nan")), "epsilon": s.search["total_epsilon"],
            "examples": s.examples_processed, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default="shipped,random,previous")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arm in args.arms.split(","):
            runs = []
            for seed in range(args.seeds):
                r = run_arm(arm, seed, args.trials, folder)
                print(f"{arm} seed {seed}: {r}", flush=True)
                runs.append(r)
            row = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            row["test_sd"] = statistics.pstdev(r["test"] for r in runs)
            rows.append((arm, row))
    print(f"\nmnist5k, {args.trials} trials at ε = 3 each, mean over {args.seeds} seeds (test ± sd across seeds)")
    print("| arm | chosen trial's val (95% interval) | its test | ε of releasing it | examples processed | wall s |")
    print("|---|---|---|---|---|---|")
    for arm, r in rows:
        print(f"| {arm} | {r['val']:.3f} ({r['low']:.3f}–{r['high']:.3f}) | {r['test']:.3f} ± {r['test_sd']:.3f} | "
              f"{r['epsilon']:.2f} | {r['examples']:,.0f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
