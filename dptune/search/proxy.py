"""Running a cheaper-tuning study's trials: the proxies, and the claim of its final run (:func:`claim_final`).

The final run itself is :func:`dptune.search.finalize.finalize`.

The rules (what a proxy runs, how its hyperparameters transfer, how it is
accounted) are in :mod:`dptune.search.modes`; this module builds the data and
the plan each trial trains with. The objective calls :meth:`ModeRunner.setup`
in place of its own planning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from dptune import interrupt
from dptune.config.schema import ResolvedStudy
from dptune.data.datasets import ArraySplit, Dataset, RecordSplit, load_dataset
from dptune.errors import ConfigError, DataError, StudyError
from dptune.randomness import SecretSeed
from dptune.search import modes, record
from dptune.search import storage as storage_lib
from dptune.search.orphans import worker_identity
from dptune.search.space import Infeasible, TrialPlan, plan_trial
from dptune.trainer.train import Hyperparams, PrivacyBudget

__all__ = ["FinalizeRefused", "ModeRunner", "TrialSetup", "claim_final", "public_dataset",
           "secret_subset", "start_trial", "subset_dataset"]


def public_dataset(resolved: ResolvedStudy) -> Dataset | None:
    """The public dataset a mode's proxies train on (None if the mode names none).

    Raises:
      ConfigError: it cannot be read.
    """
    cfg = resolved.study
    if cfg.search is None or cfg.search.dataset is None:
        return None
    try:
        return load_dataset(cfg.search.dataset, data_dir=cfg.data_dir, seed=cfg.seed, image_size=cfg.image_size)
    except DataError as e:
        raise ConfigError("search.dataset", str(e).removeprefix("dataset: ")) from None


def shared_examples(private: Dataset, public: Dataset, chunk_bytes: int = 1 << 26) -> int | None:
    """How many of ``public``'s inputs (train, validation, test) equal a private training input, as stored or as seen.

    Names cannot tell that two datasets hold the same individuals (the same
    arrays under another import path, a copy with its labels remapped); equal
    inputs can be found. Inputs are compared as the model receives them (pixels
    normalised, as float64 values, so uint8 and int32 copies match), without
    their labels, and as stored (a loader may hand the same pixels over as
    integers). Only digests are compared, in memory: nothing is stored.

    Returns:
      The count, or None when nothing was compared: a split not held in memory
      (record datasets are not read through at create) or of another input
      shape; the statement then says it was not checked.
    """
    mine, theirs = private.train, [public.train, public.validation, public.test]
    if not isinstance(mine, ArraySplit) or not all(isinstance(x, ArraySplit) for x in theirs):
        return None
    others = [x for x in theirs if isinstance(x, ArraySplit)]

    def digests(split: ArraySplit) -> list[tuple[bytes, bytes]]:
        # Each input twice: its stored values and what the model receives (one loader may call the same
        # uint8 pixels images, another raw integers), tagged so that the two kinds never match each other.
        out: list[tuple[bytes, bytes]] = []
        row_bytes = max(1, int(np.prod(split.images.shape[1:])) * 8)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, len(split), step):
            rows = np.arange(start, min(start + step, len(split)))
            stored, given = (np.ascontiguousarray(x, dtype=np.float64) for x in (split.images[rows],
                                                                                split.take(rows)[0]))
            out += [(hashlib.blake2b(b"stored" + a.tobytes(), digest_size=16).digest(),
                     hashlib.blake2b(b"input" + b.tobytes(), digest_size=16).digest()) for a, b in zip(stored, given,
                                                                                                  strict=True)]
        return out

    if any(x.images.shape[1:] != mine.images.shape[1:] for x in others):
        return None  # nothing compared (another input shape is refused at create for that reason)
    private_inputs = {d for pair in digests(mine) for d in pair}
    return sum(1 for x in others for a, b in digests(x) if a in private_inputs or b in private_inputs)


def secret_subset(num_examples: int, fraction: float, secret: SecretSeed) -> np.ndarray:
    """Positions of a random subset of the training split: each example in it independently w.p. ``fraction``.

    Guarantee: the choice depends only on ``secret`` (never on the public seed),
    and each example's membership is independent of every other's, so that
    adding or removing one example changes only its own membership: a DP-SGD
    run on the subset at a public rate q is, for the whole split, no less
    private than DP-SGD at q (add-or-remove adjacency). Its size is as secret
    as the data.
    """
    if not 0 < fraction < 1:
        raise ConfigError("search.fraction", f"must be in (0, 1), got {fraction}")
    coins = secret.child("subset tuning").sampler().random(num_examples)
    return np.flatnonzero(coins < fraction)


SUBSET_SECRET = modes.SUBSET_SECRET


def subset_secret(folder: str) -> tuple[SecretSeed, str]:
    """The study's subset secret and its public id, created on first use in the study's private folder.

    256 bits from the OS and a random 64-bit id, written owner-only (0600) and
    published atomically (``os.link`` of a complete file: a second worker
    either finds the whole file or creates it, never a half-written one).

    Returns:
      (secret, id). The id is random, not derived from the secret: it tells
      nothing about which examples are in the subset.
    """
    import secrets as _secrets

    path = os.path.join(folder, SUBSET_SECRET)
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".subset-")  # mkstemp creates it 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"secret": _secrets.token_hex(32), "id": _secrets.token_hex(8)}, f)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another worker published first: use its subset
        finally:
            os.unlink(tmp)
    with open(path) as f:
        stored = json.load(f)
    return SecretSeed(bytes.fromhex(stored["secret"])), str(stored["id"])


def subset_dataset(data: Dataset, positions: np.ndarray) -> Dataset:
    """``data`` whose training split holds only ``positions`` (validation, test and split record unchanged)."""
    train = data.train
    if isinstance(train, ArraySplit):
        part: Any = ArraySplit(train.images[positions], train.labels[positions], pixels=train.pixels)
    elif isinstance(train, RecordSplit):
        part = RecordSplit(train.source, train.indices[positions], train.decode)
    else:
        raise ConfigError("search.mode", f"subset tuning cannot take a subset of a {type(train).__name__}")
    return dataclasses.replace(data, train=part)


@dataclass
class TrialSetup:
    """What one trial of a mode trains: the plan that runs, its data, its budget, and what to record."""

    plan: TrialPlan
    dataset: Dataset
    budget: PrivacyBudget
    touched: bool  # reads the private training split (counted in the search's ε)
    final: bool
    sampling_rate: float | None = None  # the subset's public rate (its size is secret)
    attrs: dict[str, Any] = field(default_factory=dict)


class ModeRunner:
    """Plans each trial of a study with ``search: {mode: …}`` (one per worker process)."""

    def __init__(self, resolved: ResolvedStudy, private: Dataset, budget: PrivacyBudget, mode: dict[str, Any],
                 study_name: str, folder: str | None = None, study_id: str = "",
                 fixed: tuple[float, int] | None = None, final_budget: PrivacyBudget | None = None):
        self.resolved = resolved
        self.private = private
        self.budget = budget
        # A planned mechanism (σ, T) every proxy runs, and the final run's own budget (a total budget's plan).
        self.fixed, self.final_budget = fixed, final_budget
        self.mode = mode
        self.kind = modes.proxy_mode(mode)  # what this mode's proxies train, and how
        self.public = public_dataset(resolved)
        self.study_name = study_name
        self._subset: Dataset | None = None
        self.subset_positions: np.ndarray | None = None  # secret: never recorded anywhere
        self.folder = folder  # the study's private folder (owner-only), where the subset's secret lives
        self.study_id = study_id  # the study's random id (dptune.search.release.study_id)
        self.subset_id: str | None = None  # public: which subset a proxy read (the accounting groups by it)
        self.claimed: int | None = None  # the final run this process's finalize claimed (claim_final)

    def subset(self) -> Dataset:
        """The private data restricted to the study's secret subset (drawn once, shared by its workers).

        One subset for the whole study is what lets the tuning be amplified by
        the subsampling (:func:`dptune.privacy.search_totals.subset_tuning_epsilon`).
        Its secret comes from the study's fixed ``private_seed``, or else from
        the OS, kept owner-only in the study's private folder so that every
        worker that shares the folder draws the same subset
        (:func:`subset_secret`). Each proxy records the subset's public id;
        proxies on more than one subset are composed without amplification.
        """
        if self._subset is None:
            seed = self.resolved.study.private_seed
            if seed is not None:
                # Keyed on the study's random id, not only its name: a study deleted and created again, or the
                # same file in a second storage, draws another subset (two studies on one subset would each
                # claim the amplification for themselves).
                secret = SecretSeed.from_int(seed).child(f"study {self.study_name} {self.study_id}")
                self.subset_id = f"{modes.FIXED_SUBSET_PREFIX}{self.study_id}"
            else:
                if self.folder is None:
                    raise StudyError("subset tuning needs the study's private folder for its secret subset")
                secret, self.subset_id = subset_secret(self.folder)
            self.subset_positions = secret_subset(len(self.private.train), float(self.mode["fraction"]), secret)
            self._subset = subset_dataset(self.private, self.subset_positions)
        return self._subset

    def setup(self, trial: optuna.Trial) -> TrialSetup:
        """Sample (or, for the final run, read) the trial's plan and say what it trains on.

        Raises:
          Infeasible: the sample cannot train within the budget (the trial is then pruned, unread data).
        """
        cfg = self.resolved.study
        if record.is_final(trial):
            if trial.number != self.claimed:
                # A queued copy (Optuna's heartbeat retry copies a stale trial's attributes), or a final run
                # another process claimed: only the claim makes a final run the study's one.
                raise Infeasible("a final run trains only in the finalize call that claimed it; run dptune study "
                                 "finalize again")
            stored = record.get(trial, record.FINAL_PLAN)
            hp = Hyperparams(**stored["hparams"])
            plan = TrialPlan(hparams=hp, steps=int(stored["steps"]), sampling_rate=float(stored["sampling_rate"]),
                             max_steps_by_budget=int(stored["steps"]), derived="transferred")
            return TrialSetup(plan, self.private, self.final_budget or self.budget, touched=True, final=True)
        others = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number]
        if any(modes.is_final(t) for t in others):
            # After finalize no proxy may start: the tuning must read the data only through its proxies (and, for
            # subset tuning, only through the subset) before the final run, or its accounting does not hold. Read
            # after this trial was numbered: a final run claimed earlier is seen here, and one claimed later
            # waits for this trial to finish (finalize), so either way the released lineage counts it.
            with contextlib.suppress(RuntimeError):  # outside optimize (a direct call) there is no loop to stop
                trial.study.stop()
            raise Infeasible("the study is finalized (its final run is recorded or running): no more proxies")
        data = self.kind.data(self)
        assert data is not None
        full = plan_trial(self.kind.sampler(trial), self.resolved.space, len(data.train), self.budget, cfg.budget,
                          self.fixed)
        scale = {record.BATCH_SIZE: full.hparams.batch_size, record.SAMPLING_RATE: full.sampling_rate,
                 record.NOISE_MULTIPLIER: full.hparams.noise_multiplier, record.STEPS: full.steps,
                 "epochs": full.epochs}
        attrs: dict[str, Any] = {record.PROXY: True, record.FULL_SCALE: scale}
        run = self.kind.proxy(self, full, data, attrs)
        if self.fixed is not None:  # a total budget's proxies: one subset, whatever machine runs them
            _same_subset(others, attrs.get(record.SUBSET_ID))
        return TrialSetup(run.plan, run.data, run.budget, touched=run.data is not self.public, final=False,
                          sampling_rate=run.sampling_rate, attrs=attrs)


def _same_subset(others: list[optuna.trial.FrozenTrial], subset_id: str | None) -> None:
    """Refuse, before it reads anything, a planned proxy whose subset is not the earlier proxies' one.

    A worker whose private folder holds another secret (a second machine that does not share the study's
    artifacts folder) would draw another subset: the plan's amplification holds for one.

    Raises:
      Infeasible: the earlier proxies recorded another subset (the trial is pruned, unread data).
    """
    read = {record.get(t, record.SUBSET_ID) for t in others if modes.is_proxy(t)} - {None}
    if subset_id is None or read - {subset_id}:
        raise Infeasible("this worker's secret subset is not the one the plan's earlier proxies read: machines "
                         "that share a total-budget study must share its artifacts folder (artifacts.path)")


class FinalizeRefused(StudyError):
    """The study's final run is held by another ``finalize`` call, or recorded: this call trained nothing."""


