"""In-trial checkpoints: a long trial killed mid-way resumes where it was, with the same randomness.

What a checkpoint holds (one file, ``step-<T>.ckpt``):

* the training state (parameters, optimizer state, EMA parameters) after T steps;
* the step count T and the accountant's inputs (q, σ, T);
* the run's secret (:class:`dptune.randomness.SecretSeed`, 256 bits): what a
  resumed run needs to draw the very batches and noise the original run would
  have drawn next. Each step's Poisson batch comes from its own stream
  (``SecretSeed.batch_sampler(step)``), the noise key is folded with the step
  number in the DP step and the augmentation is keyed by step, so all three
  follow from the secret and the step alone;
* the evaluations so far (the history) and what identifies the run
  (hyperparameters, planned steps, model, data split): a checkpoint of another
  configuration is never resumed.

**Secrecy.** The secret decides which examples were used
and what noise was added: whoever holds them can subtract the noise from the
released model. A checkpoint is therefore as secret as the data. Checkpoints
live in a folder created with mode 0700, each file written with mode 0600
(:func:`private_dir`, :func:`write_private`), by default under the study's
private folder beside the storage (:func:`dptune.search.release.study_folder`), never
under a public path; they are deleted when the trial finishes.

**Atomicity.** A checkpoint is written to a temporary file in the same folder,
fsynced, renamed over its final name and the folder fsynced: a crash
mid-write leaves at worst a stray temporary file, never a half-written
checkpoint under a final name. Each file ends with a SHA-256 of everything
before it; a file that fails the check (truncated, corrupted) is skipped with a
warning and the previous checkpoint is used (the newest ``KEEP`` are kept).

**Privacy of a resumed run** (the argument :func:`dptune.search.results.search_guarantee`
relies on). The resumed run starts from the state after T steps and draws the
same batches and the same noise the dead attempt drew for steps T+1, T+2, …
If its computation is bitwise the same (XLA on CPU is deterministic for one
program), every output the dead attempt wrote after its checkpoint (its
reported validation accuracies) is an output of the resumed run too: the two
attempts together are *one* DP-SGD run, of as many steps as the longer of them
went. To make this a checked fact rather than an assumption, each attempt
records a digest of its parameters at every step it reports
(``replay_digests``); the resumed run compares its own parameters at those
steps *before* it reports or checkpoints anything. On a mismatch
(:class:`ReplayDiverged`) the replay is abandoned unreleased, and the run is
restarted from the checkpoint with *fresh* randomness; the dead attempt's
steps after the checkpoint then count separately (composition).

**The replayed checkpoint stays until the replay is verified.** The point a
run resumed from is held in memory (:attr:`Checkpointer.started_from`), and
while some reported step after it is still to be checked, the cleanup that
keeps the newest ``KEEP`` checkpoints never deletes its file. A diverged replay
restarts from that in-memory point (:meth:`Checkpointer.restart_fresh`), never
from whatever happens to be left on disk, so the step recorded as the restart
point is the step the fresh run really started from. The fresh randomness is
drawn from the OS (:meth:`SecretSeed.from_os`), not derived from the saved
secret: two attempts diverging from one checkpoint never share their noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dptune.randomness import SecretSeed
from dptune.trainer import multihost

MAGIC = b"DPTUNE-CKPT-1\n"
KEEP = 2
_NAME = re.compile(r"^step-(\d{9})\.ckpt$")


class CheckpointWarning(UserWarning):
    """A checkpoint was found but not used (corrupt, or of another run)."""


class ReplayDiverged(RuntimeError):
    """The resumed run's parameters differ from the dead attempt's at a step it reported."""

    def __init__(self, step: int):
        super().__init__(f"replay diverged from the dead attempt at step {step}")
        self.step = step


# -- owner-only files ----------------------------------------------------------------

class OpenFolderWarning(UserWarning):
    """An existing folder that will hold secret files can be read or entered by other users."""


def private_dir(path: str) -> str:
    """Create ``path`` (and missing parents) owner-only (0700); returns it.

    An existing folder is left as it is (it may be the user's own, shared on
    purpose); if other users can read or enter it, an :class:`OpenFolderWarning`
    says so. The files written in it are 0600 and the folders created 0700 whatever it is.
    """
    missing = []
    head = os.path.abspath(path)
    while not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    for folder in reversed(missing):  # os.makedirs would give the intermediate folders the umask's mode
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        os.chmod(folder, 0o700)
    if not missing:
        mode = os.stat(path).st_mode & 0o777
        if mode & 0o077:
            warnings.warn(f"{path} is readable or searchable by other users (mode {mode:o}); the secret files "
                          "dptune writes in it are owner-only, but consider chmod 700", OpenFolderWarning,
                          stacklevel=2)
    return path


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (temp file, fsync, rename, fsync of the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # a umask cannot widen it, but an existing temp file might have been
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- the file format -------------------------------------------------------------------

def encode(header: dict[str, Any], payload: bytes) -> bytes:
    """MAGIC, header length, JSON header, payload, SHA-256 of all that."""
    head = json.dumps(header, sort_keys=True).encode()
    body = MAGIC + len(head).to_bytes(8, "big") + head + payload
    return body + hashlib.sha256(body).digest()


def decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a checkpoint file; ``ValueError`` if it is truncated or corrupt."""
    if len(data) < len(MAGIC) + 8 + 32 or not data.startswith(MAGIC):
        raise ValueError("not a dptune checkpoint (bad magic or too short)")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    n = int.from_bytes(body[len(MAGIC):len(MAGIC) + 8], "big")
    start = len(MAGIC) + 8
    return json.loads(body[start:start + n]), body[start + n:]


