"""dptune: tune differentially private training under a fixed privacy budget.

The public API. Everything ``dptune`` does on the command line is one call here::

    import dptune

    study = dptune.create_study("studies/mnist5k_eps3.yaml", storage="sqlite:///my.db")
    dptune.optimize(study, n_trials=8)
    summary = dptune.summarize(study)            # counts, best trial, the search's ε
    print(dptune.privacy_statement(study).text())

    run = dptune.train({"dataset": "digits", "privacy": {"epsilon": 3.0}},
                       hyperparameters={"batch_size": 256, "epochs": 4})
    dptune.epsilon(sampling_rate=256 / 60000, noise_multiplier=1.1, steps=14000, delta=1e-5)

Names are imported when first used, so that ``import dptune`` is cheap and
reading a study (:func:`summarize`, :func:`search_guarantee`) never loads JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# name -> module that defines it (the layer it lives in).
_API = {
    # studies: create, load, optimize (dptune.search)
    "create_study": "dptune.search.study",
    "load_study": "dptune.search.study",
    "optimize": "dptune.search.study",
    "finalize": "dptune.search.finalize",  # a cheaper-tuning study's final run
    # reading results, no JAX (dptune.search.results)
    "summarize": "dptune.search.results",
    "search_guarantee": "dptune.search.results",
    "privacy_statement": "dptune.search.results",
    "trial_record": "dptune.search.results",
    "StudySummary": "dptune.search.results",
    # the released model (dptune.search.release)
    "load_model": "dptune.search.release",
    "export_model": "dptune.search.release",
    # one run (dptune.trainer.run)
    "train": "dptune.trainer.run",
    "pretrain": "dptune.trainer.run",
    "TrainRun": "dptune.trainer.run",
    # settings (dptune.config.schema)
    "StudyConfig": "dptune.config.schema",
    "SearchSpace": "dptune.config.schema",
    "Hyperparameters": "dptune.config.schema",
    "resolve_config": "dptune.config.schema",
    # the privacy calculator, no JAX (dptune.privacy)
    "epsilon": "dptune.privacy.accounting",
    "noise_for_epsilon": "dptune.privacy.accounting",
    "max_steps": "dptune.privacy.accounting",
    "default_delta": "dptune.privacy.accounting",
    "search_epsilon": "dptune.privacy.search_totals",
    "noise_for_search": "dptune.privacy.search_totals",
    "TrialCount": "dptune.privacy.search_totals",
    "Statement": "dptune.privacy.statement",
    # typed errors (dptune.errors)
    "DptuneError": "dptune.errors",
    "ConfigError": "dptune.errors",
    "DataError": "dptune.errors",
    "PrivacyError": "dptune.errors",
    "StudyError": "dptune.errors",
}
# Public names whose definition has another name in its module.
_RENAMED = {"resolve_config": "resolve"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'dptune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from dptune.config.schema import Hyperparameters, SearchSpace, StudyConfig
    from dptune.config.schema import resolve as resolve_config
    from dptune.errors import ConfigError, DataError, DptuneError, PrivacyError, StudyError
    from dptune.privacy.accounting import default_delta, epsilon, max_steps, noise_for_epsilon
    from dptune.privacy.search_totals import TrialCount, noise_for_search, search_epsilon
    from dptune.privacy.statement import Statement
    from dptune.search.finalize import finalize
    from dptune.search.release import export_model, load_model
    from dptune.search.results import StudySummary, privacy_statement, search_guarantee, summarize, trial_record
    from dptune.search.study import create_study, load_study, optimize
    from dptune.trainer.run import TrainRun, pretrain, train
