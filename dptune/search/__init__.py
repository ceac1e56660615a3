"""The search: study creation and loading, trial planning, the objective, workers, released models, audits.

Optuna over the trainer. Modules that only read a storage (:mod:`dptune.search.results`,
:mod:`dptune.search.record`, the storage schema; :mod:`dptune.search.regimes`, the privacy regimes and their
guarantee; :mod:`dptune.search.spends`, :mod:`dptune.search.storage`, :mod:`dptune.search.registry`) import no
JAX, so that :mod:`dptune.inspect` can use them; this ``__init__`` imports nothing for the same reason.
"""