def params_digest(params: Any) -> str:
    """SHA-256 of a parameter tree's exact bytes (leaf order and dtypes included)."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(multihost.fetch(params)):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- resume points ---------------------------------------------------------------------

@dataclass
class ResumePoint:
    """What a run needs to continue after ``step`` steps."""

    step: int
    state_bytes: bytes
    secret: SecretSeed
    history: list[dict[str, float]]
    examples: int
    path: str
    header: dict[str, Any] = field(repr=False, default_factory=dict)

    def state(self, template: Any) -> Any:
        """The saved training state, shaped like ``template`` (a fresh ``TrainState``), as numpy arrays."""
        from flax import serialization

        return serialization.from_bytes(template, self.state_bytes)


class Checkpointer:
    """Checkpoints of one trial (all its attempts) in one owner-only folder.

    Args:
      directory: the folder (created 0700).
      identity: what must match for a checkpoint to be resumed (hyperparameters,
        planned steps, q, σ, model, split, …); JSON-ready.
      every_steps: checkpoint after every this many steps (None: not by steps).
      every_seconds: checkpoint when this many seconds passed since the last one
        (None: not by time). With neither, nothing is written.
      expected_digests: {step: parameter digest} that a dead attempt reported;
        a resumed run must reproduce them (see the module docstring).
      fresh_randomness: resume from the checkpoint's state but with a new secret
        from the OS (after a diverged replay; see :meth:`restart_fresh`).
    """

    def __init__(self, directory: str, identity: dict[str, Any], *, every_steps: int | None = None,
                 every_seconds: float | None = None, expected_digests: dict[int, str] | None = None,
                 fresh_randomness: str | None = None):
        self.directory = directory
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.expected_digests = {int(k): v for k, v in (expected_digests or {}).items()}
        self.fresh_randomness = fresh_randomness
        # The interval starts after the first step (compilation included), not at construction:
        # else a retry whose compilation outlasted the interval would checkpoint at once.
        self._last_save: float | None = None
        self._latest: ResumePoint | None = None
        self._looked = False  # latest() reads the folder once
        self._fresh_secret: SecretSeed | None = None
        self.started_from: ResumePoint | None = None  # the point the last run resumed from (None: from step 0)
        self.saved_steps: list[int] = []
        self.on_save: Callable[[int], None] | None = None  # e.g. record progress in the study storage
        self.writer: int | None = None  # the trial number that writes (recorded in each checkpoint)
        self.last_digest: tuple[int, str] | None = None

    @property
    def active(self) -> bool:
        return bool(self.every_steps) or bool(self.every_seconds)

    def files(self) -> list[tuple[int, str]]:
        """(step, path) of the checkpoint files present, newest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), os.path.join(self.directory, n)) for n in names if (m := _NAME.match(n))]
        return sorted(found, reverse=True)

    def latest(self) -> ResumePoint | None:
        """The newest valid checkpoint of this run, or None (each one skipped says why, as a warning)."""
        if self._looked:
            return self._latest
        self._looked = True
        self._latest = None
        for _step, path in self.files():
            try:
                with open(path, "rb") as f:
                    header, payload = decode(f.read())
            except (OSError, ValueError) as e:
                warnings.warn(f"checkpoint {path} ignored: {e}; trying the previous one", CheckpointWarning,
                              stacklevel=2)
                continue
            if header.get("identity") != self.identity:
                warnings.warn(f"checkpoint {path} ignored: it is of another run configuration", CheckpointWarning,
                              stacklevel=2)
                continue
            secret = SecretSeed(bytes.fromhex(header["secret"]), fixed=bool(header["secret_fixed"]))
            self._latest = ResumePoint(step=int(header["step"]), state_bytes=payload, secret=secret,
                                       history=header["history"],
                                       examples=int(header["examples"]), path=path, header=header)
            break
        return self._latest

    def resume_secret(self, point: ResumePoint) -> SecretSeed:
        """The secret to continue from ``point`` with (the trainer calls this when it resumes from it).

        The saved one, or after a divergence (:meth:`restart_fresh`) a fresh
        one from the OS, the same on every process of a multi-host run.
        """
        self.started_from = point
        if self.fresh_randomness is None:
            return point.secret
        if self._fresh_secret is None:
            self._fresh_secret = multihost.shared_secret(SecretSeed.from_os())
        return self._fresh_secret

    def restart_fresh(self, reason: str) -> ResumePoint | None:
        """After :class:`ReplayDiverged`: the next run restarts from the same point with fresh randomness.

        Deletes the abandoned replay's checkpoints (those after the point) and
        keeps the point itself in memory, so the restart never depends on its
        file. Returns the point the next run will start from (None: step 0).
        """
        point = self.started_from
        for s, path in self.files():
            if point is None or s > point.step:
                os.unlink(path)
        self.fresh_randomness = reason
        self._fresh_secret = None
        self._latest = point
        self.started_from = None
        self.saved_steps = [s for s in self.saved_steps if point is not None and s <= point.step]
        return point

    def due(self, step: int) -> bool:
        """Whether a checkpoint should be written after ``step`` steps."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if not self.every_seconds:
            return False
        now = time.monotonic()
        if self._last_save is None:
            self._last_save = now  # the first step is done: the interval counts from here
            return False
        return now - self._last_save >= float(self.every_seconds)

    def _unverified(self, step: int) -> str | None:
        """The file of the point being replayed while a reported step after ``step`` is still to be checked."""
        point = self.started_from
        if point is None or self.fresh_randomness is not None:
            return None
        return point.path if any(k > step for k in self.expected_digests) else None

    def verify(self, step: int, params: Any) -> None:
        """Raise :class:`ReplayDiverged` if a dead attempt reported different parameters at ``step``."""
        want = self.expected_digests.get(step)
        if want is not None and self.fresh_randomness is None and params_digest(params) != want:
            raise ReplayDiverged(step)

    def note(self, step: int, params: Any) -> None:
        """Remember the digest of the parameters an evaluation at ``step`` is about to report."""
        if self.active:
            self.last_digest = (int(step), params_digest(params))

    def save(self, step: int, state: Any, secret: SecretSeed, history: list[dict[str, float]], examples: int,
             accountant: dict[str, Any]) -> str:
        """Write the checkpoint after ``step`` steps (atomically, 0600) and drop all but the newest ``KEEP``."""
        from flax import serialization

        private_dir(self.directory)
        payload = serialization.to_bytes(multihost.fetch(state))
        header = {
            "step": int(step), "identity": self.identity, "accountant": accountant,
            "secret": secret.bits.hex(), "secret_fixed": secret.fixed,
            "history": history, "examples": int(examples),
            "params_digest": params_digest(state.params), "written": time.time(), "trial": self.writer,
        }
        path = os.path.join(self.directory, f"step-{step:09d}.ckpt")
        write_private(path, encode(header, payload))
        self._last_save = time.monotonic()
        self.saved_steps.append(int(step))
        pinned = self._unverified(step)
        # Never the replayed point while its replay is unverified: a divergence restarts from it.
        for _, old in [f for f in self.files() if f[1] != pinned][KEEP:]:
            os.unlink(old)
        if self.on_save is not None:
            self.on_save(int(step))
        return path

    def clear(self) -> None:
        """Delete every checkpoint and the folder (the trial finished: the secret is of no more use)."""
        for _, path in self.files():
            os.unlink(path)
        try:
            for name in os.listdir(self.directory):
                if name.startswith("."):
                    os.unlink(os.path.join(self.directory, name))  # stray temporary files of a crash
            os.rmdir(self.directory)
        except FileNotFoundError:
            pass
