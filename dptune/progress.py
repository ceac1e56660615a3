"""Progress of long work as events, and three ways to show them.

The library never prints on its own: training, a study, an audit or a final run
hands each :class:`Event` to the reporter it was given (a callable), so a notebook
can show the same events as a terminal. The command line picks a reporter:

* :class:`Live` — on a terminal: one line per running trial (per worker) and one
  for the study, redrawn in place (rich);
* :class:`LogLines` — in a log (not a terminal): one ``key=value`` line per
  evaluation, trial and phase, never wrapped, no live lines;
* :class:`JsonLines` — ``--log-format json``: one JSON object per event.

Kinds of event (``Event.kind``): ``phase`` (a long silent stretch: preparing
data, compiling, …), ``step`` (inside a run, at most a few per second),
``eval`` (a validation; ``run_epsilon`` in both is this run's own, not what an
initial checkpoint or the search around it spent), ``trial`` (a trial finished) and ``study`` (the search
so far). :class:`StepMeter` turns the trainer's steps into ``step`` events on
the host clock alone: no device synchronisation of its own.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

KINDS = ("phase", "step", "eval", "trial", "study")


@dataclass(frozen=True)
class Event:
    """One thing that happened: its kind and its fields (JSON-able values)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **self.data}

    def tagged(self, **extra: Any) -> Event:
        """The same event with ``extra`` fields first (e.g. the trial or worker it came from)."""
        return Event(self.kind, {**extra, **self.data})


Reporter = Callable[[Event], None]


def quiet(_event: Event) -> None:
    """The reporter that shows nothing (the library's default)."""


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"  # 15090, not 1.509e+04
    text = str(v)
    # A value with a space, quote or '=' is quoted so that a line still splits into key=value pairs.
    return json.dumps(text, ensure_ascii=False) if (not text or any(c in text for c in ' "=\n\t')) else text


def key_values(event: Event) -> str:
    """``event=eval trial=3 step=40 val_accuracy=0.9123 …``: one line, fields in the event's order."""
    return " ".join(f"{k}={_value(v)}" for k, v in event.as_dict().items() if v is not None)


class _Lines:
    """One line per event on ``stream``. A ``phase`` is written only once it has lasted ``hold`` seconds
    with nothing else to say: a log names its long silences, not every short step (and a command that
    fails during one prints its one error line alone)."""

    def __init__(self, stream: IO[str] | None = None, *, steps: bool = False, hold: float = 10.0):
        self.stream, self.steps, self.hold = stream, steps, hold
        self._lock = threading.Lock()
        self._held: threading.Timer | None = None

    def format(self, event: Event) -> str:
        raise NotImplementedError

    def _write(self, event: Event) -> None:
        print(self.format(event), file=self.stream or sys.stderr, flush=True)

    def __call__(self, event: Event) -> None:
        with self._lock:
            if self._held is not None:
                self._held.cancel()
                self._held = None
            if event.kind == "phase" and self.hold > 0:
                self._held = threading.Timer(self.hold, self._release, args=(event,))
                self._held.daemon = True
                self._held.start()
                return
            if event.kind != "step" or self.steps:
                self._write(event)

    def _release(self, event: Event) -> None:
        with self._lock:
            if self._held is not None:
                self._held = None
                # The phase may outlast whoever owned the stream (a caller that closed its log, a test's capture):
                # a late note on silence is dropped rather than raised in a timer thread.
                if not getattr(self.stream or sys.stderr, "closed", False):
                    self._write(event)


class LogLines(_Lines):
    """One ``key=value`` line per event (``step`` events only if ``steps``); never wrapped."""

    def format(self, event: Event) -> str:
        return key_values(event)


class JsonLines(_Lines):
    """One JSON object per event (``step`` events too)."""

    def __init__(self, stream: IO[str] | None = None, *, hold: float = 10.0):
        super().__init__(stream, steps=True, hold=hold)

    def format(self, event: Event) -> str:
        return json.dumps(event.as_dict(), default=str, allow_nan=True)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_line(d: dict[str, Any]) -> str:
    """A running trial (or run) in a line: step / planned, epoch, ex/s, ε, last score, elapsed, left."""
    who = f"trial {d['trial']}" if "trial" in d else "run"
    if "worker" in d:
        who = f"worker {d['worker']} {who}"
    if "phase" in d and "step" not in d:
        return f"{who}: {d['phase']}…"
    parts = [f"{who}: step {d.get('step', 0)}/{d.get('planned', '?')}"]
    if d.get("epoch") is not None:
        parts.append(f"epoch {d['epoch']:.2f}")
    if d.get("examples_per_second"):
        parts.append(f"{d['examples_per_second']:,.0f} ex/s")
    if d.get("run_epsilon") is not None:
        budget = f" of {d['epsilon_budget']:g}" if d.get("epsilon_budget") is not None else ""
        parts.append(f"ε {d['run_epsilon']:.3g}{budget} (this run)")
    if d.get("val_accuracy") is not None:
        parts.append(f"val {d['val_accuracy']:.4f}")
    parts.append(f"{_duration(d.get('elapsed'))} elapsed, {_duration(d.get('remaining'))} left")
    return "  ".join(parts)


