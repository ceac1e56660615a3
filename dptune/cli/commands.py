"""``dptune`` command line: a thin shell over the library.

Library code raises typed errors (:mod:`dptune.errors`); only this module turns
them into a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from dptune.errors import DptuneError, PrivacyError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with dptune's error contract: one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = "" if "--help" in message else f" (see '{self.prog} --help')"
        sys.stderr.write(f"dptune: error: {message}{hint}\n")
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535], got {value}")
    return value


def _int_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _seconds(text: str) -> float:
    value = _float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


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


# -- dptune privacy -----------------------------------------------------------

def _add_privacy_common(p: argparse.ArgumentParser, *, noise: bool, duration: bool) -> None:
    p.add_argument("--dataset-size", type=_positive_int, required=True, help="N, training examples")
    p.add_argument("--batch-size", type=_positive_int, required=True, help="expected batch size B (q = B/N)")
    if noise:
        p.add_argument("--noise-multiplier", type=_float, required=True, help="σ")
    if duration:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--epochs", type=_float, help="E; steps = ceil(E·N/B)")
        g.add_argument("--steps", type=_positive_int, help="T")
    p.add_argument("--delta", type=_float, help="δ (default: a power of ten below 1/(10N))")
    p.add_argument("--accountant", default="pld", help="pld (default), rdp, or all")
    p.add_argument("--json", action="store_true", help="print JSON")


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


# -- dptune train -------------------------------------------------------------

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
    """The flags the user gave (argparse defaults are None or False: defaults live in the schema)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) not in (None, False)}


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dptune.config.schema import run_settings
    from dptune.trainer import compile_stats, multihost
    from dptune.trainer.run import pretrain, train

    if getattr(args, "coordinator", None):
        # Before any computation: every process must join the runtime first (dptune.trainer.multihost).
        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    console = Console(stderr=args.json)
    compile_stats.enable_persistent_cache(args.cache_dir)
    # Precedence: the schema's defaults < --config FILE < --set KEY=VALUE < the flags given.
    flags = [(SETTING_FLAGS[k], v) for k, v in _given(args, list(SETTING_FLAGS)).items()]
    settings = run_settings(args.config, [*(args.set or []), *flags])  # validated once, by the schema

    def progress(step: int, metrics: dict) -> None:
        console.print(f"step {step:5d}  epoch {metrics['epoch']:6.2f}  val_acc {metrics['val_accuracy']:.4f}  "
                      f"val_loss {metrics['val_loss']:.4f}")

    common = dict(hyperparameters=_given(args, HYPERPARAMETER_FLAGS), eval_every=args.eval_every,
                  devices=args.devices, callback=progress, log=console.print)
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
    if result.prior_events:
        eps += (f" for this run; {result.total_epsilon:.4f} in all with the initial checkpoint's recorded training "
                "on this data (RDP composition)")
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
    if statement is not None:
        console.print("\n[bold]Privacy statement[/]\n" + statement.text(), highlight=False)


# -- dptune audit ---------------------------------------------------------------

_EXPLICIT = ("batch_size", "learning_rate", "clip_norm", "noise_multiplier", "epsilon", "steps", "epochs")


def cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dptune.search import audit
    from dptune.trainer import compile_stats

    console = Console(stderr=args.json, highlight=False)
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
        result = audit.audit_study(args.study_name, args.storage, args.trial, **common)
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
    from dptune.data.datasets import load_dataset
    from dptune.privacy import accounting as privacy
    from dptune.search import audit
    from dptune.trainer.train import Hyperparams, PrivacyBudget, RunConfig

    dataset = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
    n = len(dataset.train)
    batch = args.batch_size if args.batch_size is not None else min(256, n)
    if not 1 <= batch <= n:
        raise PrivacyError(f"batch_size: must be in [1, {n}] (the training-set size), got {batch}")
    q = batch / n
    if args.steps is not None and args.epochs is not None:
        raise PrivacyError("steps: give --steps or --epochs, not both")
    if args.steps is not None:
        steps = args.steps
    else:
        epochs = args.epochs if args.epochs is not None else 1.0
        if not (epochs > 0 and math.isfinite(epochs)):
            raise PrivacyError(f"epochs: must be a finite number > 0, got {epochs}")
        steps = math.ceil(epochs / q)
    epsilon = args.epsilon if args.epsilon is not None else 3.0
    privacy.validate(epsilon=epsilon, accountant=args.accountant)
    delta = args.delta if args.delta is not None else privacy.default_delta(n)
    privacy.check_delta(delta, n)
    sigma = args.noise_multiplier
    if sigma is None:
        sigma = privacy.noise_for_epsilon(q, steps, epsilon, delta, args.accountant)
    hp = Hyperparams(batch_size=batch, learning_rate=args.learning_rate if args.learning_rate is not None else 2.0,
                     clip_norm=args.clip_norm if args.clip_norm is not None else 1.0, noise_multiplier=sigma,
                     optimizer=args.optimizer, momentum=args.momentum)
    config = RunConfig(model=args.model, microbatch_size=args.microbatch_size, clipping=args.clipping,
                       eval_every=max(1, steps // 5), seed=args.seed, private_seed=args.private_seed,
                       num_devices=args.devices)
    return audit.run_audit(dataset, hp, steps, config=config, budget=PrivacyBudget(epsilon, delta, args.accountant),
                           **common)


def _confidence(text: str) -> float:
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _add_audit_args(a: argparse.ArgumentParser) -> None:
    g = a.add_argument_group("a study's trial")
    g.add_argument("--study-name", help="audit a trial of this study (the run is recorded in it and counted)")
    g.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study-name>.db)")
    g.add_argument("--trial", type=int, help="trial number (default: the best completed trial)")
    e = a.add_argument_group("explicit hyperparameters (instead of --study-name)")
    e.add_argument("--dataset", default="mnist5k", help="mnist5k (default), digits, or tfds:<name>")
    e.add_argument("--data-dir", help="TFDS data directory (for tfds:<name>)")
    e.add_argument("--model", default="cnn", help="cnn, wrn16_4, resnet18, resnet50")
    e.add_argument("--batch-size", type=_positive_int, help="expected batch size B (default min(256, N))")
    e.add_argument("--learning-rate", type=_float, help="default 2.0")
    e.add_argument("--clip-norm", type=_float, help="C (default 1.0)")
    e.add_argument("--noise-multiplier", type=_float, help="σ; if omitted, calibrated to --epsilon")
    e.add_argument("--epsilon", type=_float, help="ε budget at δ (default 3; caps the steps like dptune train)")
    e.add_argument("--delta", type=_float, help="δ (default: a power of ten below 1/(10N))")
    e.add_argument("--accountant", default="pld", help="pld or rdp")
    e.add_argument("--steps", type=_positive_int, help="T")
    e.add_argument("--epochs", type=_float, help="E; steps = ceil(E/q) (default 1)")
    e.add_argument("--optimizer", default="momentum", help="sgd, momentum, adam")
    e.add_argument("--momentum", type=_float, default=0.9)
    e.add_argument("--microbatch-size", type=_positive_int, default=256)
    e.add_argument("--clipping", choices=("auto", "bookkeeping", "vmap"), default="auto")
    e.add_argument("--devices", type=_positive_int, help="number of local devices (default: all)")
    e.add_argument("--seed", type=int, default=0, help="public seed (initialisation, data split)")
    e.add_argument("--private-seed", type=int, help="fix sampling, noise and canary inclusion (keep it secret)")
    c = a.add_argument_group("the audit")
    c.add_argument("--threat-model", choices=audit_threat_models(), default="white-box",
                   help="white-box: Dirac gradient canaries, every update observed; black-box: noise-image "
                        "canaries, the released model's loss")
    c.add_argument("--canaries", type=_positive_int, default=1000, help="m (default 1000)")
    c.add_argument("--canary-seed", type=int, default=0, help="public seed of the canaries' content")
    c.add_argument("--confidence", type=_confidence, default=0.95, help="of the lower bound (default 0.95)")
    a.add_argument("--cache-dir", help="JAX persistent compilation cache")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)


