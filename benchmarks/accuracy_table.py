"""The accuracy table (benchmarks/RESULTS.md): best test accuracy a dptune study finds, with and without the techniques.

    python benchmarks/accuracy_table.py [--n-trials 6] [--datasets mnist5k digits] [--timeout 900]

For each dataset and each privacy setting (ε = 1, 3, 8 per trial, δ = 1e-5, and
non-private) it runs two studies from ``studies/accuracy_table/``:

* ``plain`` — from scratch, no techniques;
* ``techniques`` — start from a checkpoint pretrained (non-privately) on a
  *different, public* dataset (digits resized to 28×28 for mnist5k; mnist5k
  resized to 8×8 for digits), with weight standardisation, augmentation
  multiplicity 2, and the layers to train and the EMA decay tuned.

The two checkpoints are made first with ``dptune pretrain`` if missing.
Studies go to ``studies/accuracy_table.db``; an existing study is continued
up to ``--n-trials`` finished trials. Compute is reported as the examples the
trials processed and the sum of their wall times (one worker, this machine). The table prints the best trial (by
validation accuracy — test accuracy plays no part in any choice), its test
accuracy, the trials run, the compute spent, and the ε of releasing that best
model after the whole search (RDP composition of every trial that trained).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = {
    # checkpoint: (public dataset, image size, arguments)
    "checkpoints/digits28_cnn_ws.msgpack": ("digits", 28, ["--batch-size", "128", "--epochs", "30"]),
    "checkpoints/mnist5k8_cnn_ws.msgpack": ("mnist5k", 8, ["--batch-size", "256", "--epochs", "20"]),
}
SETTINGS = ("eps1", "eps3", "eps8", "nonprivate")
STORAGE = "sqlite:///studies/accuracy_table.db"


def dptune(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dptune.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, check=True, text=True, capture_output=capture)


def _trial_seconds(name: str) -> float:
    """Wall time of all the study's trials (start to finish), whenever they ran."""
    import optuna

    study = optuna.load_study(study_name=name, storage=STORAGE)
    return sum((t.datetime_complete - t.datetime_start).total_seconds()
               for t in study.trials if t.datetime_complete and t.datetime_start)


def _show(name: str) -> dict:
    return json.loads(dptune("study", "show", name, "--storage", STORAGE, "--json", capture=True).stdout)


def pretrain() -> dict[str, float]:
    seconds = {}
    for path, (dataset, size, extra) in PRETRAIN.items():
        if (ROOT / path).exists():
            continue
        tick = time.perf_counter()
        dptune("pretrain", "--dataset", dataset, "--image-size", str(size), "--declare-public",
               "--weight-standardization", "--learning-rate", "0.05", "--ema-decay", "0.99",
               "--augment-multiplicity", "2", "--augment-shift", "1" if size == 8 else "2",
               "--microbatch-size", "128", "--output", path, *extra)
        seconds[path] = time.perf_counter() - tick
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-trials", type=int, default=6)
    ap.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per study")
    args = ap.parse_args()
    pretrained = pretrain()
    for path, s in pretrained.items():
        print(f"pretrained {path} in {s:.0f} s", flush=True)

    rows = []
    for dataset in args.datasets:
        for setting in args.settings:
            for tech in ("plain", "techniques"):
                name = f"{dataset}_{setting}_{tech}"
                config = f"studies/accuracy_table/{name}.yaml"
                tick = time.perf_counter()
                dptune("study", "create", "--config", config, "--skip-if-exists")
                show = _show(name)
                remaining = args.n_trials - show["complete"] - show["pruned"] - show["rejected"]
                if remaining > 0:  # an existing study is continued, not repeated
                    dptune("optimize", "--study-name", name, "--storage", STORAGE, "--n-trials", str(remaining),
                           "--timeout", str(args.timeout), "--workers", "1")
                    show = _show(name)
                rows.append((dataset, setting, tech, show, _trial_seconds(name)))
                print(f"done {name} ({time.perf_counter() - tick:.0f} s in this run)", flush=True)

    print()
    print(
        "| dataset | privacy (per trial) | techniques | best val | its test | selected params "
        "| trials (complete/pruned) | examples processed | trial wall s | ε of releasing the best after the search |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset, setting, tech, show, seconds in rows:
        best = show.get("best") or {}
        search = show.get("search") or {}
        total = search.get("total_epsilon")
        privacy = "non-private" if setting == "nonprivate" else f"ε = {setting[3:]}"
        eps_total = (
            "∞"
            if setting == "nonprivate"
            else (f"{total:.2f}" if isinstance(total, (int, float)) and math.isfinite(total) else "?")
        )
        val, test = best.get("value"), best.get("test_accuracy")
        print(
            f"| {dataset} | {privacy} | {'yes' if tech == 'techniques' else 'no'} | "
            f"{val:.3f} | {test:.3f} | {best.get('selected_parameters', 'raw')}"
            f"{' (' + str(best.get('trainable')) + ')' if tech == 'techniques' else ''} | "
            f"{show['n_trials']} ({show['complete']}/{show['pruned']}) | {show['examples_processed']:,} | "
            f"{seconds:.0f} | {eps_total} |"
            if best
            else f"| {dataset} | {privacy} | {tech} | no complete trial |"
        )


if __name__ == "__main__":
    main()
