"""Samplers and pruners by name: what a study file's ``sampler:`` and ``pruner:`` sections build (no JAX)."""

from __future__ import annotations

import importlib.util

import optuna

from dptune.config.schema import SearchSpace, StudyConfig
from dptune.errors import ConfigError


def make_sampler(study: StudyConfig, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler a study file names."""
    name = study.sampler.name
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.sampler.n_startup_trials)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=study.sampler.n_startup_trials)
    if name == "gp":
        if importlib.util.find_spec("torch") is None:
            raise ConfigError("sampler.name", "'gp' needs PyTorch installed (pip install torch); "
                              "allowed without it: tpe, random, cmaes, grid")
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=study.sampler.n_startup_trials)
    if name == "grid":
        grid: dict[str, list] = {}
        for pname, spec in space.params().items():
            values = getattr(spec, "grid", None) or getattr(spec, "choices", None)
            if values is None and hasattr(spec, "low"):
                raise ConfigError(f"search_space.{pname}", "the grid sampler needs 'grid: [values]' for every range")
            if values is not None:
                grid[pname] = list(values)
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ConfigError("sampler.name", f"unknown {name!r}")


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The Optuna pruner a study file names (steps are evaluation counts)."""
    p = study.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name in ("successive_halving", "asha"):
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                      reduction_factor=p.reduction_factor)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()
