"""The DP-SGD trainer: the compiled DP step, clipping, feeding devices, the training loop and its checkpoints.

JAX, no Optuna: a run reports through a callback. Imports the layers below it
(:mod:`dptune.privacy`, :mod:`dptune.config`, :mod:`dptune.data`, :mod:`dptune.models`).
"""
