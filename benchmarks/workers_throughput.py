"""Trials per minute with 1, 2 and 4 worker processes, and first vs later trial start-up.

    python benchmarks/workers_throughput.py [--workers 1 2 4] [--n-trials 8] [--max-epochs 1]

Each configuration runs a fresh mnist5k study (ε = 3, no pruning, fixed
private seed) on a journal storage, each worker with one forced host device,
and an empty compilation cache, so first trials really compile. Start-up is the
time from a trial's start to its first finished training step (compilation
included); "later" is the median over each worker's second and later trials.
On a machine with C cores, gains stop near C workers: the workers share them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from dptune.config import schema as config
from dptune.search import study, workers
from dptune.search.storage import open_storage


def run(n_workers: int, n_trials: int, max_epochs: float, base: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(dir=base))
    resolved = config.load_study("studies/mnist5k_eps3.yaml")
    cfg = resolved.study.model_copy(update={
        "name": f"w{n_workers}", "pruner": config.PrunerConfig(name="none"), "private_seed": 7,
        "budget": config.TrainingBudget(max_epochs=max_epochs, min_steps=1)})
    storage = f"journal:///{tmp / 'study.journal'}"
    study.create_study(config.ResolvedStudy(study=cfg, space=resolved.space), storage)
    tick = time.perf_counter()
    code = workers.run_pool(cfg.name, storage, workers=n_workers, n_trials=n_trials, timeout=None,
                            cache_dir=str(tmp / "cache"))
    wall = time.perf_counter() - tick
    import optuna

    trials = [t for t in optuna.load_study(study_name=cfg.name, storage=open_storage(storage)).trials
              if "startup_seconds" in t.user_attrs]
    per_worker: dict[int, list] = {}
    for t in sorted(trials, key=lambda t: t.datetime_start):
        per_worker.setdefault(t.user_attrs["worker"]["pid"], []).append(t.user_attrs["startup_seconds"])
    first = [v[0] for v in per_worker.values()]
    later = [x for v in per_worker.values() for x in v[1:]]
    return {"workers": n_workers, "exit": code, "trials": len(trials), "wall_s": wall,
            "per_min": 60 * len(trials) / wall, "first": statistics.median(first) if first else float("nan"),
            "later": statistics.median(later) if later else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=(1, 2, 4))
    ap.add_argument("--n-trials", type=int, default=8)
    ap.add_argument("--max-epochs", type=float, default=1.0)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as base:
        for k in args.workers:
            rows.append(run(k, args.n_trials, args.max_epochs, Path(base)))
    print(f"mnist5k ε = 3, {args.n_trials} trials of ≤ {args.max_epochs:g} epoch(s), {os.cpu_count()} CPU cores, "
          "1 forced host device per worker")
    print(f"{'workers':>7} | {'trials':>6} | {'wall s':>7} | {'trials/min':>10} | {'vs 1 worker':>11} | "
          f"{'first-trial start-up s':>22} | {'later start-up s':>16}")
    for r in rows:
        print(f"{r['workers']:>7} | {r['trials']:>6} | {r['wall_s']:>7.1f} | {r['per_min']:>10.2f} | "
              f"{r['per_min'] / rows[0]['per_min']:>10.2f}× | {r['first']:>22.2f} | {r['later']:>16.2f}")


if __name__ == "__main__":
    main()
