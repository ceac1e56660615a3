"""Study and search-space files: schema, loading and validation.

``studies/<name>.yaml`` says what to tune (dataset, model, privacy budget,
sampler, pruner, training budget); ``search_spaces/<name>.yaml`` says over
which ranges. Both are validated on load: an error names the file, the field
and what is allowed, and unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import reprlib
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dptune.choices import (
    Accountant,
    Clipping,
    Feed,
    Optimizer,
    Pruner,
    Sampler,
    SearchMode,
    TrialDistribution,
    listed,
)
from dptune.errors import ConfigError
from dptune.privacy.accounting import EPSILON_TOO_LARGE, MAX_EPSILON

MAX_NAME_LENGTH = 100
NAME_RULE = (f"1 to {MAX_NAME_LENGTH} characters, each a letter, a digit, '_', '.' or '-' "
             "(the name becomes a file name: studies/<name>.db)")


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a study, or None if it can."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        return f"must be {NAME_RULE}; got {len(name)} characters"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))})
    if bad:
        return f"must be {NAME_RULE}; {name!r} contains {', '.join(repr(c) for c in bad)}"
    return None


class _Strict(BaseModel):
    # Closed sets are enums (dptune.choices) whose values, not members, are stored: settings stay plain strings.
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True, validate_default=True)


class Range(_Strict):
    """A numeric range. ``high`` may be ``full`` (the training-set size) for batch_size."""

    low: float
    high: float | Literal["full"]
    log: bool = False
    grid: list[float] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.log and self.low <= 0:
            raise ValueError(f"low must be > 0 on a log scale, got {self.low}")
        if self.high != "full" and self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


class Choice(_Strict):
    """A categorical parameter."""

    choices: list[str | float] = Field(min_length=1)


Param = Range | Choice | float | str


class SearchSpace(_Strict):
    """What a trial samples. A plain value fixes a parameter instead of sampling it.

    Exactly one of ``noise_multiplier`` (steps then derived from ε) and
    ``epochs`` (σ then calibrated to ε) is given; likewise exactly one of
    ``learning_rate`` and ``effective_learning_rate`` (η = lr·C, the quantity
    that matters when most gradients are clipped).
    """

    batch_size: Param
    learning_rate: Param | None = None
    effective_learning_rate: Param | None = None
    clip_norm: Param
    noise_multiplier: Param | None = None
    epochs: Param | None = None
    optimizer: Param = "momentum"
    momentum: Param = 0.9
    ema_decay: Param = 0.0
    trainable: Param = "all"

    @field_validator("trainable")
    @classmethod
    def _trainable_values(cls, v: Param) -> Param:
        values = v.choices if isinstance(v, Choice) else [v]
        for value in values:
            if not (isinstance(value, str) and re.fullmatch(r"all|head|last_[1-9]\d*", value)):
                raise ValueError(f"{value!r} is not one of: all, head, last_<k> (k >= 1)")
        return v

    @model_validator(mode="after")
    def _one_of_each(self) -> SearchSpace:
        if (self.noise_multiplier is None) == (self.epochs is None):
            raise ValueError("give exactly one of noise_multiplier (steps derived from ε) "
                             "and epochs (σ calibrated to ε)")
        if (self.learning_rate is None) == (self.effective_learning_rate is None):
            raise ValueError("give exactly one of learning_rate and effective_learning_rate")
        return self

    @property
    def mode(self) -> Literal["sample_noise", "sample_epochs"]:
        return "sample_noise" if self.noise_multiplier is not None else "sample_epochs"

    def params(self) -> dict[str, Param]:
        """The parameters in use (sampled or fixed), by name."""
        return {k: getattr(self, k) for k in type(self).model_fields if getattr(self, k) is not None}


def _budget_epsilon(v: float | None) -> float | None:
    if v is None:
        return v
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    if v > MAX_EPSILON:
        raise ValueError(f"{v:g} is above the maximum {MAX_EPSILON:g}: {EPSILON_TOO_LARGE}")
    return v


class PrivacyConfig(_Strict):
    """The privacy budget: ``epsilon`` for each trial, or ``total_epsilon`` for the released model, tuning included.

    ``total_epsilon`` is planned at create (:mod:`dptune.privacy.total_budget`): ``proxies`` runs on a secret
    ``subset_fraction`` of the training split take ``tuning_share`` of it, one final run on all of it the rest.
    """

    epsilon: float | None = Field(default=None, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    accountant: Accountant = Accountant.PLD
    total_epsilon: float | None = Field(default=None, gt=0)
    tuning_share: float | None = Field(default=None, gt=0, lt=1)
    proxies: int | None = Field(default=None, ge=1, strict=True)
    subset_fraction: float | None = Field(default=None, gt=0, lt=1)

    _epsilon = field_validator("epsilon", "total_epsilon")(_budget_epsilon)

    @model_validator(mode="after")
    def _one_form(self) -> PrivacyConfig:
        if (self.epsilon is None) == (self.total_epsilon is None):
            raise ValueError("give exactly one of epsilon (a budget per trial) and total_epsilon (the released "
                             "model's, tuning included)")
        if self.total_epsilon is None:
            for name in ("tuning_share", "proxies", "subset_fraction"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: a setting of the total budget's plan; give total_epsilon with it")
        return self

    @property
    def total(self) -> bool:
        """Whether the budget is a total planned before the search (``total_epsilon``)."""
        return self.total_epsilon is not None


class TrialsConfig(_Strict):
    """The distribution of the number of trials in a private search."""

    distribution: TrialDistribution = TrialDistribution.GEOMETRIC
    mean: float = Field(gt=0)
    eta: float | None = Field(default=None, gt=0)


class SearchPrivacyConfig(_Strict):
    """Private search (Papernot & Steinke 2022): a random number of trials, only the best released.

    The theorem covers the training data; the score that picks the best trial
    must not leak anything else, so a new private search must take its
    validation examples from a separate public dataset (``validation_dataset``
    of the study). ``validation_public`` is kept so that studies stored by
    earlier versions still load; on its own it is no longer accepted.
    """

    total_epsilon: float = Field(gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    trials: TrialsConfig
    validation_public: bool = False

    _epsilon = field_validator("total_epsilon")(_budget_epsilon)


class SearchBudgetConfig(_Strict):
    """A cap on the whole search, enforced before each trial (a Rényi privacy filter).

    ``order`` fixes the Rényi order α of the filter before any data is seen
    (default: 1 + 2·ln(1/δ)/ε, near the best order for a composition reaching ε).
    """

    epsilon: float = Field(gt=0)
    order: float | None = Field(default=None, gt=1)

    _epsilon = field_validator("epsilon")(_budget_epsilon)


class SamplerConfig(_Strict):
    name: Sampler = Sampler.TPE
    n_startup_trials: int = Field(default=5, ge=0)


class PrunerConfig(_Strict):
    name: Pruner = Pruner.MEDIAN
    n_startup_trials: int = Field(default=3, ge=0)
    n_warmup_steps: int = Field(default=1, ge=0)
    min_resource: int = Field(default=1, ge=1)
    reduction_factor: int = Field(default=3, ge=2)


class TrainingBudget(_Strict):
    """Caps on what one trial may run, whatever the privacy budget would allow."""

    max_epochs: float | None = Field(default=10.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    min_steps: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _some_cap(self) -> TrainingBudget:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("give max_epochs or max_steps")
        return self


class CheckpointConfig(_Strict):
    """In-trial checkpoints: off by default; a trial whose worker dies resumes from the last one."""

    every_steps: int | None = Field(default=None, ge=1)
    every_minutes: float | None = Field(default=None, gt=0)

    @property
    def active(self) -> bool:
        return self.every_steps is not None or self.every_minutes is not None


class ArtifactConfig(_Strict):
    """Where a study keeps its private files (best models, checkpoints), and how many best models.

    ``path``: the study's private folder (created 0700); default: beside the
    storage file (``<storage>.dptune/<study>``), or ``~/.local/share/dptune/<study>``
    for database servers. ``keep``: the best models kept (1: the best only).
    """

    path: str | None = None
    keep: int = Field(default=1, ge=1)


class ObjectiveConfig(_Strict):
    metric: Literal["val_accuracy"] = "val_accuracy"
    direction: Literal["maximize"] = "maximize"


class AugmentationConfig(_Strict):
    """Augmentation multiplicity (De et al. 2022): K shifted/flipped copies per example, averaged before clipping."""

    multiplicity: int = Field(default=1, ge=1)
    shift: int = Field(default=0, ge=0)
    flip: bool = False


# -- cheaper tuning (dptune/search/modes.py plans and accounts each mode) ----------------------------------------
class SearchModeConfig(_Strict):
    """How a study tunes before it trains the model it releases (``search: {mode: …}``).

    ``public``: trials on the public ``dataset`` (no privacy cost), then one private
    final run. ``scaled``: trials at batch B/``factor`` and σ/``factor`` with the same
    steps (TAN, Sander et al. 2023), on the private data (or on ``dataset``), then one
    full-scale run. ``subset``: trials on a secret random ``fraction`` γ of the private
    training split (Koskela & Kulkarni 2023), then one run on all of it.
    """

    mode: SearchMode
    dataset: str | None = None
    factor: int | None = Field(default=None, ge=2, strict=True)  # "4" in quotes is a typo, not a count
    fraction: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _mode_fields(self) -> SearchModeConfig:
        need = {"public": "dataset", "scaled": "factor", "subset": "fraction"}[self.mode]
        if getattr(self, need) is None:
            raise ValueError(f"{need}: mode {self.mode} needs it")
        allowed = {"public": {"dataset"}, "scaled": {"factor", "dataset"}, "subset": {"fraction"}}[self.mode]
        for name in ("dataset", "factor", "fraction"):
            if name not in allowed and getattr(self, name) is not None:
                raise ValueError(f"{name}: not a setting of mode {self.mode} "
                                 f"(allowed: {', '.join(sorted(allowed))})")
        if self.fraction is not None and not self.fraction < 1:
            raise ValueError(f"fraction: must be in (0, 1) (the share of the training split the trials see), "
                             f"got {self.fraction:g}")
        return self


class StudyConfig(_Strict):
    """A study file. ``search_space`` names a file in ``search_spaces/`` or a path."""

    name: str
    dataset: str = "mnist5k"
    data_dir: str | None = None
    image_size: int | None = Field(default=None, ge=8)
    test_split: str = "test"
    # A built-in name (cnn, wrn16_4, resnet18, resnet50) or a factory's import path "package.module:make_model",
    # called with num_classes, input_shape and model_args (dptune.models.custom).
    model: str = "cnn"
    model_args: dict[str, Any] = {}
    # Import path of a per-example loss(logits, label) -> scalar; None: softmax cross-entropy.
    loss: str | None = None
    weight_standardization: bool = False
    privacy: PrivacyConfig | None = None
    search_privacy: SearchPrivacyConfig | None = None
    search_budget: SearchBudgetConfig | None = None
    validation_dataset: str | None = None
    objective: ObjectiveConfig = ObjectiveConfig()
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    budget: TrainingBudget = TrainingBudget()
    eval_every_epochs: float = Field(default=1.0, gt=0)
    seed: int = 0
    private_seed: int | None = None
    non_private: bool = False
    init_checkpoint: str | None = None
    unsafe_ignore_checkpoint_provenance: bool = False
    reinitialize: list[str] = []
    augmentation: AugmentationConfig = AugmentationConfig()
    microbatch_size: int | Literal["auto"] = 256
    clipping: Clipping = Clipping.AUTO
    # How batches reach the devices (dptune.trainer.feed) and how many processes decode record datasets
    # (dptune.data.pipeline).
    feed: Feed = Feed.AUTO
    loader_workers: int = Field(2, ge=0)
    device_data_fraction: float = Field(0.25, gt=0, le=1)
    storage: str | None = None
    search_space: str = "dpsgd.yaml"
    checkpoints: CheckpointConfig = CheckpointConfig()
    artifacts: ArtifactConfig = ArtifactConfig()
    search: SearchModeConfig | None = None

    @field_validator("name")
    @classmethod
    def _name_rule(cls, v: str) -> str:
        problem = check_name(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("model", "loss")
    @classmethod
    def _not_a_dataset_name(cls, v: str | None) -> str | None:
        # "tfds:…" and "arrayrecord:…" name datasets; as code they would be built as the user's model but
        # escape what dptune does for user code (its digest, the clipping it may take, the statement's assumption).
        if v is not None and v.startswith(DATASET_PREFIXES):
            raise ValueError(f"{v!r} names a dataset ({', '.join(DATASET_PREFIXES)}); give 'package.module:name'")
        return v

    @field_validator("microbatch_size")
    @classmethod
    def _positive_microbatch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be 'auto' or an integer >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> StudyConfig:
        if self.non_private:
            if self.privacy is not None or self.search_privacy is not None or self.search_budget is not None:
                raise ValueError("non_private: true takes none of privacy, search_privacy, search_budget")
            return self
        if (self.privacy is None) == (self.search_privacy is None):
            raise ValueError("give exactly one of privacy (a budget per trial) and search_privacy "
                             "(a budget for the whole search)")
        if self.privacy is not None and self.privacy.total:
            self._total_rules()
        if self.search_budget is not None and self.search_privacy is not None:
            raise ValueError("search_budget: a private search has its own total (search_privacy.total_epsilon)")
        if self.search_budget is not None and self.privacy is not None and self.privacy.epsilon is not None \
                and self.search_budget.epsilon < self.privacy.epsilon:
            # Each trial may spend its whole budget, which the cap would never admit.
            raise ValueError(f"search_budget.epsilon: {self.search_budget.epsilon:g} is below one trial's "
                             f"privacy.epsilon {self.privacy.epsilon:g}, so no trial could start; raise it to at "
                             f"least {self.privacy.epsilon:g} or lower privacy.epsilon")
        if self.search_privacy is not None and self.artifacts.keep != 1:
            raise ValueError("artifacts.keep: a private search releases only its best model (the one its "
                             f"guarantee covers); allowed: 1, got {self.artifacts.keep}")
        if self.search_privacy is not None and self.checkpoints.active:
            raise ValueError("checkpoints: a private search retries no trial (a retry would exceed the secret "
                             "number of trials), so its checkpoints could never be resumed; remove the section")
        return self

    def _total_rules(self) -> None:
        """What a total budget's plan cannot hold: another plan (a mode, a cap), a written-down subset, retries."""
        why = {"search": "the total budget plans its own proxies (on a secret subset) and final run",
               "search_budget": "the total budget is itself the cap, planned before the search",
               "private_seed": "the plan's amplification needs a subset drawn from the OS, not from a seed "
                               "written down",
               "checkpoints": "a proxy is never resumed: a retry is another of the planned proxies"}
        given = {"search": self.search is not None, "search_budget": self.search_budget is not None,
                 "private_seed": self.private_seed is not None, "checkpoints": self.checkpoints.active}
        for name, present in given.items():
            if present:
                raise ValueError(f"{name}: not with privacy.total_epsilon: {why[name]}")

    @property
    def private_search(self) -> bool:
        return self.search_privacy is not None


