"""Every closed set of names a user can choose from, each written once.

The study schema validates against these, the command line offers them as
``choices``, and the trainer and the accountants check their inputs against
them. They sit at the bottom of the package so that every layer, the
accountants included, can use them. Each is a :class:`enum.StrEnum`: a member
*is* its string, so ``Clipping.FAST == "fast"`` and settings stay plain strings
in files, JSON and the Python API.
"""

from __future__ import annotations

from enum import StrEnum


class Clipping(StrEnum):
    """How per-example gradients are clipped (:mod:`dptune.trainer.dp_step`)."""

    AUTO = "auto"
    BOOKKEEPING = "bookkeeping"
    FAST = "fast"
    VMAP = "vmap"
    NORMALIZE = "normalize"


class Feed(StrEnum):
    """How batches reach the devices (:mod:`dptune.trainer.feed`)."""

    AUTO = "auto"
    RESIDENT = "resident"
    STREAMED = "streamed"
    LOOP = "loop"


class Optimizer(StrEnum):
    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"


class Accountant(StrEnum):
    """The privacy accountants (:mod:`dptune.privacy.accounting`)."""

    PLD = "pld"
    RDP = "rdp"


class TrialDistribution(StrEnum):
    """The law of the number of trials of a private search (:mod:`dptune.privacy.search_totals`)."""

    POISSON = "poisson"
    TRUNCATED_NEGATIVE_BINOMIAL = "truncated_negative_binomial"
    GEOMETRIC = "geometric"
    LOGARITHMIC = "logarithmic"


class Sampler(StrEnum):
    """Optuna's samplers a study may name."""

    TPE = "tpe"
    RANDOM = "random"
    GP = "gp"
    CMAES = "cmaes"
    GRID = "grid"


class Pruner(StrEnum):
    """Optuna's pruners a study may name."""

    MEDIAN = "median"
    SUCCESSIVE_HALVING = "successive_halving"
    ASHA = "asha"
    HYPERBAND = "hyperband"
    NONE = "none"


class SearchMode(StrEnum):
    """Where a study's trials train before its one final run (:mod:`dptune.search.modes`)."""

    PUBLIC = "public"
    SCALED = "scaled"
    SUBSET = "subset"


class ThreatModel(StrEnum):
    """What the adversary of ``dptune audit`` sees."""

    WHITE_BOX = "white-box"
    BLACK_BOX = "black-box"


class LogFormat(StrEnum):
    """How progress is written to stderr."""

    AUTO = "auto"
    TEXT = "text"
    JSON = "json"


def listed(choices: type[StrEnum]) -> str:
    """``"a, b, c"``: the values of a closed set, for messages and help texts."""
    return ", ".join(c.value for c in choices)


def values(choices: type[StrEnum]) -> list[str]:
    """The values of a closed set, in order (as ``argparse`` choices, say)."""
    return [c.value for c in choices]
