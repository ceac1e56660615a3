"""The commands of ``dptune``: each calls the library and renders what it returns.

No privacy or planning logic lives here: δ, σ, steps, the search's guarantee
and what may be published come from the library (:mod:`dptune.trainer.run`,
:mod:`dptune.privacy.calculator`, :mod:`dptune.search`). Library errors
propagate to :func:`dptune.cli.app.main`, which turns them into one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from dptune.errors import PrivacyError


def _dump(obj: Any) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=2)


_HEADERS = {"epsilon": "ε", "target_epsilon": "target ε", "delta": "δ", "sampling_rate": "q",
            "noise_multiplier": "σ", "steps": "T", "single_trial_epsilon": "ε one trial",
            "search_epsilon": "ε search", "naive_composition_epsilon": "ε naive", "naive_trials": "naive K",
            "mean_trials": "mean K", "distribution": "K law"}


def _print_privacy(args: argparse.Namespace, table: Any, what: str) -> None:
    if args.json:
        print(_dump(table.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    rows = table.rows
    out = Table(title=what)
    cell = lambda v: "-" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))  # noqa: E731
    if len(rows) == 1:
        out.add_column("quantity")
        out.add_column("value", justify="right")
        for key, value in rows[0].items():
            out.add_row(_HEADERS.get(key, key), cell(value))
    else:
        for col in rows[0]:
            out.add_column(_HEADERS.get(col, col))
        for r in rows:
            out.add_row(*(cell(v) for v in r.values()))
    console = Console()
    console.print(out)
    for note in table.notes:
        console.print(note)
    if table.delta_is_default:
        console.print(f"δ = {table.delta:g} by default (well below 1/N); set it with --delta.")
    if table.statement is not None:
        print("\n" + table.statement)


def _duration(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "epochs": args.epochs}


def cmd_privacy_epsilon(args: argparse.Namespace) -> int:
    from dptune.privacy import calculator

    table = calculator.epsilon_table(args.dataset_size, args.batch_size, args.noise_multiplier, delta=args.delta,
                                     accountant=args.accountant, statement=args.statement, **_duration(args))
    _print_privacy(args, table, "ε of DP-SGD (Poisson sampling)")
    return 0


def cmd_privacy_noise(args: argparse.Namespace) -> int:
    from dptune.privacy import calculator

    table = calculator.noise_table(args.dataset_size, args.batch_size, args.epsilon, delta=args.delta,
                                   accountant=args.accountant, **_duration(args))
    _print_privacy(args, table, "Smallest σ that meets the budget")
    return 0


def cmd_privacy_steps(args: argparse.Namespace) -> int:
    from dptune.privacy import calculator

    table = calculator.steps_table(args.dataset_size, args.batch_size, args.noise_multiplier, args.epsilon,
                                   delta=args.delta, accountant=args.accountant)
    _print_privacy(args, table, "Most steps within the budget")
    return 0


def cmd_privacy_search(args: argparse.Namespace) -> int:
    from dptune.privacy import calculator
    from dptune.privacy.search_totals import TrialCount

    table = calculator.search_table(args.dataset_size, args.batch_size,
                                    TrialCount(args.distribution, args.mean_trials, args.eta),
                                    noise_multiplier=args.noise_multiplier, total_epsilon=args.total_epsilon,
                                    delta=args.delta, **_duration(args))
    _print_privacy(args, table, "Private hyperparameter search (Papernot & Steinke 2022) vs naive composition")
    return 0


# Flags of `dptune train`/`pretrain` that set a study setting: flag name -> dotted key of the study schema.
SETTING_FLAGS = {
    "dataset": "dataset", "data_dir": "data_dir", "model": "model", "image_size": "image_size",
    "epsilon": "privacy.epsilon", "delta": "privacy.delta", "accountant": "privacy.accountant",
    "microbatch_size": "microbatch_size", "clipping": "clipping", "feed": "feed",
    "loader_workers": "loader_workers", "device_data_fraction": "device_data_fraction", "seed": "seed",
    "private_seed": "private_seed", "non_private": "non_private", "weight_standardization": "weight_standardization",
    "init_checkpoint": "init_checkpoint", "reinitialize": "reinitialize",
    "augment_multiplicity": "augmentation.multiplicity", "augment_shift": "augmentation.shift",
    "augment_flip": "augmentation.flip", "unsafe_ignore_checkpoint_provenance": "unsafe_ignore_checkpoint_provenance",
}


HYPERPARAMETER_FLAGS = ("batch_size", "learning_rate", "clip_norm", "noise_multiplier", "epochs", "optimizer",
                        "momentum", "ema_decay", "trainable")


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags the user gave (argparse defaults are None or False: defaults live in the schema).

    ``0`` is a value given (``--private-seed 0``, ``--epsilon 0``), so the test is by identity, not ``in``.
    """
    out = {}
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v is not False:
            out[n] = v
    return out


