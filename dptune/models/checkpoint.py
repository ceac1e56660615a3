"""Model checkpoints for transfer learning: save a parameter tree, load one, fit it to a model.

Format: a Flax msgpack file (``flax.serialization``) holding ``{"params": tree}``
— or a bare parameter tree, as ``flax.serialization.to_bytes(params)`` writes —
plus, for checkpoints dptune writes, a ``<file>.json`` beside it saying what
produced it (model, dataset, image shape, accuracy). An Orbax checkpoint
directory (``orbax.checkpoint``) is read too.

A checkpoint is public information only if the data it was trained on is
public: ``dptune pretrain`` asks the user to declare that, and the study records
which checkpoint each trial started from. dptune's metadata also records the
checkpoint's *lineage*: every dataset its parameters were trained on, whether
privately, and the DP-SGD runs (q, σ, T) spent on it. :func:`prior_spend` reads
it before a run starts: a checkpoint trained without privacy on the dataset
being protected is refused, and a private one continued on the same data adds
its recorded runs to the new run's ε.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dptune.errors import ConfigError

PyTree = Any


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or does not fit the model."""

    def __init__(self, message: str):
        super().__init__("checkpoint", message)


def save(path: str, params: PyTree, meta: dict[str, Any]) -> None:
    """Write ``params`` (msgpack) and ``meta`` (JSON beside it), each atomically."""
    from flax import serialization

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    host = _to_numpy(params)
    # The metadata also travels inside the file: a copy without the .json keeps its lineage.
    packed = serialization.msgpack_serialize({"params": host, "dptune_metadata": json.dumps(meta, default=str)})
    for target, data in ((path, packed),
                         (path + ".json", json.dumps(meta, indent=1, default=str).encode())):
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)


