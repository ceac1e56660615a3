"""Optuna storages by URL, and which of them several workers may share.

* ``sqlite:///path.db`` — the default; one writer process at a time. Optuna's
  docs advise against SQLite for parallel workers ("database is locked"), so
  dptune refuses ``--workers`` > 1 on it.
* ``journal:///abs/path.journal`` (or ``journal:relative.journal``) — Optuna's
  ``JournalStorage`` over an append-only file: the default for several worker
  processes on one machine.
* ``postgresql://…`` / ``mysql://…`` — Optuna's own distributed mode: every
  machine runs ``dptune optimize`` against the same database.

RDB storages (SQLite, PostgreSQL, MySQL) get Optuna's heartbeats when a
worker runs trials: a trial whose worker stops beating for ``GRACE_SECONDS``
is failed and re-queued with the same parameters (up to ``MAX_RETRY`` times;
never in a private search). Whatever the storage, :mod:`dptune.search.orphans` fails
and re-queues the trials whose worker process on this host has died, without
waiting for a grace period.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from dptune.errors import DptuneError

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
MAX_RETRY = 2
CONNECT_TIMEOUT_SECONDS = 5
JOURNAL_PREFIX = "journal:"


class StorageError(DptuneError):
    """A storage URL is unusable, or unreachable."""


def kind(url: str) -> str:
    """'journal', 'sqlite', 'postgresql', 'mysql' or the URL's scheme."""
    if url.startswith(JOURNAL_PREFIX):
        return "journal"
    return url.split(":", 1)[0].split("+", 1)[0]


def _journal_path(url: str) -> str:
    rest = url[len(JOURNAL_PREFIX):]
    path = rest[2:] if rest.startswith("//") else rest
    if not path:
        raise StorageError(f"storage: {url!r} names no file; use journal:///abs/path/study.journal")
    return path


def _sqlite_path(url: str) -> str:
    try:
        database = sqlalchemy.engine.make_url(url).database
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(f"storage: cannot parse {url!r}; use sqlite:///relative/path.db or "
                           "sqlite:////absolute/path.db") from None
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise StorageError(f"storage: {url!r} is an in-memory database, which keeps nothing once dptune exits; "
                           "use sqlite:///FILE.db")
    return database


def check_url(url: str) -> None:
    """Refuse, before any work, a storage URL that dptune cannot use."""
    if kind(url) not in ("journal", "sqlite", "postgresql", "mysql"):
        raise StorageError(f"storage: unsupported {url!r}; allowed: sqlite:///FILE, journal:///FILE, "
                           "postgresql://USER@HOST/DB, mysql://USER@HOST/DB")
    file_of(url)


def file_of(url: str) -> str | None:
    """The file a SQLite or journal storage lives in (None for database servers)."""
    k = kind(url)
    if k == "journal":
        return _journal_path(url)
    if k == "sqlite":
        return _sqlite_path(url)
    return None


def exists(url: str) -> bool:
    """Whether the storage is there to be read: its file exists (database servers: assumed)."""
    check_url(url)
    path = file_of(url)
    return path is None or os.path.exists(path)


