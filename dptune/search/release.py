"""The released model: the best trial's parameters as an Optuna artifact, exported, loaded, used.

**Keeping the best model.** A trial's selected parameters (raw or EMA) are
written to an owner-only *pending* file when its training ends
(:func:`pending_path`). Once the trial's value is in the storage (an
``optimize`` callback, after Optuna's ``tell``), :func:`keep_best` decides from
the storage, not from anything held in the process, whether the trial is among
the ``keep`` best COMPLETE trials; if so its parameters and metadata are
uploaded as an Optuna artifact of the study (``optuna.artifacts.upload_artifact``
to a :class:`optuna.artifacts.FileSystemArtifactStore`), and every stored model
no longer among the best is removed (file and listing).

Why this is safe with several workers: a trial's own value is in the storage
before it decides, and the set of COMPLETE trials only grows. So a trial that
ends among the final best was among the best of every subset it saw and
uploads; and of a trial A that uploads and a trial B that beats it, whichever
removes second sees both (A's upload precedes A's removal pass; B's tell
precedes B's pass): a superseded model is always removed by one of them.

Why the study and not the trial: Optuna refuses writes to a finished trial,
and a trial is known to be the best only once it has finished; the artifact's
listing could then never be removed from a superseded trial. Study artifacts
are listed on the study's page in optuna-dashboard, named after their trial
(``best-model-trial-7.msgpack``; in a private search, whose trial numbers are
internal, ``best-model.msgpack``), and downloadable there.

**Sensitivity.** A model trained on private data is as sensitive as the
guarantee allows it to be public: artifacts, pending files and checkpoints live
in the study's private folder (0700, files 0600), by default beside the storage
file (:func:`study_folder`), never under a public path.

**Export.** :func:`export_model` writes the released model (Flax msgpack with
the metadata inside, ``metadata.json`` beside it) and the written privacy
statement of the search: the honest search total at the time of export
(``privacy_statement.txt``). In a private search only the best model is kept
and exported, and only once the search is complete (what its guarantee covers);
its exported metadata leaves out what would reveal the secret number of trials.
:func:`load_model` rebuilds the model and checks the metadata against it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune import interrupt
from dptune.errors import ConfigError, DptuneError
from dptune.search import modes, record
from dptune.search import storage as storage_lib
from dptune.search.record import StudyRecord
from dptune.trainer.resume import private_dir, write_private

MODEL_FILE = "model.msgpack"
METADATA_FILE = "metadata.json"
STATEMENT_FILE = "privacy_statement.txt"
INDEX_PREFIX = record.BEST_MODEL_PREFIX
ARTIFACTS_ATTR_PREFIX = record.ARTIFACTS_PREFIX
FORMAT = "dptune-model-1"


class ReleaseError(DptuneError):
    """A model cannot be saved, exported or loaded."""


# -- where -----------------------------------------------------------------------------

STUDY_ID_ATTR = record.STUDY_ID


def new_study_id() -> str:
    """A fresh random study id (128 bits from the OS), stored at creation under :data:`STUDY_ID_ATTR`."""
    return secrets.token_hex(16)


def study_id(study: optuna.Study, storage_url: str | None = None) -> str:
    """What tells this study apart from every other one of its name, anywhere.

    The random id stored at creation; for a study created before dptune stored
    one, a digest of the storage's own id of the study, its name and the start
    time of its trial 0, which a study deleted and created again under the same
    name (even with the same storage id) does not share. Nothing is written, so
    concurrent workers cannot disagree.
    """
    b = storage_lib.backend(study, storage_url)
    stored = b.system_attrs().get(STUDY_ID_ATTR)
    if stored:
        return str(stored)
    try:
        first = b.trial(0)
        started = "" if first.datetime_start is None else first.datetime_start.isoformat()
    except KeyError:
        started = ""
    return hashlib.sha256(f"{b.study_id}\n{study.study_name}\n{started}".encode()).hexdigest()[:32]


def study_folder(storage_url: str, study_name: str, study_id: str, configured: str | None = None, *,
                 create: bool = True) -> str:
    """The study's private folder (created 0700 unless ``create`` is False): artifacts, pending models, checkpoints.

    ``<base>/<study name>/<study id>``, where the base is the study file's
    ``artifacts.path`` if set, otherwise beside the storage file
    (``<storage file>.dptune``), or, for database servers,
    ``~/.local/share/dptune``. The study's random id keeps apart what two
    studies of one name left (a study deleted and created again, same-named
    studies on two database servers, studies sharing one ``artifacts.path``):
    a checkpoint or pending model of another study is never found.
    """

    if configured:
        base = os.path.expanduser(configured)
    else:
        path = storage_lib.file_of(storage_url)
        base = (path + ".dptune" if path is not None
                else os.path.join(os.path.expanduser("~"), ".local", "share", "dptune"))
    if not re.fullmatch(r"[0-9a-f]{8,64}", study_id):
        raise ReleaseError(f"study id: {study_id!r} is not a hexadecimal id")
    # realpath: "journal:////abs" names "//abs", which os.path keeps and Optuna's store then refuses.
    folder = os.path.realpath(os.path.join(base, study_name, study_id))
    return private_dir(folder) if create else folder


def _folder_of(study: optuna.Study, storage_url: str, create: bool = True) -> str:
    cfg = StudyRecord.of(study).study_config
    return study_folder(storage_url, study.study_name, study_id(study, storage_url),
                        (cfg.get("artifacts") or {}).get("path"), create=create)


def folder_of(study: optuna.Study, storage_url: str, create: bool = True) -> str:
    """The private folder of a loaded study (see :func:`study_folder`)."""
    return _folder_of(study, storage_url, create)


SEED_FILE = "private_seed"
SEED_FIXED_ATTR = record.SEED_FIXED


def keep_private_seed(study: optuna.Study, storage_url: str, seed: int) -> None:
    """Write a study's fixed ``private_seed`` owner-only in its private folder.

    Whoever reads the storage must not be able to recompute a trial's batches or noise, so the seed
    lives beside the models and checkpoints, as secret as they are, and workers read it from there.
    """
    write_private(os.path.join(_folder_of(study, storage_url), SEED_FILE), str(int(seed)).encode())


def private_seed(study: optuna.Study, storage_url: str) -> int:
    """The fixed ``private_seed`` :func:`keep_private_seed` wrote.

    Raises:
      ReleaseError: it cannot be read here (a worker that does not share the study's private folder).
    """
    path = os.path.join(_folder_of(study, storage_url, create=False), SEED_FILE)
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        raise ReleaseError(f"private_seed: this study's fixed seed is kept owner-only in {path}, which cannot be "
                           "read here; run where that folder is (artifacts.path can point every worker to one "
                           "shared folder)") from None


def artifact_store(study: optuna.Study, storage_url: str) -> optuna.artifacts.FileSystemArtifactStore:
    """The study's artifact store: a :class:`FileSystemArtifactStore` in its private folder."""
    return optuna.artifacts.FileSystemArtifactStore(private_dir(os.path.join(_folder_of(study, storage_url),
                                                                             "artifacts")))


def pending_path(folder: str, trial_number: int) -> str:
    """Where a finished trial's parameters wait until its value is in the storage."""
    return os.path.join(private_dir(os.path.join(folder, "pending")), f"trial-{trial_number}.msgpack")


def checkpoint_folder(folder: str, origin: int) -> str:
    """The in-trial checkpoints of a trial and its retries (``origin``: the first attempt's number)."""
    return os.path.join(private_dir(os.path.join(folder, "checkpoints")), f"trial-{origin}")


# -- the file ---------------------------------------------------------------------------

def model_bytes(params: Any, meta: dict[str, Any]) -> bytes:
    """A Flax msgpack file of ``{"params", "dptune_metadata"}`` (the metadata travels inside)."""
    from flax import serialization

    from dptune.models.checkpoint import _to_numpy

    return serialization.msgpack_serialize({"params": _to_numpy(params),
                                            "dptune_metadata": json.dumps(meta, default=str)})


def read_model_bytes(data: bytes) -> tuple[Any, dict[str, Any]]:
    """(params, metadata) of :func:`model_bytes`' output."""
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(data)
        return tree["params"], json.loads(tree["dptune_metadata"])
    except Exception as e:  # msgpack raises several kinds on garbage
        raise ReleaseError(f"model: not a dptune model file ({type(e).__name__})") from None


# -- keeping the best -------------------------------------------------------------------------

def _stored(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """{artifact_id: entry} of the best models stored now (removed ones are listed as null)."""
    out = {}
    for key, value in storage_lib.backend(study).system_attrs().items():
        if key.startswith(INDEX_PREFIX) and value:
            entry = json.loads(value) if isinstance(value, str) else value
            if entry:
                out[key[len(INDEX_PREFIX):]] = entry
    return out


def best_models(study: optuna.Study) -> list[dict[str, Any]]:
    """The stored best models, best first: each ``artifact_id``, ``trial``, ``value``, ``filename``, ``sha256``."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    entries = [dict(e, artifact_id=a) for a, e in _stored(study).items()]
    return sorted(entries, key=lambda e: ((-e["value"] if maximize else e["value"]), e["trial"]))


def _ranking(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials, best first (ties: the earlier trial first), as the storage holds them now."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
            and not modes.is_proxy(t)]  # a mode releases its final run, not a proxy
    return sorted(done, key=lambda t: ((-cast(float, t.value) if maximize else cast(float, t.value)), t.number))


def _keep(study: optuna.Study) -> int:
    return int((StudyRecord.of(study).study_config.get("artifacts") or {}).get("keep", 1))


def model_metadata(study: optuna.Study, trial: FrozenTrial, checkpoint_meta: dict[str, Any]) -> dict[str, Any]:
    """What a best model says about itself: model, data, hyperparameters, privacy of the trial and the search."""
    from dptune.search.regimes import regime_of

    rec = StudyRecord.of(study)
    cfg = rec.study_config
    regime = regime_of(rec)
    private_search = regime.secret_count
    # In a private search whatever the guarantee says now (complete or not, how many trials have run) depends
    # on the secret K: it is not computed, and only the regime's name is kept.
    guarantee = ({"mode": "private_search"} if private_search
                 else regime.guarantee(study.get_trials(deepcopy=False)).as_dict())
    meta = {
        "format": FORMAT,
        "model": checkpoint_meta["model"],
        "model_args": {"weight_standardization": bool(checkpoint_meta.get("weight_standardization"))},
        # A user's model factory's keyword arguments, loss and input kind (dptune.models.custom).
        "factory_args": dict(checkpoint_meta.get("model_args") or {}),
        "loss": checkpoint_meta.get("loss"),
        "input_dtype": checkpoint_meta.get("input_dtype", "float32"),
        "pixels": bool(checkpoint_meta.get("pixels", True)),
        "input_shape": list(checkpoint_meta["image_shape"]),
        "num_classes": int(checkpoint_meta["num_classes"]),
        "parameters": checkpoint_meta.get("parameters", "raw"),
        "dataset": cfg.get("dataset"),
        "data_dir": cfg.get("data_dir"),
        "image_size": cfg.get("image_size"),
        "test_split": cfg.get("test_split", "test"),
        "validation_dataset": cfg.get("validation_dataset"),
        "split": rec.split or checkpoint_meta.get("split"),
        "hyperparameters": {**dict(trial.params), **record.released_hparams(trial)},
        "steps": record.get(trial, record.STEPS),
        "val_accuracy": trial.value,
        "test_accuracy": record.get(trial, record.TEST_ACCURACY),
        "study": study.study_name,
        "trial_privacy": None if cfg.get("non_private") else _trial_privacy(study, trial),
        # Exports replace it with the total at export.
        "search_guarantee_at_save": ({"mode": guarantee.get("mode")} if private_search else
                                     {k: guarantee.get(k) for k in ("mode", "total_epsilon", "delta", "guarantee")}),
        "private_search": private_search,
        "lineage": selected_lineage(study, checkpoint_meta.get("lineage"), exported=False),
    }
    if not private_search:
        meta["trial"] = trial.number
    return meta


def selected_lineage(study: optuna.Study, lineage: list[dict[str, Any]] | None, *, exported: bool
                     ) -> list[dict[str, Any]] | None:
    """The lineage of a model the search selected: what it started from, then the whole search as one entry.

    The model was chosen among every trial (and proxy, audit, final run) that read the data, so
    continuing from it composes all of them, not only its own run: the entry lists those runs, and
    where the search's cost is a bound rather than their composition (a privacy filter's cap, a
    private search's repeat-and-select bound, which also covers a private initial checkpoint's
    recorded runs, then counted twice) it carries the bound. A private search lists no runs: their
    number is its secret K. ``exported``: only an exported model's entry is final
    (:func:`dptune.models.checkpoint.prior_spend` refuses a copy taken while the search ran).
    """
    if not lineage or not lineage[-1].get("private"):
        return lineage
    from dptune.search.regimes import study_guarantee
    from dptune.search.spends import resumed_spends, touched_data

    g = study_guarantee(study)
    entry: dict[str, Any] = {"dataset": lineage[-1].get("dataset"), "private": True,
                             "search": {"study": study.study_name, "exported": exported}}
    trials = study.get_trials(deepcopy=False)
    runs = resumed_spends(trials, [t for t in trials if touched_data(t)]) if g.lists_runs else []
    entry["events"] = [list(e) for e in runs]
    if g.bound:
        entry["bound"] = [g.epsilon, g.delta]
    return [*lineage[:-1], entry]


def _trial_privacy(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The trial's own ε, over all its attempts.

    A trial whose retry resumed a dead attempt's run by replaying it is one run;
    one whose replay diverged released the dead attempt's outputs too, as a run
    of its own (:func:`dptune.search.results.resumed_spends`): then the trial's ε is the
    composition of those runs (RDP), not its last attempt's alone.
    """
    from dptune.privacy.search_totals import composed_epsilon
    from dptune.search.spends import resumed_spends

    out = record.trial_privacy(trial)
    events = resumed_spends(study.get_trials(deepcopy=False), [trial])
    own = [record.own_run(trial)]
    if events and events != own and out["delta"]:
        out.update(epsilon=composed_epsilon(events, float(out["delta"]))["rdp"], accountant="rdp",
                   attempts=[list(e) for e in events])
    return out


def keep_best(study: optuna.Study, trial: FrozenTrial, storage_url: str) -> str | None:
    """After ``trial`` is told: store its model if it is among the best, drop superseded ones.

    Reads the pending file the trial's training wrote (and deletes it). Returns
    the artifact id uploaded, or None. Safe under concurrent workers (module docstring).
    """
    storage_lib.backend(study, storage_url)  # the study's storage, also for a study opened without dptune
    folder = _folder_of(study, storage_url)
    pending = os.path.join(folder, "pending", f"trial-{trial.number}.msgpack")
    uploaded = None
    if os.path.exists(pending):
        if trial.state == TrialState.COMPLETE and trial.number in [t.number for t in _ranking(study)[:_keep(study)]]:
            # A failure here leaves the pending file for sweep_pending to try again.
            uploaded = _upload(study, trial, pending, storage_url)
        for path in (pending, pending + ".json"):
            if os.path.exists(path):
                os.unlink(path)
    prune(study, storage_url)
    return uploaded


def _upload(study: optuna.Study, trial: FrozenTrial, pending: str, storage_url: str) -> str:
    from dptune.models import checkpoint

    params = checkpoint.load(pending)
    meta = model_metadata(study, trial, checkpoint.metadata(pending))
    data = model_bytes(params, meta)
    name = "best-model.msgpack" if meta["private_search"] else f"best-model-trial-{trial.number}.msgpack"
    # Optuna names the artifact after the uploaded file: stage it under its final name, in a folder of its own.
    staging_dir = tempfile.mkdtemp(prefix=".upload-", dir=os.path.dirname(pending))
    staging = os.path.join(staging_dir, name)
    try:
        write_private(staging, data)
        store = artifact_store(study, storage_url)
        artifact_id = optuna.artifacts.upload_artifact(artifact_store=store, file_path=staging, study_or_trial=study,
                                                       mimetype="application/x-msgpack")
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    # FileSystemArtifactStore copies with the process umask: the model is as secret as the data.
    os.chmod(os.path.join(_folder_of(study, storage_url), "artifacts", artifact_id), 0o600)
    entry = {"trial": trial.number, "value": trial.value, "filename": name,
             "sha256": hashlib.sha256(data).hexdigest()}
    storage_lib.backend(study).set_system_attr(INDEX_PREFIX + artifact_id, json.dumps(entry))
    return artifact_id


def prune(study: optuna.Study, storage_url: str) -> list[str]:
    """Remove the stored models whose trial is no longer among the ``keep`` best; returns their ids."""
    storage_lib.backend(study, storage_url)  # the study's storage, also for a study opened without dptune
    keep = set(t.number for t in _ranking(study)[:_keep(study)])
    store = None
    removed = []
    for artifact_id, entry in _stored(study).items():
        if entry["trial"] in keep:
            continue
        store = store or artifact_store(study, storage_url)
        try:
            store.remove(artifact_id)
        except optuna.artifacts.exceptions.ArtifactNotFound:
            pass  # another worker removed it first
        # As optuna-dashboard's own delete does: the listing becomes null (study attributes cannot be deleted).
        b = storage_lib.backend(study)
        b.set_system_attr(ARTIFACTS_ATTR_PREFIX + artifact_id, json.dumps(None))
        b.set_system_attr(INDEX_PREFIX + artifact_id, json.dumps(None))
        removed.append(artifact_id)
    return removed


def sweep_pending(study: optuna.Study, storage_url: str) -> None:
    """Finish what a worker that died between its trial's end and :func:`keep_best` left pending."""
    storage_lib.backend(study, storage_url)  # the study's storage, also for a study opened without dptune
    folder = os.path.join(_folder_of(study, storage_url, create=False), "pending")
    if not os.path.isdir(folder):  # nothing to do, and nothing is created (a read-only storage stays untouched)
        return
    for name in os.listdir(folder):
        if not (name.startswith("trial-") and name.endswith(".msgpack")):
            continue
        try:
            number = int(name[len("trial-"):-len(".msgpack")])
            trial = storage_lib.backend(study).trial(number)
        except (ValueError, KeyError):
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            keep_best(study, trial, storage_url)


# -- export and load -------------------------------------------------------------------------

def export_model(study: optuna.Study, storage_url: str, directory: str) -> dict[str, Any]:
    """Write the study's released model to ``directory``: model, metadata and privacy statement.

    Guarantee: the statement written is the search's (:func:`dptune.search.results.privacy_statement`),
    computed at export time over every trial that trained on the data; it is what
    releasing this model costs, not the trial's own ε.

    Returns:
      The metadata written.

    Raises:
      ReleaseError: no completed trial, no stored model for the best trial, a
        private search not yet complete, or ``directory`` exists and is not empty.
    """
    storage_lib.backend(study, storage_url)  # the study's storage, also for a study opened without dptune
    from dptune.search.results import privacy_statement, summarize

    summary = summarize(study)
    if summary.best is None and StudyRecord.of(study).search_mode is not None:
        raise ReleaseError(f"study_name: {study.study_name!r} is not finalized: its proxies chose the settings, and "
                           "the model released is the final run's (dptune study finalize runs it)")
    if summary.best is None:
        raise ReleaseError(f"study_name: {study.study_name!r} has no completed trial yet")
    if summary.private_search and not summary.guarantee.complete:
        raise ReleaseError("export_model: the private search is not complete; its guarantee holds only once every "
                           "drawn trial has run (run dptune optimize until it is)")
    number = summary.best["number"]
    stored = [e for e in best_models(study) if e["trial"] == number]
    if not stored:
        which = "" if summary.private_search else f" {number}"  # a private search keeps trial numbers secret
        raise ReleaseError(f"export_model: no saved model for the best trial{which} "
                           "(a study run before dptune kept best models, or its worker died before saving it)")
    entry = stored[0]
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise ReleaseError(f"export_model: {directory} exists and is not an empty folder; choose a new one")
    store = artifact_store(study, storage_url)
    with store.open_reader(entry["artifact_id"]) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ReleaseError(f"export_model: the stored model of the best trial fails its checksum "
                           f"({entry['artifact_id']})")
    params, meta = read_model_bytes(data)
    statement = privacy_statement(study, summary)
    release = summary.release()
    meta = dict(meta, search=release["search"], statement=None if statement is None else statement.text(),
                lineage=selected_lineage(study, meta.get("lineage"), exported=True))
    # What the guarantee said when the model was saved is stale (and, in a private search, would depend on K):
    # the export carries only the total computed now, over every trial that trained on the data.
    meta.pop("search_guarantee_at_save", None)
    if summary.private_search:
        meta.pop("trial", None)
    out = model_bytes(params, meta)
    meta["sha256"] = hashlib.sha256(out).hexdigest()
    files = {MODEL_FILE: out, METADATA_FILE: json.dumps(meta, indent=1, default=str).encode(),
             STATEMENT_FILE: ((statement.text() if statement else "No privacy guarantee: a non-private baseline.")
                              + "\n").encode()}
    try:
        _write_folder(directory, files)
    except OSError as e:
        raise ReleaseError(f"export_model: cannot write {directory}: {e.strerror or e}") from None
    return meta


_STAGING = ".export-"


def _write_folder(directory: str, files: dict[str, bytes]) -> None:
    """Create ``directory`` (0700) holding ``files`` (0600), whole or not at all.

    The files are staged in a sibling folder named after this process and renamed into place; a
    signal waits for the rename or the cleanup, and what a killed export left is removed by the next.
    """
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    _sweep_staging(parent)
    with interrupt.deferred():
        staging = tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=parent)  # 0700, like the destination
        try:
            for name, data in files.items():
                write_private(os.path.join(staging, name), data)
            if os.path.isdir(directory):
                os.rmdir(directory)
            os.replace(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    os.chmod(directory, 0o700)


def _sweep_staging(parent: str) -> None:
    """Remove the staging folders of exports whose process is gone (SIGKILL, power loss)."""
    for name in os.listdir(parent):
        pid = name[len(_STAGING):].split("-", 1)[0]
        if not (name.startswith(_STAGING) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


@dataclass
class LoadedModel:
    """A released model: call it on images to get logits.

    ``model(x)``: x is an array of images (N, H, W, C) — uint8 pixels (normalised
    as in training) or float32 already in [-1, 1]; returns logits (N, classes).
    ``predict(x)`` returns class indices.
    """

    metadata: dict[str, Any]
    params: Any
    module: Any

    def __post_init__(self) -> None:
        import jax

        self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

    def __call__(self, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
        from dptune.data.datasets import normalize

        x = np.asarray(x)
        shape = tuple(self.metadata["input_shape"])
        if x.ndim == len(shape):
            x = x[None]
        if tuple(x.shape[1:]) != shape:
            raise ReleaseError(f"x: inputs of shape {tuple(x.shape[1:])}, the model takes {shape}")
        pixels = self.metadata.get("pixels", True)
        if pixels and x.dtype == np.uint8:
            x = normalize(x)
        dtype = np.float32 if pixels else np.dtype(self.metadata.get("input_dtype", "float32"))
        out = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size].astype(dtype)
            n = len(chunk)
            if n < batch_size:  # one shape: one compilation
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), dtype)])
            out.append(np.asarray(self._apply(self.params, chunk))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.metadata["num_classes"]), np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self(x), axis=-1)

    def accuracy(self, split: Any, batch_size: int = 500) -> float:
        """Accuracy on a dataset split (an object with ``take(positions)`` and ``len``)."""
        correct = 0
        for start in range(0, len(split), batch_size):
            x, y = split.take(np.arange(start, min(len(split), start + batch_size)))
            correct += int(np.sum(self.predict(x) == y))
        return correct / len(split)