class ResolvedStudy(_Strict):
    """A study file with its search space loaded: everything a worker needs."""

    study: StudyConfig
    space: SearchSpace

    @model_validator(mode="after")
    def _finite_clip_norm(self) -> ResolvedStudy:
        # C bounds each example's contribution; an infinite (or non-positive) C bounds nothing.
        if self.study.non_private:
            return self
        spec = self.space.clip_norm
        values = (spec.choices if isinstance(spec, Choice) else [spec.low, spec.high] if isinstance(spec, Range)
                  else [spec])
        for v in values:
            if (problem := clip_norm_problem(v)) is not None:
                raise ValueError(f"search_space.clip_norm: {problem}")
        return self

    @model_validator(mode="after")
    def _total_budget_rules(self) -> ResolvedStudy:
        p = self.study.privacy
        if p is None or not p.total:
            return self
        for name in ("batch_size", "epochs"):
            value = getattr(self.space, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"search_space.{name}: must be a fixed number under privacy.total_epsilon, so "
                                 "that every proxy runs the one planned mechanism (σ is planned from the total)")
        return self

    @model_validator(mode="after")
    def _private_search_rules(self) -> ResolvedStudy:
        sp = self.study.search_privacy
        if sp is None:
            return self
        if not sp.validation_public and self.study.validation_dataset is None:
            raise ValueError("validation_dataset: a private search chooses the best trial by its validation "
                             "accuracy, which the theorem covers only if the validation examples are public: name "
                             "a public dataset here (e.g. digits), not a split of the private one")
        if "sampler" in self.study.model_fields_set and self.study.sampler.name != "random":
            raise ValueError(f"sampler.name: private search needs hyperparameters drawn independently; "
                             f"'{self.study.sampler.name}' is adaptive. Allowed: random")
        if "pruner" in self.study.model_fields_set and self.study.pruner.name != "none":
            raise ValueError("pruner.name: pruning is not accounted for in private search; allowed: none")
        for name in ("batch_size", "epochs"):
            value = getattr(self.space, name)
            if value is None or isinstance(value, (Range, Choice)):
                raise ValueError(f"search_space.{name}: must be a fixed value in private search, so that "
                                 "every trial runs the same mechanism (σ is calibrated to the total ε)")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResolvedStudy:
        return cls.model_validate(data)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the model at ``loc`` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann] + list(get_args(ann)) if get_origin(ann) is not None else [ann]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


