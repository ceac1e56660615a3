"""Plotly figures of a study's privacy–utility picture, built from the storage alone.

Every figure says which split its accuracies come from (validation, the split
tuning reads) and plots ε *spent* per trial — what the trial really used — not
the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState

import dptune.search.record as record
from dptune.search.record import StudyRecord

_COLORS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#7f7f7f"}


def _trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that trained (not rejected before training) and reached an evaluation."""
    return [t for t in study.get_trials(deepcopy=False)
            if not record.is_rejected(t) and record.get(t, record.VAL_ACCURACY) is not None]


def _scatter(study: optuna.Study, x_attr: str, x_title: str, log_x: bool = False) -> go.Figure:
    fig = go.Figure()
    for state in ("COMPLETE", "PRUNED"):
        ts = [t for t in _trained(study) if t.state.name == state and record.get(t, x_attr) is not None]
        fig.add_trace(go.Scatter(
            x=[record.get(t, x_attr) for t in ts],
            y=[record.get(t, record.VAL_ACCURACY) for t in ts],
            mode="markers", name=state.lower(), marker={"color": _COLORS[state], "size": 9},
            text=[f"trial {t.number}" for t in ts],
        ))
    fig.update_layout(title=f"{study.study_name}: validation accuracy vs {x_title}", xaxis_title=x_title,
                      yaxis_title="validation accuracy", xaxis_type="log" if log_x else "linear")
    return fig


def accuracy_vs_epsilon(study: optuna.Study) -> go.Figure:
    fig = _scatter(study, record.EPSILON_SPENT, "ε spent")
    target = StudyRecord.of(study).epsilon_target
    if target is not None:
        fig.add_vline(x=target, line_dash="dash", annotation_text=f"ε target {target:g}")
    return fig


def accuracy_vs_batch_size(study: optuna.Study) -> go.Figure:
    return _scatter(study, record.BATCH_SIZE, "expected batch size B", log_x=True)


def accuracy_vs_noise(study: optuna.Study) -> go.Figure:
    return _scatter(study, record.NOISE_MULTIPLIER, "noise multiplier σ", log_x=True)


def learning_curves(study: optuna.Study) -> go.Figure:
    """Validation accuracy at each evaluation, completed vs pruned trials."""
    fig = go.Figure()
    shown: set[str] = set()
    for t in _trained(study):
        if not t.intermediate_values or t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        steps = sorted(t.intermediate_values)
        fig.add_trace(go.Scatter(
            x=steps, y=[t.intermediate_values[s] for s in steps], mode="lines+markers",
            name=t.state.name.lower(), legendgroup=t.state.name, showlegend=t.state.name not in shown,
            line={"color": _COLORS[t.state.name]}, text=f"trial {t.number}",
        ))
        shown.add(t.state.name)
    fig.update_layout(title=f"{study.study_name}: learning curves (validation accuracy per evaluation)",
                      xaxis_title="evaluation (≈ epochs)", yaxis_title="validation accuracy")
    return fig


def dashboard_figures(study: optuna.Study) -> dict[str, go.Figure]:
    """The figures dptune saves into a study for optuna-dashboard, by stable id."""
    return {
        "dptune-accuracy-vs-epsilon": accuracy_vs_epsilon(study),
        "dptune-accuracy-vs-batch-size": accuracy_vs_batch_size(study),
        "dptune-accuracy-vs-noise": accuracy_vs_noise(study),
        "dptune-learning-curves": learning_curves(study),
    }


def privacy_utility_curve(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Best accuracy against ε across studies. ``rows``: name, epsilon, total_epsilon, val, test."""
    rows = sorted(rows, key=lambda r: r["epsilon"])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[r["epsilon"] for r in rows], y=[r["val"] for r in rows], mode="lines+markers",
                             name="best validation accuracy (per-trial ε)", text=[r["name"] for r in rows]))
    fig.add_trace(go.Scatter(x=[r["epsilon"] for r in rows], y=[r["test"] for r in rows], mode="lines+markers",
                             name="its test accuracy (per-trial ε)", text=[r["name"] for r in rows]))
    fig.add_trace(go.Scatter(x=[r["total_epsilon"] for r in rows], y=[r["test"] for r in rows],
                             mode="markers", marker={"symbol": "x", "size": 11},
                             name="its test accuracy at the search's total ε", text=[r["name"] for r in rows]))
    fig.update_layout(title="Privacy–utility: best accuracy against ε", xaxis_title="ε", yaxis_title="accuracy",
                      xaxis_type="log")
    return fig


def optuna_figures(study: optuna.Study) -> dict[str, go.Figure]:
    """Optuna's own plots: history, intermediate values, importances, slices of the DP knobs."""
    from optuna import visualization as vis

    figs: dict[str, go.Figure] = {
        "Optimisation history": vis.plot_optimization_history(study),
        "Intermediate values (pruning)": vis.plot_intermediate_values(study),
    }
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        try:
            figs["Parameter importances"] = vis.plot_param_importances(study)
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass  # too few distinct completed trials for an importance estimate
    params = sorted({p for t in complete for p in t.params})
    if params:
        figs["Slices (" + ", ".join(params) + ")"] = vis.plot_slice(study, params=params)
    return figs
