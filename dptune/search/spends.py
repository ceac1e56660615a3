"""What a study's trials spent: which trials touched the data and the DP-SGD runs they add up to.

No JAX: the guarantee (:mod:`dptune.search.regimes`) and the inspection layers
read through it. A resumed trial's attempts count once when the retry replayed
the dead attempt's run, apart when it diverged (:func:`resumed_spends`).
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from dptune.privacy.mechanism import Mechanism
from dptune.search import record
from dptune.search.record import ResumeLink
from dptune.search.storage import backend

# A trial that finished: its value (and its spend) are in the storage.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def attempt_origin(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of a trial's first attempt: its own, or that of the trial it retries.

    dptune's reaper marks a retry with the user attribute ``retry_of``; Optuna's
    heartbeat retry with a system attribute.
    """
    system = (trial.system_attrs if isinstance(trial, FrozenTrial)
              else backend(trial.study).trial_system_attrs(trial.number))
    retried = record.optuna_retry_of(system)
    if retried is not None:
        return retried
    return int(record.get(trial, record.RETRY_OF, trial.number))


def linked(trial: FrozenTrial, by_number: dict[int, FrozenTrial]) -> tuple[FrozenTrial, ResumeLink] | None:
    """The earlier attempt ``trial`` resumed from and the link, or None.

    A link counts only to a smaller-numbered trial with the same first attempt:
    a ``resumed_from`` naming anything else (a leftover of another study) never
    makes an unrelated trial's spend disappear.
    """
    link = ResumeLink.of(trial)
    if link is None or link.trial is None:
        return None
    dead = by_number.get(link.trial)
    if dead is None or dead.number >= trial.number or attempt_origin(dead) != attempt_origin(trial):
        return None
    return dead, link


def touched_data(t: FrozenTrial) -> bool:
    """Whether the trial reached the training data (and so counts in the search's privacy)."""
    if t.state == TrialState.WAITING:
        return False  # a queued retry carries its parent's attributes but has run nothing
    flag = record.touched_data(t)
    if flag is not None:
        return flag
    # Studies stored before the flag existed: every planned trial that was not rejected.
    return not record.is_rejected(t) and not record.is_skipped(t) and record.has(t, record.SAMPLING_RATE)


def resumed_spends(trials: Sequence[FrozenTrial], touched: Sequence[FrozenTrial]) -> list[Mechanism]:
    """The DP-SGD runs the trials that touched the data add up to, a resumed trial's attempts once.

    A trial without in-trial checkpoints counts alone: the steps it took, or,
    if it failed or is running, its planned steps (an upper bound). A retry
    that resumed from a dead attempt's checkpoint with the *replayed*
    randomness continues that attempt's very run: same batches, same noise,
    and, checked by parameter digests at every step the dead attempt reported,
    the same parameters. Everything either attempt wrote is then an output of
    one DP-SGD run as long as the longer of them went: the pair counts once, at
    max(the retry's steps — taken, or planned while it runs —, the last step
    the dead attempt reported or checkpointed). If the replay diverged, the
    retry restarted from the checkpoint with fresh randomness, and the dead
    attempt's steps after the checkpoint are a run of their own: they count
    apart. A dead attempt whose retry has not resumed (yet) counts at its
    planned steps. A link is followed only to a smaller-numbered attempt of
    the same trial (:func:`linked`).
    """
    by_number = {t.number: t for t in trials}
    continued = {hop[0].number for t in touched if (hop := linked(t, by_number)) is not None}
    events: list[Mechanism] = []
    for t in touched:
        if t.state == TrialState.FAIL and t.number in continued:
            continue  # counted with the attempt that resumed it
        run = record.spend_of(t, t.state in FINISHED)
        if run is None:
            continue
        apart = []
        current = t
        while (hop := linked(current, by_number)) is not None:  # numbers fall along the chain: it ends
            dead, link = hop
            if link.replayed:
                run = run.with_steps(max(run.steps, record.extent_of(dead)))
            else:
                apart.append(run.with_steps(max(0, record.extent_of(dead) - link.step)))
            current = dead
        events.append(run)
        events.extend(e for e in apart if e.steps > 0)
    return events