@contextlib.contextmanager
def _reporting(args: argparse.Namespace) -> Iterator[Any]:
    """The progress reporter ``--log-format`` asks for, on stderr; a live display is closed on the way out."""
    from dptune import progress

    report = progress.reporter(getattr(args, "log_format", "text"))
    try:
        yield report
    finally:
        if isinstance(report, progress.Live):
            report.close()


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dptune.config.schema import run_settings
    from dptune.trainer import compile_stats, multihost
    from dptune.trainer.run import pretrain, train

    if getattr(args, "coordinator", None) or getattr(args, "num_processes", 1) > 1 or getattr(args, "process_id", 0):
        # Before any computation: every process must join the runtime first (dptune.trainer.multihost).
        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    console = Console(stderr=args.json, soft_wrap=True)
    compile_stats.enable_persistent_cache(args.cache_dir)
    # Precedence: the schema's defaults < --config FILE < --set KEY=VALUE < the flags given.
    flags = [(SETTING_FLAGS[k], v) for k, v in _given(args, list(SETTING_FLAGS)).items()]
    settings = run_settings(args.config, [*(args.set or []), *flags])  # validated once, by the schema

    with _reporting(args) as report:
        common = dict(hyperparameters=_given(args, HYPERPARAMETER_FLAGS), eval_every=args.eval_every,
                      devices=args.devices, log=console.print, progress=report)
        if args.command == "pretrain":
            run = pretrain(settings, output=args.output, declare_public=args.declare_public, **common)
        else:
            run = train(settings, save_checkpoint=args.save_checkpoint, **common)
    _render_train(run, args, console)
    return 0


def _render_train(run: Any, args: argparse.Namespace, console: Any) -> None:
    result, statement = run.result, run.statement
    if args.json:
        print(_dump(run.as_dict()))
        return
    if result.epsilon is None:
        eps = "∞ (non-private)"
    else:
        eps = f"{result.epsilon:.4f} (δ = {run.delta:g}, {run.settings.privacy.accountant})"
    if result.prior_events or result.prior_bounds:
        eps += (f" for this run; {result.total_epsilon:.4f} (δ = {result.total_delta:g}) in all with the initial "
                "checkpoint's recorded training on this data")
    console.print(f"[bold]{run.dataset}[/] {run.settings.model}: validation accuracy {result.val_accuracy:.4f}, "
                  f"test accuracy {result.test_accuracy:.4f}, ε spent {eps}")
    if result.ema_val_accuracy is not None:
        console.print(f"EMA parameters: validation accuracy {result.ema_val_accuracy:.4f}, test accuracy "
                      f"{result.ema_test_accuracy:.4f} — selected by validation: {result.selected}")
    saved = args.output if args.command == "pretrain" else args.save_checkpoint
    if saved:
        console.print(f"saved the {result.selected} parameters to {saved} (+ .json)")
    console.print(f"{result.steps} steps ({result.epochs:.2f} epochs) of {result.steps_requested} requested"
                  f"{' — stopped at the privacy budget' if result.budget_limited else ''}; "
                  f"{result.examples_per_second:,.0f} examples/s on {result.devices} device(s), "
                  f"compile {result.compile_seconds:.1f} s, wall {result.wall_seconds:.1f} s")
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    if statement is not None:
        console.print("\n[bold]Privacy statement[/]\n" + statement.text(), highlight=False)


