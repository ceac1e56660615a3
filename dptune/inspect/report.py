"""One self-contained HTML report of one or more studies (plotly.js inlined: no network to view it)."""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Sequence
from typing import cast

import optuna
import plotly.graph_objects as go
import plotly.offline

import dptune.search.record as record
from dptune.errors import ConfigError
from dptune.inspect import figures
from dptune.search.record import StudyRecord
from dptune.search.results import coverage, fmt, interval_text, shown_record, summarize

TOP = 10


def _fig_html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def _fmt(v: object) -> str:
    return html.escape(fmt(v, missing="–"))


def _top_table(study: optuna.Study) -> str:
    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.value is not None),
                    key=lambda t: cast(float, t.value), reverse=True)[:TOP]
    # A pruned trial's value is its accuracy when it was stopped, not a finished run's: the state says which.
    cols = ["number", "state", "value", *record.TOP_TABLE]
    head = "".join(f"<th>{c}</th>" for c in ["trial", "state", "val acc"] + cols[3:])
    body = []
    for t in trials:
        r = shown_record(study, t)
        body.append("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>")
    return f"<table class='top'><tr>{head}</tr>{''.join(body)}</table>"


def _study_section(study: optuna.Study, index: int) -> str:
    s = summarize(study)
    g = s.search
    parts = [
        f"<h2>{html.escape(study.study_name)}</h2>",
        *(["<p><b>INTERNAL — do not publish:</b> trial numbers and counts reveal the secret number of trials on "
           "which the private search's bound rests.</p>"] if s.private_search else []),
        f"<p><b>Budget:</b> {html.escape(s.budget_text)}. "
        f"<b>ε of releasing the best model after this search: {_fmt(g['total_epsilon'])}</b>. "
        f"{html.escape(g['guarantee'])} {html.escape(coverage(study))}</p>",
        f"<p>{s.n_trials} trials: {s.complete} complete, {s.pruned} pruned, {s.rejected} rejected before training, "
        f"{s.failed} failed; {s.trial_steps} trial-steps. Accuracies: validation split unless marked test.</p>",
    ]
    if s.guarantee.tuning is not None:  # a cheaper-tuning study: its compute and its released final run
        w, f = g["compute"], g.get("final")
        parts.append(f"<p><b>Search mode {html.escape(g['search_mode'])}:</b> the proxies alone, composed "
                     f"without amplification, ε {_fmt(g['proxy_epsilon'])}; {w['proxy_examples']:,} examples "
                     f"({w['proxy_steps']} steps) in "
                     f"proxies, {w['final_examples']:,} ({w['final_steps']} steps) in the final run. "
                     + ("Not finalized: nothing is released yet." if f is None else
                        f"Released: the final run (trial {f['trial']}), test {_fmt(f['test_accuracy'])}, its own ε "
                        f"{_fmt(f['epsilon'])}.") + "</p>")
    if s.best:
        parts.append(f"<p><b>Best trial {s.best['number']}:</b> validation {_fmt(s.best['value'])}, "
                     f"test {_fmt(s.best.get('test_accuracy'))}, ε spent {_fmt(s.best.get('epsilon_spent'))}. "
                     + html.escape(interval_text(s.best, s.private_search)) + "." + "</p>")
    parts.append("<h3>Top trials and their privacy spend</h3>" + _top_table(study))
    figs = {**figures.optuna_figures(study), **{
        "Validation accuracy vs ε spent": figures.accuracy_vs_epsilon(study),
        "Validation accuracy vs batch size": figures.accuracy_vs_batch_size(study),
        "Validation accuracy vs σ": figures.accuracy_vs_noise(study),
        "Learning curves: completed vs pruned": figures.learning_curves(study),
    }}
    for j, (title, fig) in enumerate(figs.items()):
        parts.append(f"<h3>{html.escape(title)}</h3>" + _fig_html(fig, f"fig-{index}-{j}"))
    parts.append("<h3>Configuration</h3><pre>"
                 + html.escape(json.dumps(StudyRecord.of(study).config, indent=2)) + "</pre>")
    return "\n".join(parts)


def _comparison_table(studies: Sequence[optuna.Study]) -> str:
    """One row per study: how it tuned, what it releases, at what total ε and for what compute."""
    head = ("<tr><th>study</th><th>search mode</th><th>released model's test accuracy</th><th>total ε</th>"
            "<th>examples processed (tuning / final)</th><th>trial-steps</th></tr>")
    rows = []
    for st in studies:
        s = summarize(st)
        g = s.search
        mode = s.guarantee.tuning or ("non-private" if s.non_private else f"ordinary ({g.get('mode')})")
        if s.private_search:
            # What a private search may publish: nothing that adds up over its secret number of trials.
            compute, steps = "(secret: reveals K)", "(secret)"
        elif s.guarantee.tuning is not None:
            w = g["compute"]
            compute, steps = f"{w['proxy_examples']:,} / {w['final_examples']:,}", f"{s.trial_steps:,}"
        else:
            compute, steps = f"{s.examples_processed:,} / –", f"{s.trial_steps:,}"
        test = None if s.best is None else s.best.get("test_accuracy")
        rows.append(f"<tr><td>{html.escape(st.study_name)}</td><td>{html.escape(mode)}</td><td>{_fmt(test)}</td>"
                    f"<td>{_fmt(g.get('total_epsilon'))}</td><td>{compute}</td><td>{steps}</td></tr>")
    return f"<table class='top'>{head}{''.join(rows)}</table>"


def render(studies: Sequence[optuna.Study]) -> str:
    """The report's HTML text."""
    sections = [_study_section(s, i) for i, s in enumerate(studies)]
    if len(studies) > 1:
        rows = []
        for st in studies:
            s = summarize(st)
            if s.best and not s.non_private:
                rows.append({"name": st.study_name, "epsilon": s.epsilon_target,
                             "total_epsilon": s.search["total_epsilon"],
                             "val": s.best["value"], "test": s.best.get("test_accuracy")})
        if rows:
            sections.insert(0, "<h2>Privacy–utility across studies</h2>"
                            + _fig_html(figures.privacy_utility_curve(rows), "fig-privacy-utility"))
        sections.insert(0, "<h2>Studies side by side</h2>" + _comparison_table(studies))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table.top{border-collapse:collapse;font-size:90%}table.top td,table.top th{border:1px solid #ccc;"
             "padding:2px 6px}pre{background:#f6f6f6;padding:1em;overflow:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>dptune report</title>"
            f"<style>{style}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script>"
            f"</head><body><h1>dptune report</h1>{''.join(sections)}</body></html>")


def write(studies: Sequence[optuna.Study], path: str) -> str:
    """Write the report to ``path`` whole or not at all (a temporary file beside it, then renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError("output", f"{path!r} is a folder; name an HTML file, "
                                    f"e.g. {os.path.join(path, 'report.html')}")
    if not os.path.isdir(folder):
        # Before rendering, which takes a while and logs Optuna's warnings about the study.
        raise ConfigError("output", f"cannot write {path!r}: the folder {os.path.dirname(path) or '.'!r} "
                                    "does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError("output", f"cannot write {path!r}: the folder {os.path.dirname(path) or '.'!r} is read-only")
    text = render(studies)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise ConfigError("output", f"cannot write {path!r}: {e.strerror or e}") from None
    return path