def study_line(d: dict[str, Any]) -> str:
    """The search so far: trials done / asked, best, its ε (or what remains of a total), time left."""
    asked = d.get("asked")
    parts = [f"study {d.get('study', '')}: {d.get('done', 0)}/{asked if asked is not None else '?'} trials"]
    if d.get("best") is not None:
        parts.append(f"best {d['best']:.4f}")
    if d.get("search_epsilon") is not None:
        parts.append(f"search ε {d['search_epsilon']:.4g}")
    if d.get("remaining_epsilon") is not None:
        parts.append(f"ε left {d['remaining_epsilon']:.4g}")
    if d.get("remaining") is not None:
        parts.append(f"about {_duration(d['remaining'])} left")
    return "  ".join(parts)


class Live:
    """On a terminal: a line per running trial and one for the study, redrawn in place (rich's Live).

    ``console``: a rich Console (a recording one in tests). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, console: Any = None, refresh_per_second: float = 4.0):
        from rich.console import Console
        from rich.live import Live as RichLive

        self.console = console or Console(stderr=True)
        self.runs: dict[Any, dict[str, Any]] = {}
        self.study: dict[str, Any] | None = None
        self._live = RichLive(console=self.console, refresh_per_second=refresh_per_second, transient=False,
                              get_renderable=self._render)
        self._live.start()

    def _render(self) -> Any:
        from rich.text import Text

        lines = [run_line(d) for d in self.runs.values()]
        if self.study is not None:
            lines.append(study_line(self.study))
        return Text("\n".join(lines) if lines else "starting…")

    def __call__(self, event: Event) -> None:
        d = event.data
        key = (d.get("worker"), d.get("trial"))
        if event.kind in ("step", "eval"):
            self.runs[key] = {**self.runs.get(key, {}), **d}
        elif event.kind == "phase":
            self.runs[key] = {**{k: v for k, v in self.runs.get(key, {}).items() if k != "step"}, **d}
        elif event.kind == "trial":
            # The study reports a finished trial without the worker that ran it.
            for done in [k for k in self.runs if k[1] == d.get("trial")]:
                del self.runs[done]
            self.console.print(key_values(event), highlight=False, soft_wrap=True)
        elif event.kind == "study":
            self.study = d
        self._live.refresh()

    def close(self) -> None:
        self._live.stop()

    def __enter__(self) -> Live:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def reporter(log_format: str = "auto", stream: IO[str] | None = None) -> Reporter:
    """The reporter for ``--log-format``: ``auto`` (live on a terminal, else ``text``), ``text`` or ``json``.

    Raises:
      ValueError: another format.
    """
    out = stream or sys.stderr
    if log_format == "json":
        return JsonLines(out)
    if log_format == "text":
        return LogLines(out)
    if log_format == "auto":
        return Live() if out.isatty() else LogLines(out)
    raise ValueError(f"log_format: unknown {log_format!r}; allowed: auto, text, json")


class StepMeter:
    """``step`` events from the host loop, at most one per ``interval`` seconds.

    Each call costs a clock read; nothing here waits for a device. Examples per
    second count the expected batch (public), as the trainer's throughput does.
    """

    def __init__(self, report: Reporter, *, planned: int, start: int, sampling_rate: float, batch_size: int,
                 epsilon_at: Callable[[int], float] | None = None, epsilon_budget: float | None = None,
                 interval: float = 0.25, clock: Callable[[], float] = time.monotonic):
        self.report, self.planned, self.start = report, planned, start
        self.q, self.batch, self.epsilon_at, self.budget = sampling_rate, batch_size, epsilon_at, epsilon_budget
        self.interval, self.clock = interval, clock
        self.began = clock()
        self.last = -math.inf
        self.val: float | None = None

    def _fields(self, taken: int) -> dict[str, Any]:
        elapsed = self.clock() - self.began
        done = taken - self.start
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        return {"step": taken, "planned": self.planned, "epoch": taken * self.q,
                "examples_per_second": None if rate is None else rate * self.batch,
                "run_epsilon": self._epsilon(taken),
                "epsilon_budget": self.budget, "val_accuracy": self.val, "elapsed": elapsed,
                "remaining": None if rate is None else (self.planned - taken) / rate}

    def _epsilon(self, taken: int) -> float | None:
        """An upper bound on ε after ``taken`` steps: the RDP curve's, and never above the run's cap
        (ε grows with the steps, and the run stops before a step that would exceed its budget)."""
        if self.epsilon_at is None:
            return None
        bound = self.epsilon_at(taken)
        return bound if self.budget is None else min(bound, self.budget)

    def step(self, taken: int) -> None:
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.report(Event("step", self._fields(taken)))

    def evaluated(self, taken: int, metrics: dict[str, float]) -> None:
        self.val = metrics.get("best_val_accuracy", metrics.get("val_accuracy"))
        self.report(Event("eval", {**self._fields(taken), **{k: v for k, v in metrics.items() if k != "step"}}))