def _to_numpy(tree: PyTree) -> PyTree:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def metadata(path: str) -> dict[str, Any]:
    """The metadata dptune wrote with a checkpoint ({} for checkpoints from elsewhere).

    Read from inside the msgpack file, or from the ``.json`` beside it.
    """
    if os.path.isfile(path):
        from flax import serialization

        try:
            with open(path, "rb") as f:
                tree = serialization.msgpack_restore(f.read())
            if isinstance(tree, dict) and isinstance(tree.get("dptune_metadata"), str):
                return json.loads(tree["dptune_metadata"])
        except Exception:  # not msgpack: fall back to the sidecar
            pass
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def fingerprint(path: str) -> str:
    """SHA-256 of a checkpoint's bytes (every file of a directory, by relative path) and its ``.json``."""
    path = os.path.expanduser(path)
    h = hashlib.sha256()
    files = ([os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
             if os.path.isdir(path) else [path])
    for f in sorted(files + ([path + ".json"] if os.path.isfile(path + ".json") else [])):
        h.update(os.path.relpath(f, os.path.dirname(path)).encode())
        try:
            with open(f, "rb") as fh:
                h.update(fh.read())
        except OSError:
            raise CheckpointError(f"{path}: cannot be read") from None
    return h.hexdigest()


def dataset_identity(name: str) -> str:
    """A dataset's name without TFDS version or config (``tfds:mnist/c:3.0.1`` → ``tfds:mnist``).

    Identity is by name: two differently named datasets that hold the same
    individuals (``mnist5k`` and ``tfds:mnist``) are not recognised as one.
    """
    return re.split(r"[/:]", name.removeprefix("tfds:"), maxsplit=1)[0] if name else name


def lineage(path: str | None) -> list[dict[str, Any]]:
    """The datasets a checkpoint's parameters were trained on, oldest first ([] if unknown or none).

    Each entry: ``dataset``, ``private`` and ``events`` (a list of DP-SGD runs
    [q, σ, T]; ``None`` where a checkpoint of an older dptune did not record them). An entry for a
    model selected by a search also has ``search`` (``study``, ``exported``) and, where the search's
    cost is a bound rather than its runs, ``bound`` ([ε, δ]).
    """
    if not path:
        return []
    meta = metadata(os.path.expanduser(path))
    if "lineage" in meta:
        return list(meta["lineage"])
    if "dataset" in meta:
        return [{"dataset": meta["dataset"], "private": bool(meta.get("private")), "events": None}]
    return []


@dataclass(frozen=True)
class PriorSpend:
    """What a checkpoint already spent on one dataset.

    ``events``: DP-SGD runs (q, σ, T), composed with a new run by the RDP accountant.
    ``bounds``: (ε, δ) of searches whose cost is a guarantee rather than a list of runs (a private
    search's repeat-and-select bound, a privacy filter's cap); a new run adds them by basic
    composition (ε and δ add), which holds whatever was chosen after seeing their output.
    """

    events: tuple[tuple[float, float, int], ...] = ()
    bounds: tuple[tuple[float, float], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.events or self.bounds)


def prior_spend(path: str, dataset: str, *, private: bool, unsafe_ignore: bool = False) -> PriorSpend:
    """What a checkpoint already spent on ``dataset``, to compose with a new run.

    A model selected by a search carries the whole search as one lineage entry (``search``), written
    when the model is exported; a copy taken from the study's store while the search ran does not
    know what the search will have cost, and is refused.

    Args:
      path: the ``init_checkpoint``.
      dataset: the name of the dataset the new run trains on.
      private: whether the new run is private (a non-private run needs no check).
      unsafe_ignore: accept a checkpoint that saw ``dataset`` without (recorded)
        privacy; the new run's ε then does not cover what the checkpoint learnt.

    Returns:
      The recorded runs and bounds on ``dataset`` (none for checkpoints without dptune
      metadata, which are treated as trained on public data).

    Raises:
      CheckpointError: the checkpoint was trained without privacy on ``dataset``, privately without
        a recorded spend, or selected by a search that was not exported, and ``unsafe_ignore`` is off.
    """
    if not private:
        return PriorSpend()
    events: list[tuple[float, float, int]] = []
    bounds: list[tuple[float, float]] = []
    for entry in lineage(path):
        if dataset_identity(str(entry.get("dataset", ""))) != dataset_identity(dataset):
            continue
        search = entry.get("search") or {}
        exported = bool(search.get("exported", True))
        known = entry.get("private") and exported and (entry.get("events") is not None or entry.get("bound"))
        if unsafe_ignore and not known:
            continue
        if not exported:
            raise CheckpointError(
                f"{path} was selected by the search {search.get('study')!r} while it ran, so its lineage does not "
                "hold what the whole search spent; export it (dptune study best --export-model DIR) and start "
                "from the exported model.msgpack")
        if not entry.get("private"):
            raise CheckpointError(
                f"{path} was trained without privacy on {dataset!r}, the dataset this run protects (its metadata "
                "says so), so no ε would cover it; start from a checkpoint trained on other (public) data, or pass "
                "--unsafe-ignore-checkpoint-provenance (study file: unsafe_ignore_checkpoint_provenance: true) to "
                "accept an ε that does not cover it")
        if entry.get("bound"):
            epsilon, delta = entry["bound"]
            bounds.append((float(epsilon), float(delta)))
            continue
        if entry.get("events") is None:
            raise CheckpointError(
                f"{path} was trained privately on {dataset!r} but its privacy spend was not recorded, so it "
                "cannot be composed with this run; retrain it with this dptune, or pass "
                "--unsafe-ignore-checkpoint-provenance to accept an ε that does not cover it")
        events.extend((float(q), float(s), int(t)) for q, s, t in entry["events"])
    return PriorSpend(tuple(events), tuple(bounds))


def load(path: str) -> PyTree:
    """The parameter tree stored at ``path`` (msgpack file or Orbax directory), as numpy arrays."""
    path = os.path.expanduser(path)
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        raise CheckpointError(f"{path}: no such file or directory") from None
    return _load(path, stamp)


@functools.lru_cache(maxsize=4)
def _load(path: str, stamp: int) -> PyTree:
    if os.path.isdir(path):
        try:
            import orbax.checkpoint as ocp
        except ImportError:
            raise CheckpointError(f"{path} is a directory (an Orbax checkpoint?) but orbax-checkpoint "
                                  "is not installed") from None
        try:
            tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
        except Exception as e:  # orbax raises many kinds
            raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from e
    else:
        from flax import serialization

        try:
            with open(path, "rb") as f:
                tree = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several kinds on garbage
            raise CheckpointError(f"{path}: not a Flax msgpack checkpoint ({type(e).__name__})") from e
    if isinstance(tree, dict) and set(tree) >= {"params"} and isinstance(tree["params"], dict):
        tree = tree["params"]
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a tree of parameters, found {type(tree).__name__}")
    return _to_numpy(tree)


def _leaves(tree: PyTree, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(_leaves(v, name) if isinstance(v, dict) else {name: v})
    return out


def fit(model_params: PyTree, checkpoint: PyTree, reinitialize: Iterable[str] = ()) -> PyTree:
    """The model's parameter tree with every leaf taken from ``checkpoint``.

    Leaves under a top-level module named in ``reinitialize`` (e.g. the
    classifier head when the class count differs) keep the model's fresh
    initialisation. Any other missing, unexpected or differently shaped leaf is
    an error naming each one.
    """
    reinit = set(reinitialize)
    unknown = reinit - set(model_params)
    if unknown:
        raise CheckpointError(f"reinitialize: no module {sorted(unknown)} in the model; its top-level "
                              f"modules are {', '.join(model_params)}")
    want, have = _leaves(model_params), _leaves(checkpoint)
    problems = []
    for name, value in want.items():
        if name.split("/")[0] in reinit:
            continue
        if name not in have:
            problems.append(f"{name} missing from the checkpoint")
        elif tuple(np.shape(have[name])) != tuple(np.shape(value)):
            problems.append(f"{name}: checkpoint {tuple(np.shape(have[name]))} vs model {tuple(np.shape(value))}")
    extra = sorted(n for n in have if n not in want and n.split("/")[0] not in reinit)
    if extra:
        problems.append(f"not in the model: {', '.join(extra)}")
    if problems:
        raise CheckpointError("does not fit the model — " + "; ".join(problems)
                              + " (reinitialize lists modules to start fresh, e.g. the head)")

    def build(node: PyTree, prefix: str = "") -> PyTree:
        out = {}
        for k, v in node.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                out[k] = build(v, name)
            else:
                out[k] = v if name.split("/")[0] in reinit else np.asarray(have[name], dtype=np.asarray(v).dtype)
        return out

    return build(model_params)