def load_model(directory: str) -> LoadedModel:
    """Load an exported model, checking its files and metadata against the model they build.

    Raises:
      ReleaseError: a file is missing, the model file fails its checksum or
        carries other metadata than ``metadata.json``, or the parameters do not
        fit the model the metadata names (a CheckpointError says which leaves).
    """
    from dptune.models import checkpoint
    from dptune.models.builtin import build_model, init_params

    try:
        with open(os.path.join(directory, METADATA_FILE)) as f:
            meta = json.load(f)
        with open(os.path.join(directory, MODEL_FILE), "rb") as f:
            data = f.read()
    except OSError as e:
        raise ReleaseError(f"model: {directory}: {e.strerror} ({e.filename})") from None
    except ValueError:
        raise ReleaseError(f"model: {directory}/{METADATA_FILE} is not JSON") from None
    if meta.get("format") != FORMAT:
        raise ReleaseError(f"model: {directory} is not a dptune model export (format {meta.get('format')!r})")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ReleaseError(f"model: {directory}/{MODEL_FILE} does not match the checksum in {METADATA_FILE}")
    params, inner = read_model_bytes(data)
    sidecar = {k: v for k, v in meta.items() if k != "sha256"}
    if json.loads(json.dumps(inner, default=str)) != json.loads(json.dumps(sidecar, default=str)):
        raise ReleaseError(f"model: the metadata inside {MODEL_FILE} differs from {METADATA_FILE}")
    import jax

    try:
        module = build_model(meta["model"], int(meta["num_classes"]),
                             weight_standardization=bool(meta["model_args"].get("weight_standardization")),
                             input_shape=tuple(meta["input_shape"]), args=meta.get("factory_args") or {})
    except ConfigError as e:
        raise ReleaseError(f"model: {METADATA_FILE} names a model dptune cannot build: {e}") from None
    fresh = init_params(module, tuple(meta["input_shape"]), jax.random.key(0), meta.get("input_dtype", "float32"))
    # Every leaf present with the shape the named model has, nothing extra: else the metadata lies.
    fitted = checkpoint.fit(fresh, params)
    return LoadedModel(metadata=meta, params=jax.device_put(fitted), module=module)


