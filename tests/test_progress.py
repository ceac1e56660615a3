"""Progress you can watch: events from a run and a study, as key=value log lines, JSON lines, a live view."""

import json
import shlex

import jax
import pytest
from rich.console import Console

from dptune import progress
from dptune.data.datasets import load_dataset
from dptune.progress import Event, StepMeter
from dptune.trainer import compile_stats
from dptune.trainer import train as trainer
from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig, train_and_evaluate
from tests.conftest import run_cli


def _pairs(line: str) -> dict[str, str]:
    words = shlex.split(line)
    assert all("=" in w for w in words), line
    return dict(w.split("=", 1) for w in words)


def test_a_key_value_line_round_trips_whatever_its_values():
    line = progress.key_values(Event("phase", {"phase": 'a "quoted" = thing', "n": 15090.0, "ok": True,
                                               "none": None, "x": 0.123456}))
    assert "\n" not in line and "none=" not in line
    assert _pairs(line) == {"event": "phase", "phase": 'a "quoted" = thing', "n": "15090", "ok": "true",
                            "x": "0.1235"}


def test_step_events_are_throttled_on_the_host_clock_and_bound_epsilon_by_the_cap():
    now = [0.0]
    got = []
    meter = StepMeter(got.append, planned=100, start=0, sampling_rate=0.1, batch_size=10,
                      epsilon_at=lambda t: 0.1 * t, epsilon_budget=5.0, interval=10.0, clock=lambda: now[0])
    for t in range(1, 101):
        now[0] = float(t)  # a step a second
        meter.step(t)
    assert [e.data["step"] for e in got] == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91]  # one per 10 s
    assert got[1].data["run_epsilon"] == pytest.approx(1.1) and got[-1].data["run_epsilon"] == 5.0  # min(RDP, cap)
    meter.evaluated(100, {"val_accuracy": 0.5, "best_val_accuracy": 0.6})
    last = got[-1].data
    assert got[-1].kind == "eval" and last["val_accuracy"] == 0.5 and meter.val == 0.6
    assert last["examples_per_second"] == pytest.approx(10.0) and last["remaining"] == 0


def test_progress_adds_no_compilation_and_no_device_sync(monkeypatch):
    digits = load_dataset("digits")
    hp = Hyperparams(batch_size=200, learning_rate=0.5, clip_norm=1.0, noise_multiplier=2.0)
    syncs = []
    real = jax.block_until_ready
    monkeypatch.setattr(trainer.jax, "block_until_ready", lambda x: syncs.append(1) or real(x))

    def run(report):
        syncs.clear()
        before = compile_stats.backend_compiles()
        train_and_evaluate(digits, hp, 12, config=RunConfig(microbatch_size=64, eval_every=4),
                           budget=PrivacyBudget(8.0, 1e-5), progress=report)
        return compile_stats.backend_compiles() - before, len(syncs)

    run(None)  # compiles whatever the first run of these shapes compiles
    events = []
    assert run(events.append) == run(None)
    assert {e.kind for e in events} >= {"phase", "eval"} and sum(e.kind == "eval" for e in events) == 3


def test_a_live_view_shows_each_running_trial_and_the_study():
    console = Console(record=True, width=200, force_terminal=True)
    with progress.Live(console=console) as live:
        live(Event("step", {"trial": 3, "step": 40, "planned": 120, "epoch": 1.5, "examples_per_second": 900.0,
                            "run_epsilon": 1.2, "epsilon_budget": 3.0, "val_accuracy": 0.91, "elapsed": 65.0,
                            "remaining": 130.0}))
        live(Event("step", {"worker": 1, "trial": 4, "step": 7, "planned": 120, "elapsed": 5.0}))
        live(Event("study", {"study": "s", "done": 2, "asked": 8, "best": 0.93, "search_epsilon": 4.5,
                             "remaining": 600.0}))
        shown = console.export_text()
        live(Event("trial", {"trial": 4, "state": "COMPLETE"}))  # reported by the study, without the worker
        assert list(live.runs) == [(None, 3)]
    assert "trial 3: step 40/120  epoch 1.50  900 ex/s  ε 1.2 of 3 (this run)  val 0.9100  1:05 elapsed, 2:10 left" \
        in shown
    assert "worker 1 trial 4: step 7/120" in shown
    assert "study s: 2/8 trials  best 0.9300  search ε 4.5  about 10:00 left" in shown


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_piped_two_worker_study_logs_one_unwrapped_record_per_event(tmp_path, log_format):
    import yaml

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "watch", "dataset": "digits", "privacy": {"epsilon": 3.0}, "microbatch_size": 64,
        "budget": {"max_epochs": 2, "min_steps": 1}, "pruner": {"name": "none"}, "eval_every_epochs": 0.5,
        "search_space": {"batch_size": 256, "learning_rate": {"low": 0.5, "high": 2.0}, "clip_norm": 1.0,
                         "epochs": 2}}))
    storage = f"journal:///{tmp_path / 'w.journal'}"
    assert run_cli("study", "create", "--config", "s.yaml", "--storage", storage, cwd=tmp_path).returncode == 0
    p = run_cli("optimize", "--study-name", "watch", "--storage", storage, "--n-trials", "2", "--workers", "2",
                "--log-format", log_format, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if log_format == "json":
        records = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    else:
        records = [_pairs(line) for line in p.stderr.splitlines() if line.startswith("event=")]
    kinds = [r["event"] for r in records]
    assert kinds.count("trial") == 2 and kinds.count("study") == 2 and "eval" in kinds
    assert {str(r["worker"]) for r in records if r["event"] == "eval"} <= {"0", "1"}
    for line in p.stderr.splitlines():  # every other line is a whole sentence, never a wrapped piece of one
        assert len(line) < 80 or line.startswith(("event=", "{", "dptune", "ε", "Privacy", "Coverage", "Treated",
                                                 "Assumptions", "Search", "watch", "best")) or " " in line
