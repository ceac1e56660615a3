"""Storages written by the previous version (0.1.0, before the layer folders) still open, read and continue.

``tests/fixtures/study_written_by_0.1.0.sql`` is the SQL dump of a study that dptune at commit 34ad4ea
created and ran (2 trials on digits, ε = 2 per trial).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import dptune
from tests.conftest import run_cli

DUMP = Path(__file__).parent / "fixtures" / "study_written_by_0.1.0.sql"


@pytest.fixture
def legacy(tmp_path) -> str:
    db = tmp_path / "legacy.db"
    with sqlite3.connect(db) as con:
        con.executescript(DUMP.read_text())
    return f"sqlite:///{db}"


def test_a_study_of_the_previous_version_reads_as_before(legacy):
    study = dptune.load_study("legacy", legacy)
    summary = dptune.summarize(study)
    assert summary.complete == 2 and summary.epsilon_target == 2.0
    assert summary.search["mode"] == "composition" and summary.search["total_epsilon"] > 2.0
    assert "Guarantee: (" in dptune.privacy_statement(study).text()
    out = run_cli("study", "show", "legacy", "--storage", legacy, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["complete"] == 2


@pytest.mark.slow
def test_a_study_of_the_previous_version_continues(legacy):
    out = run_cli("optimize", "--study-name", "legacy", "--storage", legacy, "--n-trials", "1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = dptune.summarize(dptune.load_study("legacy", legacy))
    assert summary.complete + summary.pruned == 3
    # The third trial composes with the two that ran under the old version.
    assert summary.search["trials_touching_data"] == 3
