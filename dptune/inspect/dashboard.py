"""optuna-dashboard for dptune studies: dptune's note and figures saved into the study, and the server."""

from __future__ import annotations

import errno
import json
import socket
import warnings
from typing import Any

import optuna
import optuna_dashboard

from dptune.errors import ConfigError
from dptune.inspect import figures
from dptune.search.record import StudyRecord
from dptune.search.results import coverage, summarize
from dptune.search.storage import backend


def study_note(study: optuna.Study) -> str:
    """Markdown shown on the study page: budget, the search's total ε, configuration."""
    s = summarize(study)
    g = s.search
    lines = [f"# {study.study_name}", ""]
    if s.private_search:
        lines += ["**INTERNAL — do not publish this dashboard or its storage:** trial numbers and counts reveal the "
                  "secret number of trials on which the private search's bound rests.", ""]
    lines += [
        f"**Privacy budget:** {s.budget_text}.",
        f"**ε of releasing the best model after this search:** {g['total_epsilon']:.4g} — {g['guarantee']}",
        "",
        coverage(study),
        "",
        f"Trials: {s.n_trials} ({s.complete} complete, {s.pruned} pruned, {s.rejected} rejected before training, "
        f"{s.failed} failed); {s.trial_steps} trial-steps in all.",
        "",
        "Accuracies are on the **validation** split (what tuning reads); each trial's test accuracy is in its "
        "user attributes `test_accuracy`. Trial user attributes also hold ε target and spent, δ, σ, q, C, "
        "steps and examples/s.",
        "",
        "## Configuration",
        "```json",
        json.dumps(StudyRecord.of(study).config, indent=2),
        "```",
    ]
    return "\n".join(lines)


def headline(study: optuna.Study) -> str:
    """The guarantee in one line, for places that show no more than a title."""
    s = summarize(study)
    g = s.search
    if s.non_private:
        return "No privacy guarantee: a non-private baseline"
    state = "" if g.get("valid", True) else " — EXCEEDED, INVALID"
    if s.private_search and not g.get("complete", True):
        state = " — incomplete search"
    return (f"ε of releasing the best model: {g['total_epsilon']:.4g} (δ = {g['delta']:g}){state}; "
            "what it covers: the study's Note")


def publish(study: optuna.Study) -> list[str]:
    """Save (or refresh) dptune's note and plotly figures into the study; returns the figure ids.

    The study page shows the figures but keeps the note behind an icon, so
    every figure's title carries the guarantee in one line, and the objective
    is named by its metric instead of "Objective 0".
    """
    optuna_dashboard.save_note(study, study_note(study))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([StudyRecord.of(study).study_config.get("objective", {}).get(
            "metric", "val_accuracy")])
    line = headline(study)
    ids = []
    for graph_id, fig in figures.dashboard_figures(study).items():
        fig.update_layout(title=f"{line}<br><sup>{fig.layout.title.text}</sup>")
        ids.append(optuna_dashboard.save_plotly_graph_object(study, fig, graph_object_id=graph_id))
    return ids


def note_url(study: optuna.Study, host: str, port: int) -> str:
    """Where optuna-dashboard shows the study's note (the full privacy statement)."""
    study_id = backend(study).study_id
    return f"http://{host}:{port}/dashboard/studies/{study_id}/note"


def _port_error(host: str, port: int, e: OSError) -> ConfigError:
    if e.errno == errno.EADDRINUSE:
        with socket.socket() as free:
            free.bind((host, 0))
            other = free.getsockname()[1]
        return ConfigError("port", f"{port} on {host} is already in use (another dashboard?); choose another "
                                   f"with --port, e.g. --port {other}")
    if e.errno == errno.EACCES:
        return ConfigError("port", f"{port} needs administrator rights; use a port above 1023, e.g. --port 8080")
    return ConfigError("host", f"cannot listen on {host}:{port}: {e.strerror}")


def check_address(host: str, port: int) -> None:
    """Refuse a port that is taken (or a host that is not this machine's) before anything is written."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            # As the server will: a port in TIME_WAIT is free, one with a listener is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except socket.gaierror as e:
        raise ConfigError("host", f"unknown host {host!r} ({e.strerror})") from None
    except OSError as e:
        raise _port_error(host, port, e) from None


def serve(storage: str, host: str = "127.0.0.1", port: int = 8080, artifact_store: Any = None) -> None:
    """Serve optuna-dashboard on ``storage`` (blocks until interrupted); ``artifact_store``: the study's best models."""
    try:
        optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=artifact_store)
    except OSError as e:
        raise _port_error(host, port, e) from None