PARAM_FORMS = "a number, a name, {low: …, high: …} (optionally log: true) or {choices: [...]}"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 1, 4, 4, 30, 30


def _short(value: Any) -> str:
    """A bounded repr: YAML aliases can make a small file hold a structure of billions of leaves."""
    return _REPR.repr(value)


def _param_member(loc: tuple) -> str | None:
    """Which form of a search-space parameter (``Param``) an error is about, if any."""
    if len(loc) < 2 or not isinstance(loc[1], str):
        return None
    tag = loc[1]
    return "Range" if "Range" in tag else tag if tag in ("Choice", "float", "str") else None


def _explain_param(path: str, errors: Sequence[Any]) -> ConfigError:
    """A search-space parameter matches none of its forms: say what is wrong with the form the user meant.

    Pydantic reports every form's complaint, starting with the range's, which
    misleads when the user wrote choices or a plain value.
    """
    name = errors[0]["loc"][0]
    field = f"{path}: {name}"
    value = next((e["input"] for e in errors if tuple(e["loc"]) == (name, "float")), None)
    if value is None:
        return ConfigError(field, f"is empty; give {PARAM_FORMS}")
    if isinstance(value, list):
        return ConfigError(field, f"is a list; to sample from values write {{choices: {_short(value)}}}")
    if not isinstance(value, dict):
        return ConfigError(field, f"{_short(value)} is not allowed; give {PARAM_FORMS}")
    meant = "Choice" if "choices" in value else "Range" if {"low", "high"} & set(value) else None
    if meant is None:
        return ConfigError(field, f"has keys {', '.join(map(str, value))}; give {PARAM_FORMS}")
    e = next(e for e in errors if _param_member(tuple(e["loc"])) == meant)
    rest = tuple(e["loc"][2:])
    if e["type"] == "extra_forbidden":
        allowed = "choices" if meant == "Choice" else "low, high, log, grid"
        return ConfigError(field, f"unknown key {rest[-1]!r}; allowed: {allowed}")
    if e["type"] == "missing":
        return ConfigError(field, f"a range needs both low and high; {rest[-1]} is missing")
    if meant == "Choice" and rest[:1] == ("choices",) and len(rest) > 1 and isinstance(rest[1], int):
        bad = e["input"]
        return ConfigError(f"{field}.choices", f"choice {rest[1] + 1} is a {type(bad).__name__}, {_short(bad)}; each "
                                               "choice must be a single number or name")
    where = ".".join(str(p) for p in rest if not isinstance(p, int))
    msg = e["msg"].removeprefix("Value error, ")
    return ConfigError(f"{field}.{where}" if where else field, msg)