def dataset_for(meta: dict[str, Any], dataset: str | None = None, data_dir: str | None = None) -> Any:
    """The dataset a model's metadata records (its split rebuilt from the recorded seed), checked against it.

    With ``validation_dataset`` recorded, the validation split is that (public) dataset's, as in the study.
    """
    import dataclasses

    from dptune.data.datasets import load_dataset

    split = meta.get("split") or {}
    name = dataset or meta["dataset"]
    data = load_dataset(name, data_dir=data_dir or meta.get("data_dir"), seed=int(split.get("seed", 0)),
                        image_size=meta.get("image_size"), test_split=meta.get("test_split") or "test")
    if dataset is None or dataset == meta["dataset"]:
        if split and data.split.as_dict() != split:
            raise ReleaseError(f"dataset: {name!r} is not split as when the model was trained ({split} then, "
                               f"{data.split.as_dict()} now)")
    if tuple(data.image_shape) != tuple(meta["input_shape"]) or data.num_classes != int(meta["num_classes"]):
        raise ReleaseError(f"dataset: {name!r} has inputs {tuple(data.image_shape)} in {data.num_classes} classes; "
                           f"the model takes {tuple(meta['input_shape'])} in {meta['num_classes']} classes")
    if meta.get("validation_dataset"):
        public = load_dataset(meta["validation_dataset"], data_dir=data_dir or meta.get("data_dir"),
                              seed=int(split.get("seed", 0)), image_size=meta.get("image_size"))
        data = dataclasses.replace(data, validation=public.validation)
    return data