_EXPLICIT = ("batch_size", "learning_rate", "clip_norm", "noise_multiplier", "epsilon", "steps", "epochs")


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dptune.search import audit
    from dptune.trainer import compile_stats

    console = Console(stderr=args.json, highlight=False, soft_wrap=True)
    compile_stats.enable_persistent_cache(args.cache_dir)

    def progress(line: str) -> None:
        console.print(line)

    common = dict(threat_model=args.threat_model, canaries=args.canaries, canary_seed=args.canary_seed,
                  confidence=args.confidence, progress=progress)
    if args.study_name:
        given = [f"--{k.replace('_', '-')}" for k in _EXPLICIT if getattr(args, k) is not None]
        if given:
            raise PrivacyError(f"{given[0].lstrip('-')}: explicit hyperparameters and --study-name exclude each "
                               "other (the audit re-runs the trial's own configuration)")
        from dptune import interrupt

        try:
            with interrupt.handled(), _reporting(args) as report:
                result = audit.audit_study(args.study_name, args.storage, args.trial, events=report, **common)
        except KeyboardInterrupt as e:
            print(f"dptune: interrupted by {interrupt.signal_name(e)}: the audit run was marked FAIL (counted in "
                  "the search at its planned steps if it read the data)", file=sys.stderr, flush=True)
            return interrupt.exit_code(e)
    else:
        if args.trial is not None:
            raise PrivacyError("trial: --trial needs --study-name")
        result = _audit_explicit(args, common)
    if args.json:
        print(_dump(result.as_dict()))
    else:
        console.print(result.text())
    return 0


def _audit_explicit(args: argparse.Namespace, common: dict) -> Any:
    from dptune.search import audit

    given = {k: getattr(args, k) for k in ("batch_size", "learning_rate", "clip_norm", "noise_multiplier", "epsilon",
                                           "delta", "steps", "epochs") if getattr(args, k) is not None}
    return audit.audit_run(args.dataset, data_dir=args.data_dir, model=args.model, accountant=args.accountant,
                           optimizer=args.optimizer, momentum=args.momentum, microbatch_size=args.microbatch_size,
                           clipping=args.clipping, devices=args.devices, seed=args.seed,
                           private_seed=args.private_seed, **given, **common)


def _fmt(v: Any, digits: int = 4) -> str:
    from dptune.search.results import fmt

    return fmt(v, digits)


def _trial_line(t: Any, numbered: bool = True) -> str:
    """One trial in a line; ``numbered=False`` for private searches, whose trial numbers are internal."""
    from dptune.search import record

    def of(key: str, default: Any = None) -> Any:
        return record.get(t, key, default)

    state = t.state.name
    if state == "PRUNED" and record.is_rejected(t):
        state = "REJECTED"
    params = "  ".join(f"{k}={_fmt(v, 3)}" for k, v in t.params.items())
    reason = of(record.REJECTED_REASON) or (of(record.FAILED_REASON) if state == "FAIL" else None)
    tail = f"  ({reason})" if reason else ""
    head = f"trial {t.number:3d} {state:9s}" if numbered else f"trial {state:9s}"
    return (f"{head} val_acc {_fmt(of(record.VAL_ACCURACY))}  ε {_fmt(of(record.EPSILON_SPENT))}/"
            f"{_fmt(of(record.EPSILON_TARGET))}  steps {of(record.STEPS, '-')}  "
            f"σ {_fmt(of(record.NOISE_MULTIPLIER), 3)}  {params}{tail}")


def cmd_study_create(args: argparse.Namespace) -> int:
    from dptune.config import schema as config
    from dptune.search import results, study

    resolved = config.resolve(args.config, args.set or None)
    storage = args.storage or resolved.study.storage or config.default_storage(resolved.study.name)
    created = study.create_study(resolved, storage, skip_if_exists=args.skip_if_exists, source=args.config)
    out = results.creation(created, storage)
    if args.json:
        print(_dump(out))
    else:
        from dptune.search.record import StudyRecord

        private = StudyRecord.of(created).private_search
        if out["total_budget"] is not None:
            print(_total_created(out["study_name"], storage, out["total_budget"], out["delta"]))
        elif private:
            print(f"study {out['study_name']!r} in {storage}: private search, total ε = "
                  f"{private['total_epsilon']:.4g} (δ = {out['delta']:g}) over a secret number of trials drawn "
                  f"from a {private['distribution']} law of mean {private['mean_trials']:g}; each trial runs "
                  f"σ = {private['noise_multiplier']:.4g} for {private['steps']} steps (q = "
                  f"{private['sampling_rate']:.4g}). The storage holds K and every trial: keep it internal.")
        elif out["epsilon"] is None:
            print(f"study {out['study_name']!r} in {storage}: non-private baseline (no privacy), "
                  f"{out['trials']} trial(s) so far")
        else:
            print(f"study {out['study_name']!r} in {storage}: ε = {out['epsilon']:g} per trial, "
                  f"δ = {out['delta']:g}, {out['trials']} trial(s) so far")
    return 0