def _constraint(ctx: dict) -> str:
    words = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    return " and ".join(f"{words[k]} {v}" for k, v in ctx.items() if k in words)


def _explain(path: str, model: type[BaseModel], err: ValidationError) -> ConfigError:
    errors = err.errors()
    e = errors[0]
    if _param_member(tuple(e["loc"])) is not None:
        return _explain_param(path, [x for x in errors if x["loc"][:1] == e["loc"][:1]])
    loc = tuple(p for p in e["loc"] if not isinstance(p, int))
    # Union members add their type names to the location; keep only field names.
    fields = tuple(p for p in loc if p[:1].islower() and not p.startswith(("literal", "function", "union")))
    field = ".".join(str(p) for p in fields) or "(top level)"
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, fields[:-1]) or []
        return ConfigError(f"{path}: {field}", f"unknown key; allowed: {', '.join(allowed)}")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] in ("literal_error", "enum"):
        msg = "must be one of " + str(e.get("ctx", {}).get("expected", ""))
    value = e.get("input")
    if isinstance(value, float) and math.isnan(value):
        bound = _constraint(e.get("ctx") or {})
        msg = f"is .nan, not a number; it must be a number{' ' + bound if bound else ''}"
    return ConfigError(f"{path}: {field}", msg)


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(path, "file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise ConfigError(path, "must be a mapping of keys to values")
    return data


def parse(path: str, model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _explain(path, model, e) from None


def search_space_path(name: str, study_file: str | None = None) -> str:
    """Resolve a search-space reference: an existing path, else a file of that name.

    Looked for beside the study file, in ``search_spaces/`` beside the study
    file's folder, then in ``./search_spaces``.
    """
    if os.path.isfile(name):
        return name
    bases = []
    if study_file:
        here = Path(study_file).resolve().parent
        bases += [here, here.parent / "search_spaces"]
    bases.append(Path.cwd() / "search_spaces")
    for base in bases:
        candidate = base / name
        if candidate.is_file():
            # Relative to the working folder where possible: it appears in messages.
            return str(candidate.relative_to(Path.cwd())) if candidate.is_relative_to(Path.cwd()) else str(candidate)
    raise ConfigError("search_space", f"{name!r} not found (looked in {', '.join(str(b) for b in bases)})")


def load_search_space(path: str) -> SearchSpace:
    return parse(path, SearchSpace, _read_yaml(path))


def load_study(path: str) -> ResolvedStudy:
    """Read and validate a study file and the search space it names (:func:`resolve` of a path)."""
    return resolve(path)


def default_storage(name: str) -> str:
    """``sqlite:///studies/<name>.db`` relative to the current directory."""
    return f"sqlite:///{os.path.join('studies', name + '.db')}"


# -- one run, the Python API and the command line ---------------------------------------------------------------

def default(field: str) -> Any:
    """The schema's default for a top-level study setting: the one place each default is written.

    Raises:
      KeyError: ``field`` is not a setting of :class:`StudyConfig`.
    """
    return _plain(StudyConfig.model_fields[field].get_default(call_default_factory=True))


def _plain(value: Any) -> Any:
    # A closed set's default is written as its enum member; settings hold the plain string.
    return value.value if isinstance(value, Enum) else value


def _real(value: Any) -> float | None:
    """``value`` as a float where it is a real number (NumPy's included; booleans and strings are not)."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def clip_norm_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as the clip norm C of private training (None: nothing).

    C bounds each example's contribution: an infinite (or non-positive) C bounds nothing.
    """
    v = _real(value)
    if v is None or not (math.isfinite(v) and v > 0):
        return f"must be a finite number > 0 in private training, got {value}"
    return None


def batch_size_problem(value: Any, num_examples: int) -> str | None:
    """What is wrong with ``value`` as the expected batch B of a training split of ``num_examples`` (None: nothing)."""
    v = _real(value)
    if v is None or not (math.isfinite(v) and v == int(v) and 1 <= v <= num_examples):
        return f"must be in [1, {num_examples}] (the training-set size), got {value}"
    return None


class Hyperparameters(_Strict):
    """The hyperparameters of one run (``dptune train``, :func:`dptune.train`), with their defaults.

    A study samples these from its search space; a single run fixes them.
    ``noise_multiplier`` None: σ is calibrated so that ``epochs`` fit the privacy budget.
    :meth:`for_steps` gives the trainer's :class:`Hyperparams` once σ is known.
    """

    batch_size: int = Field(700, ge=1)
    learning_rate: float = Field(4.0, gt=0)
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float | None = Field(None, ge=0)
    epochs: float = Field(8.0, gt=0)
    optimizer: Optimizer = Optimizer.MOMENTUM
    momentum: float = Field(0.9, ge=0, lt=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    trainable: str = "all"

    @field_validator("learning_rate", "clip_norm", "epochs", "noise_multiplier")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    _trainable = field_validator("trainable")(SearchSpace._trainable_values.__func__)  # type: ignore[attr-defined]

    def for_steps(self, noise_multiplier: float) -> Hyperparams:
        """What the steps use: these hyperparameters with σ decided (``epochs`` has become a number of steps)."""
        return Hyperparams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Hyperparams)
                              if f.name != "noise_multiplier"}, noise_multiplier=noise_multiplier)