def audit_threat_models() -> tuple[str, ...]:
    return ("white-box", "black-box")


# -- dptune study / optimize -----------------------------------------------------

def _fmt(v: Any, digits: int = 4) -> str:
    from dptune.search.results import fmt

    return fmt(v, digits)


def _trial_line(t: Any, numbered: bool = True) -> str:
    """One trial in a line; ``numbered=False`` for private searches, whose trial numbers are internal."""
    a = t.user_attrs
    state = t.state.name
    if state == "PRUNED" and "rejected_reason" in a:
        state = "REJECTED"
    params = "  ".join(f"{k}={_fmt(v, 3)}" for k, v in t.params.items())
    acc = a.get("val_accuracy")
    eps = a.get("epsilon_spent")
    reason = a.get("rejected_reason") or (a.get("failed_reason") if state == "FAIL" else None)
    tail = f"  ({reason})" if reason else ""
    head = f"trial {t.number:3d} {state:9s}" if numbered else f"trial {state:9s}"
    return (f"{head} val_acc {_fmt(acc)}  ε {_fmt(eps)}/{_fmt(a.get('epsilon_target'))}  "
            f"steps {a.get('steps', '-')}  σ {_fmt(a.get('noise_multiplier'), 3)}  {params}{tail}")


def cmd_study_create(args: argparse.Namespace) -> int:
    from dptune.config import schema as config
    from dptune.search import study

    resolved = config.load_study(args.config)
    storage = args.storage or resolved.study.storage or config.default_storage(resolved.study.name)
    created = study.create_study(resolved, storage, skip_if_exists=args.skip_if_exists, source=args.config)
    private = created.user_attrs.get("private_search")
    out = {"study_name": created.study_name, "storage": storage,
           "epsilon": created.user_attrs.get("epsilon_target"), "delta": created.user_attrs["delta"],
           "trials": None if private else len(created.trials),
           # K is secret: everything of the plan but the drawn count.
           "private_search": None if private is None else {k: v for k, v in private.items() if k != "n_trials"}}
    if args.json:
        print(_dump(out))
    else:
        private = created.user_attrs.get("private_search")
        if private:
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dptune.search import study
    from dptune.trainer import compile_stats

    compile_stats.enable_persistent_cache(args.cache_dir)
    console = Console(stderr=True)
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
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"optimizing {args.study_name}", total=args.n_trials)

        def on_trial(_study: Any, trial: Any) -> None:
            # A private search prints no line per trial: their count is the secret K.
            if "skipped_reason" in trial.user_attrs or "private_search" in _study.user_attrs:
                return
            progress.console.print(_trial_line(trial))
            progress.advance(task)

        result = study.optimize(args.study_name, args.storage, n_trials=args.n_trials,
                                timeout=args.timeout, callbacks=[on_trial])
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

        Console().print("\n[bold]Privacy statement[/]\n" + text, highlight=False)


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

    studies = _load_studies(args.study_name, args.storage)
    for s in studies:
        if "private_search" in s.user_attrs:
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
    from dptune.search import study, workers

    storage = args.storage or config.default_storage(args.study_name)
    from dptune.search.storage import check_workers

    check_workers(storage, args.workers)
    _, resolved = study.load(args.study_name, storage)
    console.print(f"{args.workers} workers × {args.devices_per_trial} device(s) on {storage}")
    private_search = resolved.study.private_search

    def on_trial(t: Any) -> None:
        # A private search prints no line per trial: their count is the secret K.
        if "skipped_reason" not in t.user_attrs and not private_search:
            console.print(_trial_line(t))

    code = workers.run_pool(args.study_name, storage, workers=args.workers, n_trials=args.n_trials,
                            timeout=args.timeout, devices_per_trial=args.devices_per_trial,
                            cache_dir=args.cache_dir, on_trial=on_trial)
    result, _ = study.load(args.study_name, storage)
    dashboard.publish(result)
    _emit_summary(result, args.json)
    if code != 0:
        console.print(f"dptune: a worker exited with code {code}; finished trials are kept, nothing is left "
                      "RUNNING. Re-run to continue.")
    return code


