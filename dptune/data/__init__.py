"""Data: datasets and their deterministic splits, the record pipeline, Poisson sampling, augmentation.

NumPy and grain, no model code: imports :mod:`dptune.errors`, :mod:`dptune.randomness` and :mod:`dptune.seams`.
"""