def _hp_default(name: str) -> Any:
    return _plain(Hyperparameters.model_fields[name].get_default(call_default_factory=True))


@dataclasses.dataclass(frozen=True)
class Hyperparams:
    """What the steps of one run use: :class:`Hyperparameters` with σ decided and no ``epochs``.

    ``batch_size`` is the *expected* logical batch B = qN. Defaults are :class:`Hyperparameters`'s,
    except σ (1.0; the schema's None means "calibrate", which the trainer does not do). Nothing is
    checked on construction, so that the trainer names the bad field of a run: see :meth:`validate`.
    """

    batch_size: int
    learning_rate: float
    clip_norm: float = _hp_default("clip_norm")
    noise_multiplier: float = 1.0
    optimizer: str = _hp_default("optimizer")
    momentum: float = _hp_default("momentum")
    ema_decay: float = _hp_default("ema_decay")
    trainable: str = _hp_default("trainable")

    def validate(self, num_examples: int, private: bool) -> None:
        """Raises ConfigError (naming the field) for what no run of ``num_examples`` examples can use."""
        if (problem := batch_size_problem(self.batch_size, num_examples)) is not None:
            raise ConfigError("batch_size", problem)
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError("learning_rate", f"must be a finite number > 0, got {self.learning_rate}")
        if private and (problem := clip_norm_problem(self.clip_norm)) is not None:
            raise ConfigError("clip_norm", problem)
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError("noise_multiplier", f"must be a finite number >= 0, got {self.noise_multiplier}")
        if self.optimizer not in tuple(Optimizer):
            raise ConfigError("optimizer", f"unknown {self.optimizer!r}; allowed: {listed(Optimizer)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1) (0 = off), got {self.ema_decay}")


