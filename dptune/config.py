"""Study and search-space files: schema, loading and validation.

``studies/<name>.yaml`` says what to tune (dataset, model, privacy budget,
sampler, pruner, training budget); ``search_spaces/<name>.yaml`` says over
which ranges. Both are validated on load: an error names the file, the field
and what is allowed, and unknown keys are errors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dptune.errors import ConfigError

SAMPLERS = ("tpe", "random", "gp", "cmaes", "grid")
PRUNERS = ("median", "successive_halving", "asha", "hyperband", "none")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """A numeric range. ``high`` may be ``full`` (the training-set size) for batch_size."""

    low: float
    high: Union[float, Literal["full"]]
    log: bool = False
    grid: list[float] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.log and self.low <= 0:
            raise ValueError(f"low must be > 0 on a log scale, got {self.low}")
        if self.high != "full" and self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        return self


class Choice(_Strict):
    """A categorical parameter."""

    choices: list[Union[str, float]] = Field(min_length=1)


Param = Union[Range, Choice, float, str]


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

    @model_validator(mode="after")
    def _one_of_each(self) -> "SearchSpace":
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


class PrivacyConfig(_Strict):
    epsilon: float = Field(gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    accountant: Literal["pld", "rdp"] = "pld"

    @field_validator("epsilon")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be finite")
        return v


class SamplerConfig(_Strict):
    name: Literal["tpe", "random", "gp", "cmaes", "grid"] = "tpe"
    n_startup_trials: int = Field(default=5, ge=0)


class PrunerConfig(_Strict):
    name: Literal["median", "successive_halving", "asha", "hyperband", "none"] = "median"
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
    def _some_cap(self) -> "TrainingBudget":
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("give max_epochs or max_steps")
        return self


class ObjectiveConfig(_Strict):
    metric: Literal["val_accuracy"] = "val_accuracy"
    direction: Literal["maximize"] = "maximize"


class StudyConfig(_Strict):
    """A study file. ``search_space`` names a file in ``search_spaces/`` or a path."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    dataset: str = "mnist5k"
    data_dir: str | None = None
    image_size: int | None = Field(default=None, ge=8)
    test_split: str = "test"
    model: str = "cnn"
    weight_standardization: bool = False
    privacy: PrivacyConfig
    objective: ObjectiveConfig = ObjectiveConfig()
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    budget: TrainingBudget = TrainingBudget()
    eval_every_epochs: float = Field(default=1.0, gt=0)
    seed: int = 0
    private_seed: int | None = None
    microbatch_size: int = Field(default=256, ge=1)
    storage: str | None = None
    search_space: str = "dpsgd.yaml"


class ResolvedStudy(_Strict):
    """A study file with its search space loaded: everything a worker needs."""

    study: StudyConfig
    space: SearchSpace

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ResolvedStudy":
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


def _explain(path: str, model: type[BaseModel], err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not isinstance(p, int))
    # Union members add their type names to the location; keep only field names.
    fields = tuple(p for p in loc if p[:1].islower() and not p.startswith(("literal", "function", "union")))
    field = ".".join(str(p) for p in fields) or "(top level)"
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, fields[:-1]) or []
        return ConfigError(f"{path}: {field}", f"unknown key; allowed: {', '.join(allowed)}")
    msg = e["msg"]
    if e["type"] == "literal_error":
        msg = "must be one of " + str(e.get("ctx", {}).get("expected", ""))
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
            return str(candidate)
    raise ConfigError("search_space", f"{name!r} not found (looked in {', '.join(str(b) for b in bases)})")


def load_search_space(path: str) -> SearchSpace:
    return parse(path, SearchSpace, _read_yaml(path))


def load_study(path: str) -> ResolvedStudy:
    """Read and validate a study file and the search space it names."""
    study = parse(path, StudyConfig, _read_yaml(path))
    space_file = search_space_path(study.search_space, path)
    return ResolvedStudy(study=study, space=load_search_space(space_file))


def default_storage(name: str) -> str:
    """``sqlite:///studies/<name>.db`` relative to the current directory."""
    return f"sqlite:///{os.path.join('studies', name + '.db')}"
