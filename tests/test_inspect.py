"""Inspection reads the storage only: export compared with Optuna, report and dashboard in a real browser."""

import json
import os
import socket
import sqlite3
import subprocess
import sys

import optuna
import pytest
import yaml

from dptune.config import schema as config
from dptune.inspect import dashboard, export, report
from dptune.search import study
from tests.browser import chromium, screenshot, wait_for, wait_for_dashboard

SPACE = {"batch_size": {"low": 100, "high": 1000, "log": True}, "learning_rate": {"low": 0.1, "high": 5.0},
         "clip_norm": 1.0, "noise_multiplier": {"low": 0.5, "high": 3.0}}


def make_study(tmp_path, name="insp", epsilon=3.0, n=8):
    """A dptune study with trials recorded as the driver records them (no training: fast)."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    cfg = {"name": name, "dataset": "digits", "privacy": {"epsilon": epsilon, "delta": 1e-5},
           "search_space": "space.yaml"}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    storage = f"sqlite:///{tmp_path / 'inspect.db'}"
    s = study.create_study(config.load_study(str(tmp_path / f"{name}.yaml")), storage)
    dist = {"batch_size": optuna.distributions.IntDistribution(100, 1000, log=True),
            "learning_rate": optuna.distributions.FloatDistribution(0.1, 5.0),
            "noise_multiplier": optuna.distributions.FloatDistribution(0.5, 3.0)}
    for i in range(n):
        pruned = i % 3 == 2
        b, lr, sigma = 100 + 100 * i, 0.5 + 0.4 * i, 0.6 + 0.25 * i
        curve = {k: min(0.95, 0.2 + 0.1 * k + 0.02 * i) for k in range(1, 3 if pruned else 6)}
        acc = curve[max(curve)]
        attrs = {"epsilon_target": epsilon, "delta": 1e-5, "accountant": "pld", "sampling_rate": b / 1259,
                 "noise_multiplier": sigma, "batch_size": b, "learning_rate": lr, "clip_norm": 1.0,
                 "steps": 10 * len(curve), "planned_steps": 50, "epochs": len(curve) * 1.0,
                 "epsilon_spent": epsilon * len(curve) / 5, "val_accuracy": acc, "test_accuracy": acc - 0.01,
                 "examples_per_second": 1000.0 + i, "history": [1, 2]}
        s.add_trial(optuna.trial.create_trial(
            params={"batch_size": b, "learning_rate": lr, "noise_multiplier": sigma}, distributions=dist,
            user_attrs=attrs, intermediate_values=curve,
            # Optuna gives a pruned trial its last reported value, as in a real run.
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE, value=acc))
    return s, storage


def test_export_matches_the_storage_and_upserts(tmp_path):
    s, _ = make_study(tmp_path)
    out = str(tmp_path / "results.db")
    counts = export.to_sqlite([s], out)
    export.to_sqlite([s], out)  # again: rows updated, not duplicated
    con = sqlite3.connect(out)
    rows = con.execute("select number, state, value, epsilon_spent, param_batch_size, history from trials "
                       "order by number").fetchall()
    assert len(rows) == len(s.trials) == counts["trials"]
    for row, t in zip(rows, s.trials, strict=False):
        assert row[0] == t.number and row[1] == t.state.name and row[2] == t.value
        assert row[3] == pytest.approx(t.user_attrs["epsilon_spent"])
        assert row[4] == t.params["batch_size"] and row[5] == "[1, 2]"
    inter = con.execute("select number, step, value from intermediate_values order by number, step").fetchall()
    expected = [(t.number, k, v) for t in s.trials for k, v in sorted(t.intermediate_values.items())]
    assert inter == expected
    indexes = {r[1] for r in con.execute("select * from sqlite_master where type = 'index'").fetchall()}
    assert any("state" in i for i in indexes)
    csv_text = export.to_text([s], "csv")
    assert csv_text.splitlines()[0].startswith("study,number,state,value")
    assert len(csv_text.strip().splitlines()) == len(s.trials) + 1


def test_report_renders_every_figure_in_a_browser(tmp_path):
    a, storage = make_study(tmp_path, "eps1", 1.0)
    b, _ = make_study(tmp_path, "eps3", 3.0)
    path = report.write([a, b], str(tmp_path / "report.html"))
    text = open(path).read()
    assert "<script src=" not in text  # self-contained: no network needed
    # A pruned trial's value is a partial accuracy: the top-trials table says which trials were pruned.
    assert "<th>state</th>" in text and "<td>PRUNED</td>" in text and "<td>COMPLETE</td>" in text
    driver = chromium()
    try:
        driver.get("file://" + path)
        script = ("return Array.from(document.querySelectorAll('.plotly-graph-div')).map("
                  "e => [e.id, e.querySelectorAll('.main-svg').length, e.querySelectorAll('.scatterlayer .trace, "
                  ".barlayer .trace').length])")
        figures = wait_for(driver, lambda d: (lambda f: f if f and all(x[1] for x in f) else None)(
            d.execute_script(script)), what="plotly figures to render")
        screenshot(driver, "report.png")
    finally:
        driver.quit()
    ids = [f[0] for f in figures]
    assert "fig-privacy-utility" in ids
    assert len(figures) >= 2 * 7 + 1
    empty = [f for f in figures if f[1] == 0 or f[2] == 0]
    assert not empty, f"figures that did not render: {empty}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_dashboard_shows_the_study_and_its_trials(tmp_path):
    s, storage = make_study(tmp_path, "dashboard_study")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "dptune.cli", "dashboard", "--study-name", "dashboard_study",
                             "--storage", storage, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_dashboard(url, proc)
        # What dptune saved into the study is there for the dashboard to show.
        loaded = optuna.load_study(study_name="dashboard_study", storage=storage)
        assert "dptune-accuracy-vs-epsilon" in str(loaded._storage.get_study_system_attrs(loaded._study_id))
        driver = chromium()
        try:
            driver.get(url + "/dashboard")
            wait_for(driver, lambda d: "dashboard_study" in d.page_source, what="the study on the home page")
            screenshot(driver, "dashboard_home.png")
            study_id = loaded._study_id
            driver.get(f"{url}/dashboard/studies/{study_id}")
            wait_for(driver, lambda d: "validation accuracy vs ε spent" in d.page_source,
                     what="dptune's saved figures on the study page")
            # The guarantee in one line on the study page itself, and the objective by its name.
            assert "ε of releasing the best model:" in driver.page_source
            assert "val_accuracy" in driver.page_source
            screenshot(driver, "dashboard_study.png")
            driver.get(f"{url}/dashboard/studies/{study_id}/note")
            wait_for(driver, lambda d: "releasing the best model after this search" in d.page_source,
                     what="dptune's note")
            screenshot(driver, "dashboard_note.png")
            driver.get(f"{url}/dashboard/studies/{study_id}/trials")
            wait_for(driver, lambda d: "Trial 0" in d.page_source and "epsilon_spent" in d.page_source,
                     what="the trials and their privacy attributes")
            screenshot(driver, "dashboard_trials.png")
        finally:
            driver.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_publish_refreshes_rather_than_duplicates(tmp_path):
    s, _ = make_study(tmp_path)
    first = dashboard.publish(s)
    second = dashboard.publish(s)
    assert first == second and len(first) == 4
    assert "ε of releasing the best model after this search" in dashboard.study_note(s)
    assert s.metric_names == ["val_accuracy"]
    headline = dashboard.headline(s)
    assert headline.startswith("ε of releasing the best model: ") and "Note" in headline
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    saved = get_plotly_graph_objects(s._storage.get_study_system_attrs(s._study_id))
    titles = [json.loads(v)["layout"]["title"]["text"] for v in saved.values()]
    assert len(titles) == 4 and all(t.startswith(headline) for t in titles)
    assert dashboard.note_url(s, "127.0.0.1", 8080) == f"http://127.0.0.1:8080/dashboard/studies/{s._study_id}/note"