def claim_final(study: optuna.Study, plan: dict[str, Any], source: int) -> FrozenTrial:
    """Create the final run's trial, RUNNING and marked final in one storage write, or refuse.

    Creating a trial is the write every storage makes atomically with its
    number (SQLite and PostgreSQL in one locked transaction, the journal in
    one log entry), so the trial is marked final before any later-numbered
    trial exists: of two calls the later-numbered one finds the earlier and
    gives way, and a proxy numbered after it finds it at the gate
    (:meth:`ModeRunner.setup`). A queued (WAITING) trial would not do: on
    SQLite two processes can both take one WAITING trial (Optuna's
    WAITING-to-RUNNING check is a read, then a write) and both train it.

    Raises:
      FinalizeRefused: an earlier final run holds the study (this trial is then recorded as refused).
    """
    b = storage_lib.backend(study)
    attrs = {record.FINAL: True, record.FINAL_PLAN: plan, record.FINAL_SOURCE: source,
             record.TOUCHED_DATA: False, record.WORKER: worker_identity()}
    mine = b.storage.get_trial(start_trial(study, attrs))
    held = modes.holding_final(b.storage.get_all_trials(b.study_id, deepcopy=False), below=mine.number)
    if held is not None:
        _refuse(study, mine.number, f"trial {held.number} is this study's final run")
        raise FinalizeRefused(f"study_name: {study.study_name!r}: another finalize claimed the final run first "
                              f"(trial {held.number}, {held.state.name.lower()}); this call read no data")
    return mine


def start_trial(study: optuna.Study, user_attrs: dict[str, Any]) -> int:
    """Create a RUNNING trial that holds ``user_attrs`` from its first write on; returns its storage id.

    Unlike ``study.ask()``, it never takes a queued (WAITING) trial, whose
    attributes (a retried proxy's, a copied final run's) would then describe
    another run than the one recorded.
    """
    b = storage_lib.backend(study)
    template = FrozenTrial(number=0, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(),
                           datetime_complete=None, params={}, distributions={}, user_attrs=user_attrs,
                           system_attrs={}, intermediate_values={}, trial_id=0)
    return b.storage.create_new_trial(b.study_id, template_trial=template)


def _refuse(study: optuna.Study, number: int, reason: str) -> None:
    """Record a claimed final run that never read the data as refused (it holds nothing and costs nothing)."""
    b = storage_lib.backend(study)
    trial_id = b.trial_id(number)
    with interrupt.deferred(), contextlib.suppress(UpdateFinishedTrialError):
        for key, value in record.rejected_attrs(reason).items():
            b.storage.set_trial_user_attr(trial_id, key, value)
        b.storage.set_trial_state_values(trial_id, TrialState.PRUNED)

