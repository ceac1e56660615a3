"""A study's progress as events (:mod:`dptune.progress`): one per finished trial, one for the search so far.

What the events show is what the study's storage holds (trial numbers, timings, states): they are for the
owner, like the storage. A private search, whose number of trials K is secret, sends no event per trial
(their number and timing would tell K).
"""

from __future__ import annotations

import math
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from dptune.progress import Event, Reporter


class StudyWatch:
    """An Optuna callback: after each finished trial, a ``trial`` event and a ``study`` event."""

    def __init__(self, report: Reporter, study_name: str, asked: int | None, *, private_search: bool):
        self.report, self.name, self.asked, self.private = report, study_name, asked, private_search
        self.began = time.monotonic()
        self.done = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from dptune.search import record
        from dptune.search.regimes import study_guarantee

        if self.private:
            return
        self.done += 1
        def of(key: str) -> Any:
            return record.get(trial, key)

        self.report(Event("trial", {
            "trial": trial.number, "state": trial.state.name, "value": trial.value,
            "epsilon_spent": of(record.EPSILON_SPENT), "steps": of(record.STEPS),
            "wall_seconds": of(record.WALL_SECONDS),
            "reason": of(record.REJECTED_REASON) or of(record.FAILED_REASON)}))
        guarantee = study_guarantee(study)
        self.report(Event("study", {"study": self.name, **self._counts(), "best": _best(study),
                                    "search_epsilon": guarantee.epsilon,
                                    "remaining_epsilon": guarantee.remaining}))

    def _counts(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.began
        left = None if self.asked is None else max(0, self.asked - self.done)
        return {"done": self.done, "asked": self.asked,
                "remaining": None if left is None else elapsed / self.done * left}


def _best(study: optuna.Study) -> float | None:
    try:
        value = study.best_value
    except ValueError:  # no completed trial yet
        return None
    return value if math.isfinite(value) else None