INTERRUPTED = ("dptune: interrupted by {signal}: running trials were marked FAIL, finished trials are kept, "
               "nothing is left RUNNING. Re-run to continue the study.")


def cmd_optimize(args: argparse.Namespace) -> int:
    from dptune import interrupt

    # SIGTERM (a scheduler, kill) stops a study as cleanly as Ctrl-C does.
    try:
        with interrupt.handled():
            return _optimize(args)
    except KeyboardInterrupt as e:
        # One line, not Rich's console: it must not be wrapped or styled.
        print(INTERRUPTED.format(signal=interrupt.signal_name(e)), file=sys.stderr, flush=True)
        return interrupt.exit_code(e)


def _optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dptune.search import study
    from dptune.trainer import compile_stats

    compile_stats.enable_persistent_cache(args.cache_dir)
    console = Console(stderr=True, soft_wrap=True)
    if args.workers == "auto":
        from dptune.config import schema as config
        from dptune.search import workers

        storage = args.storage or config.default_storage(args.study_name)
        _, resolved = study.load(args.study_name, storage)
        args.workers, per_trial, why = workers.auto_layout(resolved.study.model, storage)
        args.devices_per_trial = args.devices_per_trial or per_trial or 1
        if why:
            console.print(f"workers: {why}")
    args.devices_per_trial = args.devices_per_trial or 1
    if args.workers > 1:
        return _optimize_pool(args, console)
    with _reporting(args) as report:
        # Each finished trial and the search so far arrive as events (none per trial in a private search).
        result = study.optimize(args.study_name, args.storage, n_trials=args.n_trials, timeout=args.timeout,
                                progress=report)
    from dptune.inspect import dashboard

    dashboard.publish(result)  # refresh the note and figures optuna-dashboard shows
    _emit_summary(result, args.json)
    return 0


def _emit_summary(s: Any, as_json: bool, internal: bool = False) -> None:
    """The study's summary and written privacy statement; for a private search only what may be
    released, unless ``internal``."""
    from dptune.search import results

    summary = results.summarize(s)
    statement = results.privacy_statement(s, summary)
    text = None if statement is None else statement.text()
    if as_json:
        body = summary.as_dict() if internal else summary.release()
        print(_dump({**body, "statement": text, "internal": internal or not summary.private_search}))
        return
    _print_summary(summary, internal)
    if text is not None:
        from rich.console import Console

        Console(soft_wrap=True).print("\n[bold]Privacy statement[/]\n" + text, highlight=False)