def _print_summary(summary: Any, internal: bool = False) -> None:
    from rich.console import Console

    c = Console()
    g = summary.search
    private_search = summary.private_search and not internal
    if private_search:
        # The trial count and numbers would reveal K, on which the bound rests.
        c.print(f"[bold]{summary.name}[/]: private search — {'complete' if g['complete'] else 'INCOMPLETE'}. "
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
    if g["mode"] == "non_private":
        c.print(f"[bold]No privacy guarantee[/]: {g['guarantee']}")
    elif g["mode"] == "private_search":
        c.print(f"[bold]ε of the released best model: {g['total_epsilon']:.4g}[/] (δ = {g['delta']:g}; "
                f"each trial alone: {g['per_trial_epsilon']:.4g})"
                + ("" if g["valid"] else " — [bold]EXCEEDED, INVALID[/]: see the statement"))
    elif g["mode"] == "filter":
        c.print(f"[bold]ε of the released best model after this search: {_fmt(g['total_epsilon'])}[/] "
                f"(δ = {_fmt(g['delta'])}, a cap enforced before each trial; per-trial target "
                f"{_fmt(g['per_trial_epsilon'])}; the trials so far compose to {_fmt(g['accounted_epsilon'])})")
    else:
        c.print(f"[bold]ε of the released best model after this search: {_fmt(g['total_epsilon'])}[/] "
                f"(δ = {_fmt(g['delta'])}; per-trial target {_fmt(g['per_trial_epsilon'])}; PLD "
                f"{_fmt(g['total_epsilon_pld_if_nonadaptive'])} if the trials had been fixed in advance)")
    b = summary.best
    if b is None:
        c.print("no completed trial yet")
        return
    which = "best trial" if private_search else f"best trial {b['number']}"
    c.print(f"{which}: validation accuracy {b['value']:.4f}, test accuracy "
            f"{_fmt(b.get('test_accuracy'))}, ε spent {_fmt(b.get('epsilon_spent'))}, {b.get('steps')} steps "
            f"({_fmt(b.get('epochs'), 3)} epochs)")
    c.print("  " + "  ".join(f"{k}={_fmt(b.get(k), 4)}" for k in
                             ("batch_size", "learning_rate", "clip_norm", "noise_multiplier", "sampling_rate")))


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
    summary = results.summarize(s)
    if summary.best is None:
        raise study.StudyError(f"study_name: {args.study_name!r} has no completed trial yet")
    if args.export_model:
        from dptune.config import schema as config
        from dptune.search import release

        storage = args.storage or config.default_storage(args.study_name)
        meta = release.export_model(s, storage, args.export_model)
        if args.json:
            print(_dump({"exported": args.export_model, "metadata": meta}))
        else:
            print(f"wrote the released model to {args.export_model}/ ({release.MODEL_FILE}, {release.METADATA_FILE}, "
                  f"{release.STATEMENT_FILE}; owner-only): {meta['model']} on {meta['dataset']!r}, validation "
                  f"accuracy {_fmt(meta['val_accuracy'])}; ε of releasing it after this search: "
                  f"{_fmt(meta['search'].get('total_epsilon'))} (δ = {_fmt(meta['search'].get('delta'))})")
        return 0
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


def _study_args(p: argparse.ArgumentParser, *, name_required: bool = True) -> None:
    p.add_argument("--study-name", required=name_required)
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study-name>.db)")
    p.add_argument("--json", action="store_true")


