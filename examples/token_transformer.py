"""(c) A tiny transformer over token ids: each 8×8 digit becomes a sequence of 64 tokens (its pixel values 0–16).

A user's data loader by import path (``dataset: "examples.token_transformer:load"``) returns integer
token ids; the model embeds them (``nn.Embed``: the fast path's embedding rule), adds a learned
position table, runs one attention block and classifies the mean token. Run from the repository root:
``python -m examples.token_transformer`` (``--quick`` for a 2-trial smoke run).
"""

from __future__ import annotations

import sys

import flax.linen as nn
import numpy as np

import dptune

VOCAB = 17


class TokenTransformer(nn.Module):
    num_classes: int
    length: int = 64
    dim: int = 32
    heads: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, self.dim)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, self.length, self.dim))
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
        x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(x))))
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x.mean(axis=1)))


def make_transformer(num_classes: int, input_shape=(64,), dim: int = 32, heads: int = 2):
    return TokenTransformer(num_classes, int(input_shape[0]), dim, heads)


def load():
    """Token ids [N, 64] (pixel values 0–16) and digit labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.int32), digits.target.astype(np.int64)


def main(quick: bool = False) -> None:
    study = dptune.create_study(
        {"name": "token_transformer", "dataset": load, "model": make_transformer, "privacy": {"epsilon": 3.0},
         "microbatch_size": 64, "budget": {"max_epochs": 2 if quick else 30}, "pruner": {"name": "none"},
         "sampler": {"name": "tpe", "n_startup_trials": 4},
         "search_space": {"batch_size": {"low": 128, "high": 1024, "log": True},
                          "effective_learning_rate": {"low": 0.01, "high": 3, "log": True},
                          "clip_norm": {"low": 0.1, "high": 10, "log": True}, "optimizer": "adam",
                          "epochs": 2 if quick else {"low": 10, "high": 30}}},
        storage="sqlite:///token_transformer.db", skip_if_exists=True)
    dptune.optimize(study, n_trials=2 if quick else 12)
    summary = dptune.summarize(study)
    best = summary.best or {}
    print(f"best trial: validation {best.get('val_accuracy', float('nan')):.4f}, test "
          f"{best.get('test_accuracy', float('nan')):.4f}; ε of releasing it after the search: "
          f"{summary.search['total_epsilon']:.3f} (δ = {summary.search['delta']:g}); clipping: "
          f"{best.get('clipping')}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
