"""optuna-dashboard for dptune studies: dptune's note and figures saved into the study, and the server."""

from __future__ import annotations

import json

import optuna
import optuna_dashboard

from dptune import figures
from dptune.study import CONFIG_ATTR, coverage, summarize


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
        json.dumps(study.user_attrs.get(CONFIG_ATTR, {}), indent=2),
        "```",
    ]
    return "\n".join(lines)


def publish(study: optuna.Study) -> list[str]:
    """Save (or refresh) dptune's note and plotly figures into the study; returns the figure ids."""
    optuna_dashboard.save_note(study, study_note(study))
    ids = []
    for graph_id, fig in figures.dashboard_figures(study).items():
        ids.append(optuna_dashboard.save_plotly_graph_object(study, fig, graph_object_id=graph_id))
    return ids


def serve(storage: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard on ``storage`` (blocks until interrupted)."""
    optuna_dashboard.run_server(storage, host=host, port=port)
