"""Flat tables of trials for SQL, datasette or a spreadsheet, written with sqlite-utils."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
from collections.abc import Iterable
from typing import Any

import optuna
import sqlite_utils

from dptune.errors import ConfigError

BASE_COLUMNS = ("study", "number", "state", "value", "datetime_start", "datetime_complete", "duration_seconds")


def _scalar(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return v


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per trial: identity, state, objective, timings, params (param_*), user attributes.

    A study with a search mode exports no timings (:func:`dptune.search.results.shown`).
    """
    from dptune.search.results import shown

    return [shown(study, r) for r in _rows(study)]


def _rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "study": study.study_name,
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "duration_seconds": t.duration.total_seconds() if t.duration else None,
        }
        for k, v in t.params.items():
            row[f"param_{k}"] = _scalar(v)
        for k, v in t.user_attrs.items():
            row[f"attr_{k}" if k in row else k] = _scalar(v)
        rows.append(row)
    return rows


def intermediate_rows(study: optuna.Study) -> list[dict[str, Any]]:
    return [{"study": study.study_name, "number": t.number, "step": step, "value": value}
            for t in study.get_trials(deepcopy=False) for step, value in sorted(t.intermediate_values.items())]


def to_sqlite(studies: Iterable[optuna.Study], path: str) -> dict[str, int]:
    """Upsert the studies' trials into ``path``: re-exporting updates rows, never duplicates them.

    A file that cannot be written (missing or read-only folder, not a SQLite
    database) is a :class:`ConfigError` naming ``--to``; a file this call
    created is removed again if the export fails.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError("to", f"cannot write {path!r}: the folder {os.path.dirname(path) or '.'!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError("to", f"{path!r} is a folder; name a SQLite file, e.g. {os.path.join(path, 'trials.db')}")
    if not os.access(folder, os.W_OK):
        raise ConfigError("to", f"cannot write {path!r}: the folder {os.path.dirname(path) or '.'!r} is read-only")
    new = not os.path.exists(path)
    try:
        return _upsert(studies, path)
    except (sqlite3.Error, OSError) as e:
        if new:
            for leftover in (path, path + "-journal"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        reason = "not a SQLite database" if "not a database" in str(e) else str(e)
        raise ConfigError("to", f"cannot write {path!r}: {reason}") from None


def _upsert(studies: Iterable[optuna.Study], path: str) -> dict[str, int]:
    db = sqlite_utils.Database(path)
    counts = {"trials": 0, "intermediate_values": 0}
    for study in studies:
        rows = trial_rows(study)
        if rows:
            db.table("trials").upsert_all(rows, pk=("study", "number"), alter=True)
        inter = intermediate_rows(study)
        if inter:
            db.table("intermediate_values").upsert_all(inter, pk=("study", "number", "step"), alter=True)
        counts["trials"] += len(rows)
        counts["intermediate_values"] += len(inter)
    if "trials" in db.table_names():
        db.table("trials").create_index(["state"], if_not_exists=True)
        db.table("trials").create_index(["value"], if_not_exists=True)
    if "intermediate_values" in db.table_names():
        db.table("intermediate_values").create_index(["study", "number"], if_not_exists=True)
    return counts


def to_text(studies: Iterable[optuna.Study], fmt: str) -> str:
    """The trials table as CSV or JSON text."""
    rows = [r for s in studies for r in trial_rows(s)]
    if fmt == "json":
        return json.dumps(rows, indent=2, default=str)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
