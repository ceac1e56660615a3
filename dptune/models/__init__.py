"""Models: the built-in networks, their layers, freezing, and model checkpoints with their provenance.

Flax and orbax; imports :mod:`dptune.errors` only (and its own modules).
"""
