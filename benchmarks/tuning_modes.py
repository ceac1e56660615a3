"""Cheaper tuning: the released model's accuracy, the search's ε and its compute, per search mode.

For each mode and seed: create a study, run ``--trials`` tuning trials, then
(for the modes) the final run; report the released model's test accuracy
(the final run's, or for the ordinary study its best trial's), the search's
total ε as dptune states it (RDP composition of everything that read the
private training data), the examples processed by all trials and the wall time.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/tuning_modes.py --dataset digits --trials 6 --epochs 2 --seeds 2
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/tuning_modes.py --base studies/mnist5k_eps3.yaml --trials 15 \
        --seeds 3 --modes ordinary,scaled_public,subset

Modes: ``ordinary`` (every trial on the private data at ε each; the baseline),
``public`` (trials on the other built-in dataset, resized to the same shape),
``scaled`` (k = ``--factor`` on the private data), ``scaled_public`` (the same
proxies on the public dataset), ``subset`` (γ = ``--fraction``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import yaml

import dptune

PUBLIC = {"digits": ("mnist5k", 8), "mnist5k": ("digits", 28)}


def config(name: str, dataset: str, mode: dict[str, Any] | None, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    public, size = PUBLIC[dataset]
    if args.base:
        # A study file as users run it (e.g. the README's default study), with the mode added.
        with open(args.base) as f:
            base: dict[str, Any] = yaml.safe_load(f)
        base.update(name=name, seed=seed, private_seed=1000 + seed, image_size=PUBLIC[base["dataset"]][1])
        if mode is not None:
            base["search"] = {k: (PUBLIC[base["dataset"]][0] if v == "PUBLIC" else v) for k, v in mode.items()}
        return base
    cfg: dict[str, Any] = {
        "name": name, "dataset": dataset, "image_size": size, "privacy": {"epsilon": args.epsilon},
        "budget": {"max_epochs": args.epochs}, "microbatch_size": args.microbatch, "seed": seed,
        "private_seed": 1000 + seed, "sampler": {"name": "tpe", "n_startup_trials": args.startup},
        "pruner": {"name": "none"}, "clipping": args.clipping,
        "search_space": {"batch_size": {"low": 128, "high": 512, "log": True},
                         "effective_learning_rate": {"low": 0.5, "high": 8.0, "log": True},
                         "clip_norm": 1.0 if args.clipping == "normalize" else {"low": 0.1, "high": 10.0, "log": True},
                         "epochs": args.epochs}}
    if mode is not None:
        cfg["search"] = {k: (public if v == "PUBLIC" else v) for k, v in mode.items()}
    return cfg


def run_one(label: str, mode: dict[str, Any] | None, args: argparse.Namespace, seed: int, folder: str
            ) -> dict[str, Any]:
    name = f"{label}_{seed}"
    started = time.perf_counter()
    study = dptune.create_study(config(name, args.dataset, mode, args, seed), storage=f"sqlite:///{folder}/{name}.db")
    dptune.optimize(study, n_trials=args.trials)
    if mode is not None:
        study = dptune.finalize(study)
    wall = time.perf_counter() - started
    summary = dptune.summarize(study)
    g = summary.search
    released = g["final"]["test_accuracy"] if mode is not None else (summary.best or {}).get("test_accuracy")
    final_eps = g["final"]["epsilon"] if mode is not None else args.epsilon
    proxy_examples = (g["compute"]["proxy_examples"] if mode is not None else summary.examples_processed)
    return {"test": released, "epsilon": g["total_epsilon"], "final_epsilon": final_eps,
            "examples": summary.examples_processed, "tuning_examples": proxy_examples,
            "trial_steps": summary.trial_steps, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(PUBLIC), default="digits")
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--startup", type=int, default=3, help="TPE's random start-up trials")
    p.add_argument("--microbatch", type=int, default=64)
    p.add_argument("--clipping", default="auto", choices=("auto", "vmap", "normalize"))
    p.add_argument("--modes", default="ordinary,public,scaled,scaled_public,subset")
    p.add_argument("--base", help="a study file to run each mode on (its dataset, space, sampler, pruner, budget)")
    args = p.parse_args()
    all_modes: dict[str, dict[str, Any] | None] = {
        "ordinary": None,
        "public": {"mode": "public", "dataset": "PUBLIC"},
        "scaled": {"mode": "scaled", "factor": args.factor},
        "scaled_public": {"mode": "scaled", "factor": args.factor, "dataset": "PUBLIC"},
        "subset": {"mode": "subset", "fraction": args.fraction},
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        # Compile once before timing anything, so that no mode pays for the first trace.
        warm = argparse.Namespace(**{**vars(args), "trials": 1, "epochs": min(args.epochs, 1.0)})
        for label in ("public", "ordinary"):
            run_one(f"warmup_{label}", all_modes[label], warm, 99, folder)
        for label in args.modes.split(","):
            runs = []
            for seed in range(args.seeds):
                runs.append(run_one(label, all_modes[label], args, seed, folder))
                print(f"{label} seed {seed}: {runs[-1]}", flush=True)
            row = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            row["test_sd"] = statistics.pstdev(r["test"] for r in runs)
            rows.append((label, row))
            print(f"{label}: {row}", flush=True)
    base = rows[0][1]
    if args.base:
        print(f"\n{args.base}, {args.trials} tuning trials (+ final run for a mode), mean ± sd over {args.seeds} seeds")
    else:
        print(f"\n{args.dataset}, {args.trials} tuning trials + final run, {args.epochs:g} epochs, "
              f"ε = {args.epsilon:g} per run, clipping {args.clipping}, mean ± sd over {args.seeds} seeds")
    print("| mode | released test acc | total ε | final run ε | examples processed (tuning) | trial-steps | wall s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['test']:.3f} ± {r['test_sd']:.3f} | {r['epsilon']:.2f} | {r['final_epsilon']:.2f} | "
              f"{r['examples']:,.0f} ({r['tuning_examples'] / max(base['tuning_examples'], 1):.2f}× ordinary's "
              f"tuning) | {r['trial_steps']:.0f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
