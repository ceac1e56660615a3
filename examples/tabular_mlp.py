"""(a) Your own Flax MLP on your own arrays, tuned through the Python API.

The data: scikit-learn's 8×8 digits, flattened into 64 tabular features (floats in [0, 1]).
Run from the repository root: ``python -m examples.tabular_mlp`` (add ``--quick`` for a 2-trial smoke run).
"""

from __future__ import annotations

import sys

import flax.linen as nn
import numpy as np

import dptune


class MLP(nn.Module):
    """Two hidden layers of LayerNorm + GELU; nothing mixes examples."""

    num_classes: int
    width: int = 128

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.gelu(nn.LayerNorm()(nn.Dense(self.width)(x)))
        return nn.Dense(self.num_classes)(x)


def make_mlp(num_classes: int, width: int = 128, **_):
    return MLP(num_classes, width)


def load():
    """Tabular features and labels: the training arrays (dptune carves validation and test by the public seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def main(quick: bool = False) -> None:
    study = dptune.create_study(
        {"name": "tabular_mlp", "dataset": load, "model": make_mlp, "model_args": {"width": 64 if quick else 128},
         "privacy": {"epsilon": 3.0}, "microbatch_size": 64, "budget": {"max_epochs": 2 if quick else 20},
         "sampler": {"name": "tpe", "n_startup_trials": 4}, "pruner": {"name": "none"},
         "search_space": {"batch_size": {"low": 128, "high": 1024, "log": True},
                          "effective_learning_rate": {"low": 0.1, "high": 10, "log": True},
                          "clip_norm": {"low": 0.1, "high": 10, "log": True},
                          "epochs": 2 if quick else {"low": 5, "high": 20}}},
        storage="sqlite:///tabular_mlp.db", skip_if_exists=True)
    dptune.optimize(study, n_trials=2 if quick else 12)
    summary = dptune.summarize(study)
    best = summary.best or {}
    print(f"best trial: validation {best.get('val_accuracy', float('nan')):.4f}, test "
          f"{best.get('test_accuracy', float('nan')):.4f}; ε of releasing it after the search: "
          f"{summary.search['total_epsilon']:.3f} (δ = {summary.search['delta']:g}); clipping: "
          f"{best.get('clipping')}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