def open_storage(url: str, *, heartbeat: bool = False, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; with ``heartbeat``, RDB storages detect dead workers.

    Unreachable databases fail within ``CONNECT_TIMEOUT_SECONDS`` with a
    :class:`StorageError` rather than hanging. Without ``create`` a missing
    storage file is an error and nothing is created: commands that only read
    must leave the disk as it was after a typo.
    """
    check_url(url)
    k = kind(url)
    path = file_of(url)
    if path is not None:
        if os.path.isdir(path):
            raise StorageError(f"storage: {url!r} names the folder {path!r}; name a file in it, e.g. "
                               f"{url.rstrip('/')}/study.{'journal' if k == 'journal' else 'db'}")
        if not create and not os.path.exists(path):
            raise StorageError(f"storage: {url!r}: no such file {path!r}")
        if create:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as e:
                raise StorageError(f"storage: cannot create the folder of {path!r}: {e.strerror}") from None
    if k == "journal":
        assert path is not None  # a journal URL names a file
        try:
            return JournalStorage(JournalFileBackend(path))
        except OSError as e:
            raise StorageError(f"storage: cannot open {url!r}: {e.strerror}") from None
        # Optuna replays the whole file on opening; what it cannot replay surfaces as one of these
        # (UnicodeDecodeError and JSONDecodeError are ValueErrors, an unknown operation an AssertionError).
        except (ValueError, KeyError, TypeError, IndexError, AssertionError) as e:
            raise StorageError(f"storage: {path!r} is not an Optuna journal file ({type(e).__name__}); "
                               "was it written by something else?") from None
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if k == "postgresql":
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    if k == "mysql":
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    try:
        with warnings.catch_warnings():
            # Heartbeats are marked experimental in Optuna; the warning is not actionable for users.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            beat: dict[str, Any] = {}
            if heartbeat:
                from dptune.search.orphans import StaleTrialRetry  # imports this module

                beat = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS,
                        "heartbeat_stale_trial_callback": StaleTrialRetry(max_retry=MAX_RETRY)}
            return RDBStorage(url, engine_kwargs=engine, **beat)
    except Exception as e:  # SQLAlchemy's OperationalError and friends
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"storage: cannot open {url!r}: {first}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def writing(url: str) -> Iterator[None]:
    """Turn a failed write to the storage (read-only file or folder, full disk) into a :class:`StorageError`.

    Optuna reports RDB failures as ``StorageInternalError`` with the database's
    reason as its cause; the journal raises the ``OSError`` of its file or lock.
    """
    try:
        yield
    except optuna.exceptions.StorageInternalError as e:
        reason = _first_line(e.__cause__ or e)
        raise StorageError(f"storage: cannot write to {url!r}: {reason}") from None
    except OSError as e:
        path = file_of(url) if kind(url) == "journal" else None
        mine = path is not None and e.filename is not None and os.path.abspath(str(e.filename)).startswith(
            os.path.abspath(path))
        if not mine:
            raise
        raise StorageError(f"storage: cannot write to {url!r}: {e.strerror}") from None


_LOCKS: dict[tuple[int, int], int] = {}  # (device, inode) of a database -> the descriptor its lock is taken on
_HELD: set[tuple[int, int]] = set()  # the databases whose trials this process is running now
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def one_process(url: str) -> Iterator[None]:
    """For SQLite: hold the study's storage for this process alone while it runs trials.

    Optuna takes a queued trial by reading that it waits, then marking it running; SQLite does not lock
    the row in between, so two processes can both take one trial and write two runs into one record,
    of which the search would count one. Journal files and database servers take it atomically.

    The lock is ``flock`` on the database file itself (whatever name reaches it; no file is created),
    which does not touch the byte-range locks SQLite takes. Its descriptor stays open for the life of
    the process and is only unlocked: closing a descriptor of the file would drop SQLite's own locks.
    Where ``flock`` is not supported (some network filesystems, where SQLite is not safe either), nothing
    is locked.

    Raises:
      StorageError: another process holds it.
    """
    path = file_of(url) if kind(url) == "sqlite" else None
    held = None if path is None else _lock_descriptor(path)
    if held is None:
        yield
        return
    import fcntl

    key, fd = held
    busy = StorageError(f"storage: another dptune process is running trials of {url!r}; SQLite serves one "
                        "at a time (use journal:///PATH/study.journal for several)")
    with _LOCKS_GUARD:
        if key in _HELD:  # this process already runs trials of it (another thread, a nested call)
            raise busy
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        except OSError:  # not supported here
            fd = -1
        _HELD.add(key)
    try:
        yield
    finally:
        with _LOCKS_GUARD:
            _HELD.discard(key)
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_descriptor(path: str) -> tuple[tuple[int, int], int] | None:
    """The open descriptor of the database's file, reopened if the cached one is of a file since replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino)
    with _LOCKS_GUARD:
        fd = _LOCKS.get(key)
        if fd is not None and os.fstat(fd).st_nlink == 0 and key not in _HELD:
            del _LOCKS[key]  # deleted, its inode number reused: lock the file that is there now
            fd = None
        if fd is None:
            try:
                fd = _LOCKS[key] = os.open(os.path.realpath(path), os.O_RDONLY)
            except OSError:
                return None
    return key, fd


def check_workers(url: str, workers: int) -> None:
    """Refuse a storage that would lose or fail writes under ``workers`` parallel processes."""
    if workers > 1 and kind(url) == "sqlite":
        raise StorageError(
            f"storage: SQLite is not safe for {workers} parallel workers (Optuna's own advice: 'database is "
            "locked' errors); use journal:///PATH/study.journal on one machine, or postgresql://... across machines"
        )


# -- a study's storage through Optuna's public storage interface ----------------------------------------------

class Backend:
    """A study's storage and id, for what ``optuna.Study`` does not offer (study system attributes, other
    processes' trials), through the public :class:`optuna.storages.BaseStorage` interface only."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str, url: str):
        self.storage = storage
        self.url = url
        self.study_id = storage.get_study_id_from_name(study_name)

    def trial_id(self, number: int) -> int:
        """The storage's id of trial ``number`` (KeyError: none)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self.storage.get_trial(self.trial_id(number))

    def trial_system_attrs(self, number: int) -> dict[str, Any]:
        return self.storage.get_trial_system_attrs(self.trial_id(number))

    def system_attrs(self) -> dict[str, Any]:
        return self.storage.get_study_system_attrs(self.study_id)

    def set_system_attr(self, key: str, value: Any) -> None:
        self.storage.set_study_system_attr(self.study_id, key, value)


_OPENED: weakref.WeakKeyDictionary[optuna.Study, Backend] = weakref.WeakKeyDictionary()


def remember(study: optuna.Study, storage: optuna.storages.BaseStorage, url: str) -> optuna.Study:
    """Record the storage a study was opened on (Optuna keeps it private); returns the study."""
    _OPENED[study] = Backend(storage, study.study_name, url)
    return study


def backend(study: optuna.Study, url: str | None = None) -> Backend:
    """The storage of a study dptune opened, or of ``url``.

    Raises:
      StorageError: the study was opened without dptune and no ``url`` was given.
    """
    found = _OPENED.get(study)
    if found is not None and (url is None or url == found.url):
        return found
    if url is None:
        raise StorageError(f"storage: give the storage URL of study {study.study_name!r} (it was not opened with "
                           "dptune.create_study or dptune.load_study)")
    remember(study, open_storage(url, create=False), url)
    return _OPENED[study]
