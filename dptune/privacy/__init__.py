"""The privacy layer: accounting, the privacy cost of a search, written guarantees.

Pure Python over dp-accounting: no JAX, nothing of dptune above it (it imports
only :mod:`dptune.errors`). Everything here is a calculation on public
quantities (q, σ, steps, δ, the trial-count law); nothing touches data.
"""

from dptune.privacy.accounting import (  # noqa: F401
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    PrivacySpend,
    default_delta,
    epsilon,
    max_steps,
    noise_for_epsilon,
)
