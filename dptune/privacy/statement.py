"""A written privacy statement: what an ε means for what ran (after TF Privacy's ``compute_dp_sgd_privacy_statement``).

A number alone invites misreading. The statement says, in words: the (ε, δ)
and the accountant; the adjacency (add or remove one training example); the
sampling the accountant assumes (Poisson); what the ε covers (the training
examples) and what it does not (validation and test examples used to select,
prune and report); how a search's total was composed; which quantities dptune
treats as public; and the assumptions the guarantee rests on. No JAX here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dptune.privacy.mechanism import Mechanism

__all__ = ["COVERAGE", "PUBLIC", "USER_CODE", "Mechanism", "Statement"]

USER_CODE = ("the user's model, loss and data loader (named by import path) hold no private data of their own: "
             "only the training examples they are given are protected")
COVERAGE = ("The ε covers the training examples only: the validation and test examples used to select, prune "
            "and report are not protected by it.")
PUBLIC = ("Treated as public: the training-set size N and the split sizes, the number of classes, the sampling "
          "rate q, σ, the clipping norm, the number of steps and every other hyperparameter, the model and its "
          "public initialisation seed. "
          "Realised batch sizes are private and kept out of the results (example counts are expected counts, "
          "steps × B). Wall-clock timings are not covered: step times grow with the realised batch sizes, so they "
          "are for the operator and are not part of a release.")


def _fmt(v: float) -> str:
    return f"{v:.4g}"


@dataclass(frozen=True)
class Statement:
    """The pieces of a privacy statement; :meth:`text` renders them."""

    epsilon: float
    delta: float
    accountant: str
    dataset: str | None = None
    dataset_size: int | None = None
    mechanism: Mechanism | None = None
    search: str | None = None
    validation: str = COVERAGE
    seed_fixed: bool = False
    extra_assumptions: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def text(self) -> str:
        """The statement as a few plain sentences (one paragraph per topic)."""
        who = "the training examples"
        if self.dataset_size is not None:
            who = f"the N = {self.dataset_size:,} training examples" + (f" of {self.dataset}" if self.dataset else "")
        lines = [
            f"Guarantee: ({_fmt(self.epsilon)}, {self.delta:g})-differential privacy for {who}, under "
            f"add-or-remove-one-example adjacency, computed with the {self.accountant.upper()} accountant of "
            "Google's dp-accounting.",
        ]
        if self.mechanism is not None:
            m = self.mechanism
            lines.append(
                f"Mechanism: DP-SGD with Poisson sampling (each example joins each step independently with "
                f"probability q = {_fmt(m.sampling_rate)}), every example's gradient clipped to L2 norm C, Gaussian "
                f"noise of standard deviation σ·C (σ = {_fmt(m.noise_multiplier)}) added once per step to the sum, "
                f"T = {m.steps:,} steps.")
        if self.search:
            lines.append(f"Search: {self.search}")
        lines.append(f"Coverage: {self.validation}")
        lines.append(PUBLIC)
        seeds = ("a user-fixed private seed: the guarantee is only as strong as that seed is secret"
                 if self.seed_fixed else "256 bits from the operating system's random source")
        lines.append("Assumptions: the sampling, noise and augmentation randomness is secret (" + seeds + "); each "
                     "individual contributes at most one training example (example-level privacy)"
                     + "".join(f"; {a}" for a in self.extra_assumptions) + ".")
        lines.extend(self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon, "delta": self.delta, "accountant": self.accountant,
            "adjacency": "add_or_remove_one_example", "sampling": "poisson",
            "dataset": self.dataset, "dataset_size": self.dataset_size,
            "mechanism": None if self.mechanism is None else self.mechanism.as_dict(),
            "covers": "training examples only", "text": self.text(),
        }