# What a single run uses where a study file would be required to say it.
RUN_DEFAULTS: dict[str, Any] = {"name": "train", "privacy": {"epsilon": 3.0}}


def import_object(path: str, field: str) -> Any:
    """The object that ``"package.module:name"`` names.

    Raises:
      ConfigError: the path has no ``:``, the module cannot be imported, or has no such name (naming ``field``).
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(field, f"{path!r} is not an import path; write 'package.module:name'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # As `python -m` does: the user's modules are found from the working folder (the `dptune` script's
        # own folder is first on the path otherwise).
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a user's module may fail in any way on import
        raise ConfigError(field, f"cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(field, f"{module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


# Dataset names with a colon that are not import paths.
DATASET_PREFIXES = ("tfds:", "arrayrecord:")


def is_import_path(name: str | None) -> bool:
    """Whether a model, dataset or loss setting names the user's code (``"package.module:name"``)."""
    return bool(name) and ":" in str(name) and not str(name).startswith(DATASET_PREFIXES)


def import_path(obj: Any, field: str) -> str:
    """``"module:qualname"`` of a module-level function or class, so that a study can name it (and workers import it).

    Raises:
      ConfigError: a lambda or a nested function (it has no import path).
    """
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    main = sys.modules.get("__main__")
    if module == "__main__" and getattr(main, "__spec__", None) is not None:
        module = main.__spec__.name  # type: ignore[union-attr]  # run as `python -m package.module`: its real name
    if not module or not qualname or "<" in qualname:
        raise ConfigError(field, f"{obj!r} has no import path; define it at the top level of a module")
    return f"{module}:{qualname}"