def _load_studies(names: Sequence[str], storage: str | None) -> list:
    from dptune.search import study

    return [study.load(name, storage)[0] for name in names]


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dptune.config import schema as config
    from dptune.inspect import dashboard

    storage = args.storage or config.default_storage(args.study_name)
    s = _load_studies([args.study_name], storage)[0]
    dashboard.check_address(args.host, args.port)
    dashboard.publish(s)
    print(f"optuna-dashboard for {args.study_name!r}: http://{args.host}:{args.port}/dashboard  (Ctrl-C stops it)\n"
          f"privacy statement (the study's note): {dashboard.note_url(s, args.host, args.port)}", flush=True)
    from dptune.search import release

    # The study's best models are Optuna artifacts: the dashboard lists and serves them from this store.
    dashboard.serve(storage, args.host, args.port, artifact_store=release.artifact_store(s, storage))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dptune.inspect import report

    studies = _load_studies(args.study_name, args.storage)
    report.write(studies, args.output)
    print(f"wrote {args.output} ({len(studies)} stud{'y' if len(studies) == 1 else 'ies'})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dptune.inspect import export
    from dptune.search.record import StudyRecord

    studies = _load_studies(args.study_name, args.storage)
    for s in studies:
        if StudyRecord.of(s).private_search is not None:
            print(f"dptune: INTERNAL: {s.study_name!r} is a private search; its trial numbers and count reveal the "
                  "secret K — do not publish this export", file=sys.stderr)
    if args.to:
        counts = export.to_sqlite(studies, args.to)
        print(f"wrote {counts['trials']} trials and {counts['intermediate_values']} intermediate values to {args.to}",
              file=sys.stderr)
    if args.format or not args.to:
        sys.stdout.write(export.to_text(studies, args.format or "csv"))
    return 0


def _optimize_pool(args: argparse.Namespace, console: Any) -> int:
    from dptune.config import schema as config
    from dptune.inspect import dashboard
    from dptune.search import record, study, workers
    from dptune.search.watch import StudyWatch

    storage = args.storage or config.default_storage(args.study_name)
    from dptune.search.storage import check_workers

    check_workers(storage, args.workers)
    watched, resolved = study.load(args.study_name, storage)
    console.print(f"{args.workers} workers × {args.devices_per_trial} device(s) on {storage}")
    with _reporting(args) as report:
        # Trials and the search so far are read from the storage here, once for all workers; the workers
        # send their running trials' steps and validations.
        watch = StudyWatch(report, args.study_name, args.n_trials,
                           private_search=bool(resolved.study.private_search))

        def relay(event: Any) -> None:
            if event.kind not in ("trial", "study"):
                report(event)

        def on_trial(t: Any) -> None:
            if not record.is_skipped(t):
                watch(watched, t)

        code = workers.run_pool(args.study_name, storage, workers=args.workers, n_trials=args.n_trials,
                                timeout=args.timeout, devices_per_trial=args.devices_per_trial,
                                cache_dir=args.cache_dir, on_trial=on_trial, progress=relay)
    result, _ = study.load(args.study_name, storage)
    dashboard.publish(result)
    _emit_summary(result, args.json)
    if code != 0:
        console.print(f"dptune: a worker exited with code {code}; finished trials are kept, nothing is left "
                      "RUNNING. Re-run to continue.")
    return code


def _headline(g: Any) -> str:
    """The search's ε in one line (rich markup), from its :class:`~dptune.search.regimes.Guarantee`."""
    f = g.figures
    if not g.private:
        return f"[bold]No privacy guarantee[/]: {g.text}"
    if g.secret_count:
        return (f"[bold]ε of the released best model: {g.epsilon:.4g}[/] (δ = {g.delta:g}; "
                f"each trial alone: {g.per_trial_epsilon:.4g})"
                + ("" if g.valid else " — [bold]EXCEEDED, INVALID[/]: see the statement"))
    if g.planned:
        return _planned_headline(g)
    head = f"[bold]ε of the released best model after this search: {_fmt(g.epsilon)}[/] (δ = {_fmt(g.delta)}"
    if g.capped:
        return (f"{head}, a cap enforced before each trial; per-trial target {_fmt(g.per_trial_epsilon)}; the "
                f"trials so far compose to {_fmt(f['accounted_epsilon'])})")
    return (f"{head}; per-trial target {_fmt(g.per_trial_epsilon)}; PLD "
            f"{_fmt(f['total_epsilon_pld_if_nonadaptive'])} if the trials had been fixed in advance)")


def _planned_headline(g: Any) -> str:
    """A total budget's headline: the total fixed at create, tuning included, and how it was split."""
    if not g.valid:
        return (f"[bold]ε of the released model: {_fmt(g.epsilon)}[/] (δ = {_fmt(g.delta)}) — [bold]EXCEEDED, "
                "INVALID[/]: more ran than the total budget's plan holds; see the statement")
    p = g.figures["planned"]
    parts = p["parts"]
    return (f"[bold]ε of the released model, tuning included: {_fmt(g.epsilon)}[/] (δ = {_fmt(g.delta)}; a total "
            f"planned at create: tuning {_fmt(parts['tuning'])} over {p['proxies']} proxies, final run "
            f"{_fmt(parts['final'])})")


def _total_created(name: str, storage: str, p: dict[str, Any], delta: float) -> str:
    parts = p["parts"]
    return (f"study {name!r} in {storage}: total ε = {p['total_epsilon']:g} (δ = {delta:g}) for the released "
            f"model, tuning included, planned now: {p['proxies']} proxies (σ = {p['proxy_noise_multiplier']:.4g}, "
            f"T = {p['steps']}, q = {p['sampling_rate']:.4g}, on a secret {p['fraction']:g} of the data) take "
            f"ε = {parts['tuning']:.4g}, the final run (σ = {p['final_noise_multiplier']:.4g}) ε = "
            f"{parts['final']:.4g}; proxies past {p['proxies']} are skipped")


def _print_tuning(c: Any, g: dict[str, Any]) -> None:
    """A cheaper-tuning study's proxies, compute and released final run."""
    w = g["compute"]
    f = g.get("final")
    c.print(f"search mode {g['search_mode']}: the proxies alone, composed without amplification, ε = "
            f"{_fmt(g['proxy_epsilon'])}; compute "
            f"{w['proxy_examples']:,} examples ({w['proxy_steps']} steps) in proxies, {w['final_examples']:,} "
            f"({w['final_steps']} steps) in the final run")
    if f is None:
        c.print("not finalized: run dptune study finalize to train the released model"
                + ("" if g["best_proxy"] is None else f" (best proxy: trial {g['best_proxy']['trial']}, "
                   f"validation {_fmt(g['best_proxy']['value'])})"))
    else:
        c.print(f"[bold]released model[/] (final run, trial {f['trial']}, from proxy {f['from_trial']}): test "
                f"accuracy {_fmt(f['test_accuracy'])}, its own ε {_fmt(f['epsilon'])}")


def _print_summary(summary: Any, internal: bool = False) -> None:
    from rich.console import Console

    from dptune.search import record, results

    c = Console(soft_wrap=True)
    g = summary.search
    private_search = summary.private_search and not internal
    if private_search:
        # The trial count and numbers would reveal K, on which the bound rests.
        state = "complete" if summary.guarantee.complete else "INCOMPLETE"
        c.print(f"[bold]{summary.name}[/]: private search — {state}. "
                "Shown: what may be released with the best model (--internal shows K and every count; the "
                "storage itself is internal).")
    else:
        if summary.private_search:
            c.print("[bold]INTERNAL — do not publish[/]: the trial count and numbers reveal the secret K.")
        c.print(f"[bold]{summary.name}[/]: {summary.budget_text}; {summary.n_trials} trials: {summary.complete} "
                f"complete, {summary.pruned} pruned, {summary.rejected} rejected before training, {summary.failed} "
                f"failed; {summary.trial_steps} trial-steps and {summary.examples_processed:,} examples processed "
                "in all")
    # The guarantee in words follows in the privacy statement; here the headline figures.
    c.print(_headline(summary.guarantee))
    if summary.guarantee.tuning is not None:
        _print_tuning(c, g)
    b = summary.best
    if b is None:
        c.print("no completed trial yet")
        return
    which = "best trial" if private_search else f"best trial {b['number']}"
    c.print(f"{which}: validation accuracy {b['value']:.4f}, test accuracy "
            f"{_fmt(b.get(record.TEST_ACCURACY))}, ε spent {_fmt(b.get(record.EPSILON_SPENT))}, "
            f"{b.get(record.STEPS)} steps ({_fmt(b.get('epochs'), 3)} epochs)")
    c.print("  " + results.interval_text(b, private_search))
    c.print("  " + "  ".join(f"{k}={_fmt(b.get(k), 4)}" for k in
                             (record.BATCH_SIZE, record.LEARNING_RATE, record.CLIP_NORM, record.NOISE_MULTIPLIER,
                              record.SAMPLING_RATE)))


def cmd_study_finalize(args: argparse.Namespace) -> int:
    """``dptune study finalize NAME``: a cheaper-tuning study's final run, then its summary."""
    from dptune import interrupt
    from dptune.search.finalize import finalize

    try:
        with interrupt.handled(), _reporting(args) as report:
            study = finalize(args.study_name, args.storage, progress=report)
    except KeyboardInterrupt as e:
        print(f"dptune: interrupted by {interrupt.signal_name(e)}: the final run was marked FAIL (counted at its "
              "planned steps if it read the data); run dptune study finalize again", file=sys.stderr, flush=True)
        return interrupt.exit_code(e)
    _emit_summary(study, args.json)
    return 0


def cmd_study_list(args: argparse.Namespace) -> int:
    import glob

    from dptune.search import results

    # Without --storage: every default SQLite storage (studies/*.db under the current directory).
    storages = [args.storage] if args.storage else [f"sqlite:///{p}" for p in sorted(glob.glob("studies/*.db"))]
    rows = [dict(r, storage=url) for url in storages for r in results.list_studies(url)]
    if args.json:
        print(_dump(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="studies")
    for col in ("name", "dataset", "ε target", "trials", "best val acc", "storage"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], _fmt(r["dataset"]), _fmt(r["epsilon_target"]), str(r["trials"]),
                      _fmt(r["best_value"]), r["storage"])
    Console().print(table)
    return 0


def cmd_study_show(args: argparse.Namespace) -> int:
    from dptune.search import orphans, study

    s, _ = study.load(args.study_name, args.storage)
    # A worker that died natively (an in-process optimize killed by SIGABRT) left its trial
    # RUNNING; the first look at the study fails and re-queues it rather than showing it as running.
    orphans.reap_dead_workers(s)
    _emit_summary(s, args.json, internal=args.internal)
    return 0


def cmd_study_best(args: argparse.Namespace) -> int:
    from dptune.search import results, study

    s, _ = study.load(args.study_name, args.storage)
    if args.export_model:
        from dptune import interrupt
        from dptune.config import schema as config
        from dptune.search import release

        storage = args.storage or config.default_storage(args.study_name)
        with interrupt.handled():  # a signal waits for the folder to be whole or gone
            meta = release.export_model(s, storage, args.export_model)
        if args.json:
            print(_dump({"exported": args.export_model, "metadata": meta}))
        else:
            print(f"wrote the released model to {args.export_model}/ ({release.MODEL_FILE}, {release.METADATA_FILE}, "
                  f"{release.STATEMENT_FILE}; owner-only): {meta['model']} on {meta['dataset']!r}, validation "
                  f"accuracy {_fmt(meta['val_accuracy'])}; ε of releasing it after this search: "
                  f"{_fmt(meta['search'].get('total_epsilon'))} (δ = {_fmt(meta['search'].get('delta'))})")
        return 0
    summary = results.summarize(s)
    if summary.best is None:
        raise study.StudyError(f"study_name: {args.study_name!r} has no completed trial yet")
    numbered = args.internal or not summary.private_search
    total = summary.search["total_epsilon"]
    if args.json:
        best = summary.best if numbered else summary.release()["best"]
        print(_dump({**best, "search_total_epsilon": total, "search_delta": summary.search["delta"]}))
    else:
        print(_trial_line(s.trials[summary.best["number"]], numbered=numbered))
        if not summary.non_private:
            print(f"ε of releasing it after this search: {_fmt(total)} (δ = {_fmt(summary.search['delta'])}); "
                  f"the statement: dptune study show {args.study_name}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from dptune.search import release

    model = release.load_model(args.model)
    meta = model.metadata
    data = release.dataset_for(meta, args.dataset, args.data_dir)
    split = getattr(data, args.split)
    accuracy = model.accuracy(split)
    x, y = split.take(np.arange(min(args.show, len(split))))
    shown = model.predict(x)
    recorded = meta.get("val_accuracy") if args.split == "validation" else meta.get("test_accuracy")
    out = {"model": args.model, "dataset": data.name, "split": args.split, "examples": len(split),
           "accuracy": accuracy, "recorded_accuracy": recorded,
           "predictions": [int(p) for p in shown], "labels": [int(v) for v in y]}
    if args.json:
        print(_dump(out))
        return 0
    print(f"{meta['model']} ({meta['parameters']} parameters) on {data.name!r} {args.split} split: accuracy "
          f"{accuracy:.4f} on {len(split)} examples (recorded at training: {_fmt(recorded)})")
    if len(shown):
        print("first predictions: " + " ".join(f"{p}{'' if p == t else '✗'}" for p, t in zip(shown, y, strict=False))
              + "   (✗ = wrong)")
    total = (meta.get("search") or {}).get("total_epsilon")
    if total is not None:
        print(f"privacy: ε = {_fmt(total)} (δ = {_fmt(meta['search'].get('delta'))}) for releasing this model after "
              f"its search; see {args.model}/{release.STATEMENT_FILE}")
    return 0