def _add_training_args(t: argparse.ArgumentParser) -> None:
    from dptune.config.schema import RUN_DEFAULTS, Hyperparameters, default

    hp = Hyperparameters()

    def d(name: str) -> str:
        return f"(default: {default(name)})"

    t.add_argument("--config", help="a study file: its settings (dataset, model, privacy, training) are this run's; "
                                    "the flags below override them")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting by its dotted key, e.g. --set budget.max_epochs=20 (repeatable)")
    t.add_argument("--dataset", help=f"mnist5k, digits, tfds:<name> or arrayrecord:<dir> {d('dataset')}")
    t.add_argument("--data-dir", help="TFDS data directory (for tfds:<name>)")
    t.add_argument("--model", help=f"cnn, wrn16_4, resnet18, resnet50 {d('model')}")
    t.add_argument("--epsilon", type=_float, help=f"ε budget (default: {RUN_DEFAULTS['privacy']['epsilon']})")
    t.add_argument("--delta", type=_float, help="δ (default: a power of ten below 1/(10N))")
    t.add_argument("--accountant", help="pld or rdp (default: pld)")
    t.add_argument("--batch-size", type=_positive_int, help=f"expected batch size B (default: {hp.batch_size})")
    t.add_argument("--epochs", type=_float, help=f"(default: {hp.epochs})")
    t.add_argument("--noise-multiplier", type=_float,
                   help="σ; if omitted, calibrated so that --epochs fit the budget")
    t.add_argument("--learning-rate", type=_float, help=f"(default: {hp.learning_rate})")
    t.add_argument("--clip-norm", type=_float, help=f"(default: {hp.clip_norm})")
    t.add_argument("--optimizer", help=f"sgd, momentum, adam (default: {hp.optimizer})")
    t.add_argument("--momentum", type=_float, help=f"(default: {hp.momentum})")
    t.add_argument("--ema-decay", type=_float, help=f"(default: {hp.ema_decay}: off)")
    t.add_argument("--microbatch-size", type=_int_or_auto,
                   help=f"examples per accumulation call, or 'auto' (measured once, cached) {d('microbatch_size')}")
    t.add_argument("--clipping", choices=("auto", "bookkeeping", "vmap"),
                   help=f"per-example clipping path: bookkeeping (fast), vmap (reference), auto {d('clipping')}")
    t.add_argument("--eval-every", type=_positive_int)
    t.add_argument("--devices", type=_positive_int, help="number of local devices (default: all)")
    t.add_argument("--feed", choices=("auto", "resident", "streamed", "loop"),
                   help="how batches reach the devices: data kept on the device, one transfer per step, "
                        f"or one per microbatch {d('feed')}")
    t.add_argument("--loader-workers", type=_nonnegative_int,
                   help=f"processes decoding record datasets ahead of the step (0: on this thread) "
                        f"{d('loader_workers')}")
    t.add_argument("--device-data-fraction", type=_float,
                   help=f"keep the training split on the device when it fits in this share of its memory "
                        f"{d('device_data_fraction')}")
    t.add_argument("--coordinator", help="HOST:PORT of process 0, to run one trial across processes/hosts")
    t.add_argument("--num-processes", type=_positive_int, default=1)
    t.add_argument("--process-id", type=_nonnegative_int, default=0)
    t.add_argument("--seed", type=int, help=f"public seed (initialisation, data split) {d('seed')}")
    t.add_argument("--private-seed", type=int, help="fix sampling and noise (reproducible; keep it secret)")
    t.add_argument("--non-private", action="store_true", help="no clipping, no noise (a baseline)")
    t.add_argument("--cache-dir", help="JAX persistent compilation cache (default ~/.cache/dptune/jax)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--image-size", type=_positive_int, help="resize and centre-crop images to this size")
    t.add_argument("--weight-standardization", action="store_true", help="weight-standardised convolutions")
    t.add_argument("--init-checkpoint", help="start from this checkpoint (Flax msgpack file or Orbax directory)")
    t.add_argument("--reinitialize", nargs="*", metavar="MODULE",
                   help="top-level modules to start fresh instead of from the checkpoint (e.g. Dense_1)")
    t.add_argument("--trainable", help="all, head, or last_<k> blocks; the rest stay frozen (default: all)")
    t.add_argument("--augment-multiplicity", type=_positive_int,
                   help="K augmented copies per example, averaged before clipping (default: 1)")
    t.add_argument("--augment-shift", type=int, help="random shift of up to this many pixels (default: 0)")
    t.add_argument("--augment-flip", action="store_true", help="random horizontal flips")
    t.add_argument("--save-checkpoint", help="write the final (raw or EMA, by validation) parameters here")
    t.add_argument("--unsafe-ignore-checkpoint-provenance", action="store_true",
                   help="accept an --init-checkpoint trained without (recorded) privacy on this dataset; the printed "
                        "ε then does not cover what it learnt")
    t.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dptune", description="Tune differentially private training.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model with DP-SGD and print its accuracy and ε")
    _add_training_args(t)

    pt = sub.add_parser("pretrain", help="train non-privately on a PUBLIC dataset and save a checkpoint")
    _add_training_args(pt)
    pt.add_argument("--output", required=True, help="checkpoint file to write (Flax msgpack, + .json metadata)")
    pt.add_argument("--declare-public", action="store_true",
                    help="confirm the dataset is public: pretraining spends no privacy because it protects nothing")

    st = sub.add_parser("study", help="create and inspect studies")
    stsub = st.add_subparsers(dest="study_command", required=True)
    c = stsub.add_parser("create", help="create a study from a study file")
    c.add_argument("--config", required=True, help="studies/<name>.yaml")
    c.add_argument("--storage", help="overrides the file's storage")
    c.add_argument("--skip-if-exists", action="store_true", help="reuse an identical existing study")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_study_create)
    ls = stsub.add_parser("list", help="list the studies in a storage")
    _study_args(ls, name_required=False)
    ls.set_defaults(func=cmd_study_list)
    for name, func, text in (("show", cmd_study_show, "summary and best trial"),
                             ("best", cmd_study_best, "the best trial")):
        sp = stsub.add_parser(name, help=text)
        sp.add_argument("name", nargs="?", help="study name (or --study-name)")
        _study_args(sp, name_required=False)
        sp.add_argument("--internal", action="store_true",
                        help="private search: also show K, trial numbers and counts (never publish these)")
        if name == "best":
            sp.add_argument("--export-model", metavar="DIR",
                            help="write the best trial's saved model, its metadata and the search's privacy "
                                 "statement to DIR (a new folder)")
        sp.set_defaults(func=func)

    o = sub.add_parser("optimize", help="run trials of a study")
    _study_args(o)
    o.add_argument("--n-trials", type=_positive_int)
    o.add_argument("--timeout", type=_seconds, help="stop starting trials after this many seconds")
    o.add_argument("--cache-dir", help="JAX persistent compilation cache")
    o.add_argument("--workers", type=_int_or_auto, default="auto",
                   help="parallel worker processes, or 'auto' (default: one per GPU for small models, "
                        "one trial over all devices otherwise); > 1 needs a journal:// or postgresql:// storage")
    o.add_argument("--devices-per-trial", type=_positive_int,
                   help="devices each worker's trials shard over (GPUs, or forced host devices on CPU)")
    o.set_defaults(func=cmd_optimize)

    storage_help = "Optuna storage URL (default: sqlite:///studies/<study-name>.db)"
    d = sub.add_parser("dashboard", help="serve optuna-dashboard on a study's storage",
                       description="Save dptune's note and figures into the study, then serve optuna-dashboard "
                                   "on its storage until Ctrl-C.")
    d.add_argument("--study-name", required=True, help="the study to show")
    d.add_argument("--storage", help=storage_help)
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; 0.0.0.0 exposes the storage's contents to the network)")
    d.add_argument("--port", type=_port, default=8080, help="port to listen on (default: 8080)")
    d.set_defaults(func=cmd_dashboard)
    pr = sub.add_parser("predict", help="predict with an exported model and report its accuracy",
                        description="Load a model written by 'dptune study best NAME --export-model DIR' (its "
                                    "metadata is checked against the model it builds) and predict a dataset split.")
    pr.add_argument("--model", required=True, help="the exported model's folder")
    pr.add_argument("--dataset", help="dataset name (default: the one the model was trained on, split as then)")
    pr.add_argument("--data-dir", help="TFDS data directory")
    pr.add_argument("--split", choices=("validation", "test"), default="validation",
                    help="which split to predict (default: validation, the one the model was selected on)")
    pr.add_argument("--show", type=int, default=20, help="how many predictions to print (default: 20)")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)
    r = sub.add_parser("report", help="write a self-contained HTML report")
    r.add_argument("--study-name", action="append", required=True, help="repeat for a privacy–utility curve")
    r.add_argument("--storage", help=storage_help)
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    r.set_defaults(func=cmd_report)
    x = sub.add_parser("export", help="export trials to SQLite (sqlite-utils), CSV or JSON",
                       description="One row per trial (state, value, parameters, user attributes) and one per "
                                   "intermediate value. Without --to, CSV goes to stdout.")
    x.add_argument("--study-name", action="append", required=True, help="the study to export (repeat for several)")
    x.add_argument("--storage", help=storage_help)
    x.add_argument("--to", help="SQLite file to upsert the tables 'trials' and 'intermediate_values' into "
                                "(created if missing; re-exporting updates rows)")
    x.add_argument("--format", choices=("csv", "json"),
                   help="print the trials to stdout in this format (default: csv when --to is not given)")
    x.set_defaults(func=cmd_export)

    au = sub.add_parser("audit", help="empirical lower bound on ε: re-run a trial with canaries (one-run audit)",
                        description="Re-run a study's trial (default: the best) or explicit hyperparameters "
                                    "through the real training path with m canaries, each included with "
                                    "probability 1/2, and print the claimed ε beside a 95% lower bound "
                                    "(Steinke et al. 2023).")
    _add_audit_args(au)

    p = sub.add_parser("privacy", help="privacy accounting questions")
    psub = p.add_subparsers(dest="question", required=True)
    e = psub.add_parser("epsilon", help="ε of a DP-SGD run")
    _add_privacy_common(e, noise=True, duration=True)
    e.add_argument("--statement", action="store_true",
                   help="also print the guarantee in words (adjacency, sampling, what is covered, assumptions)")
    e.set_defaults(func=cmd_privacy_epsilon)
    n = psub.add_parser("noise", help="smallest σ that fits a target ε")
    n.add_argument("--epsilon", type=_float, required=True)
    _add_privacy_common(n, noise=False, duration=True)
    n.set_defaults(func=cmd_privacy_noise)
    ps = psub.add_parser("search", help="ε of a private search with a random number of trials")
    ps.add_argument("--total-epsilon", type=_float, help="calibrate σ so that the whole search fits this ε")
    ps.add_argument("--mean-trials", type=_float, required=True)
    ps.add_argument("--distribution", default="geometric",
                    help="poisson, truncated_negative_binomial, geometric (default), logarithmic")
    ps.add_argument("--eta", type=_float, help="η of the truncated negative binomial")
    _add_privacy_common(ps, noise=False, duration=True)
    ps.add_argument("--noise-multiplier", type=_float, help="σ of every trial")
    ps.set_defaults(func=cmd_privacy_search, accountant="rdp")
    s = psub.add_parser("steps", help="most steps that fit a target ε")
    s.add_argument("--epsilon", type=_float, required=True)
    _add_privacy_common(s, noise=True, duration=False)
    s.set_defaults(func=cmd_privacy_steps)
    return parser


def _configure_logging() -> None:
    """Logging is the application's to set, so it is set here and never on import of a library module."""
    import logging

    import optuna

    # The RDP accountant logs a warning for every order whose series does not converge (it then
    # excludes that order, which is sound); users cannot act on those lines.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # dptune prints its own progress; Optuna's per-trial INFO lines would repeat it.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dptune`` console script."""
    from dptune.trainer import xla_options

    _configure_logging()

    # Before any command starts JAX: on a CPU-only host, one device per core.
    xla_options.use_host_cores()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "name", None) and not getattr(args, "study_name", None):
        args.study_name = args.name
    if args.command == "study" and args.study_command in ("show", "best") and not args.study_name:
        parser.error(f"study name required (positional or --study-name); see 'dptune study {args.study_command} "
                     "--help'")
    if args.command == "optimize" and args.n_trials is None and args.timeout is None:
        parser.error("give --n-trials or --timeout; see 'dptune optimize --help'")
    try:
        return args.func(args)
    except DptuneError as e:
        print(f"dptune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        from dptune import interrupt

        print(f"dptune: interrupted by {interrupt.signal_name(e)}", file=sys.stderr)
        return interrupt.exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