# Settings that may be given as Python objects (functions, classes): they are stored as import paths.
_CALLABLE_SETTINGS = ("model", "dataset", "loss", "validation_dataset")


def _named(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (import_path(v, k) if k in _CALLABLE_SETTINGS and callable(v) else v) for k, v in data.items()}


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


Overrides = dict[str, Any] | Sequence[str | tuple[str, Any]]


def apply_overrides(data: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """``data`` with dotted-key overrides applied, in order.

    Args:
      data: a study file's keys.
      overrides: ``{"budget.max_epochs": 20}``, or a sequence of ``"budget.max_epochs=20"`` texts
        (values read as YAML: ``20`` is a number, ``[a, b]`` a list) and ``(key, value)`` pairs.

    Returns:
      A new dict; nothing is validated here: the result goes through the schema once, like a file.

    Raises:
      ConfigError: an override text that is not ``KEY=VALUE``.
    """
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        for text in overrides:
            if isinstance(text, tuple):
                items.append(text)
                continue
            key, sep, value = text.partition("=")
            if not sep or not key.strip():
                raise ConfigError("--set", f"expected KEY=VALUE with a dotted KEY (e.g. budget.max_epochs=20), "
                                           f"got {text!r}")
            items.append((key.strip(), _parse_value(value)))
    out: dict[str, Any] = dict(data)
    for key, value in items:
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return out


ConfigLike = Union[str, "os.PathLike[str]", dict, StudyConfig, ResolvedStudy]


def _settings_data(config: ConfigLike | None, overrides: Overrides | None, *, with_space: bool
                   ) -> tuple[dict[str, Any], str]:
    """A study's keys from any form of configuration, with overrides applied and objects named; and their source."""
    source = "config"
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, ResolvedStudy):
        data = config.study.model_dump(mode="json", exclude_unset=True)
        if with_space:
            data["search_space"] = config.space.model_dump(mode="json", exclude_none=True)
    elif isinstance(config, StudyConfig):
        data = config.model_dump(mode="json", exclude_unset=True)
    elif isinstance(config, dict):
        data = dict(config)
    else:
        source = os.fspath(config)
        data = _read_yaml(source)
    if overrides:
        data = apply_overrides(data, overrides)
    return _named(data), source


