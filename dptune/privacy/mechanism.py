"""One DP-SGD run as an accountant sees it: the mechanism (q, σ, T). No JAX here.

A tuple underneath, so that a study stored as ``[[q, σ, T], …]`` reads back as
mechanisms and two equal runs are equal (and hash alike) however they were
built; the fields name what each number is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class Mechanism(NamedTuple):
    """DP-SGD with Poisson sampling rate q and noise multiplier σ, run for T steps."""

    sampling_rate: float
    noise_multiplier: float
    steps: int

    @classmethod
    def of(cls, raw: Sequence[Any]) -> Mechanism:
        """A mechanism from a stored ``[q, σ, T]`` (JSON has no tuples)."""
        q, sigma, steps = raw
        return cls(float(q), float(sigma), int(steps))

    def with_steps(self, steps: int) -> Mechanism:
        return self._replace(steps=int(steps))

    def as_dict(self) -> dict[str, Any]:
        return dict(self._asdict())


def mechanisms(raw: Iterable[Sequence[Any]] | None) -> tuple[Mechanism, ...]:
    """Stored ``[[q, σ, T], …]`` (or mechanisms already) as mechanisms."""
    return tuple(Mechanism.of(r) for r in (raw or ()))


# A stored or hand-written (q, σ, T): what the public accounting functions take, read as a Mechanism.
MechanismLike = Mechanism | tuple[float, float, int]