def resolve(config: ConfigLike, overrides: Overrides | None = None) -> ResolvedStudy:
    """A validated study (settings and search space) from a file, a dict, a :class:`StudyConfig` or a resolved study.

    Args:
      config: a study file's path; a dict with the file's keys (``search_space`` may be a dict of the
        search space itself, or the name of a search-space file); a :class:`StudyConfig`; a :class:`ResolvedStudy`.
      overrides: dotted-key overrides applied before validation (``{"budget.max_epochs": 20}``).

    Returns:
      The study with its search space, validated once by the schema.

    Raises:
      ConfigError: a value the schema refuses, naming the file (or "config") and the field.
    """
    if isinstance(config, ResolvedStudy) and not overrides:
        return config
    data, source = _settings_data(config, overrides, with_space=True)
    inline = data.get("search_space")
    if isinstance(inline, dict):
        data = {**data, "search_space": "(inline)"}
    study = parse(source, StudyConfig, data)
    if study.private_search:
        defaults = {"sampler": SamplerConfig(name="random"), "pruner": PrunerConfig(name="none")}
        study = study.model_copy(update={k: v for k, v in defaults.items() if k not in study.model_fields_set})
    if isinstance(inline, dict):
        space_file, space = f"{source}: search_space", parse(f"{source}: search_space", SearchSpace, inline)
    else:
        space_file = search_space_path(study.search_space, source if source != "config" else None)
        space = load_search_space(space_file)
    try:
        return ResolvedStudy(study=study, space=space)
    except ValidationError as e:
        msg = e.errors()[0]["msg"].removeprefix("Value error, ")
        if msg.startswith("search_space."):
            name, _, rest = msg.removeprefix("search_space.").partition(": ")
            raise ConfigError(f"{space_file}: {name}", rest) from None
        raise ConfigError(source, msg) from None


def run_settings(config: ConfigLike | None = None, overrides: Overrides | None = None
                 ) -> StudyConfig:
    """The settings of a single run: a study file or dict (its search space is not needed), defaults for the rest.

    Raises:
      ConfigError: a value the schema refuses.
    """
    data, source = _settings_data(config, overrides, with_space=False)
    if data.get("search_privacy") is not None:
        raise ConfigError(f"{source}: search_privacy", "a single run takes privacy: {epsilon: …} (its own budget), "
                                                       "not the budget of a whole private search")
    if isinstance(data.get("privacy"), dict) and data["privacy"].get("total_epsilon") is not None:
        raise ConfigError(f"{source}: privacy.total_epsilon", "a single run takes privacy: {epsilon: …} (its own "
                                                               "budget); a total budget plans a whole search")
    merged: dict[str, Any] = {k: v for k, v in RUN_DEFAULTS.items() if k not in data}
    if isinstance(data.get("privacy"), dict):
        # --delta or --accountant alone keep the default ε: defaults merge key by key.
        merged["privacy"] = {**RUN_DEFAULTS["privacy"], **data["privacy"]}
    if data.get("non_private") and "privacy" not in data:
        merged.pop("privacy", None)  # a non-private baseline takes no budget
    if data.get("search_budget") is not None:
        raise ConfigError(f"{source}: search_budget", "a single run is not admitted by a search's privacy filter "
                                                      "and is not added to its total; remove search_budget for "
                                                      "dptune train (the run states its own ε)")
    return parse(source, StudyConfig, {**data, **merged})
