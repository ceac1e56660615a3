"""The argument parser of ``dptune``: flags, their types, and which command each subcommand calls.

Flags that are study settings default to None here: their defaults are the
schema's (:mod:`dptune.config.schema`), so that only the flags a user gives
override a study file.
"""

from __future__ import annotations

import argparse
import math
import sys

from dptune.choices import (
    Accountant,
    Clipping,
    Feed,
    LogFormat,
    Optimizer,
    ThreatModel,
    TrialDistribution,
    listed,
    values,
)
from dptune.cli.commands import (
    cmd_audit,
    cmd_dashboard,
    cmd_export,
    cmd_optimize,
    cmd_predict,
    cmd_privacy_epsilon,
    cmd_privacy_noise,
    cmd_privacy_search,
    cmd_privacy_steps,
    cmd_report,
    cmd_study_best,
    cmd_study_create,
    cmd_study_finalize,
    cmd_study_list,
    cmd_study_show,
    cmd_train,
)

EXIT_USAGE = 2
Subparsers = argparse._SubParsersAction  # what add_subparsers returns: one command's parsers are added to it


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


def _add_privacy_common(p: argparse.ArgumentParser, *, noise: bool, duration: bool,
                        accountant: str = Accountant.PLD.value) -> None:
    p.add_argument("--dataset-size", type=_positive_int, required=True, help="N, training examples")
    p.add_argument("--batch-size", type=_positive_int, required=True, help="expected batch size B (q = B/N)")
    if noise:
        p.add_argument("--noise-multiplier", type=_float, required=True, help="σ")
    if duration:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--epochs", type=_float, help="E; steps = ceil(E·N/B)")
        g.add_argument("--steps", type=_positive_int, help="T")
    p.add_argument("--delta", type=_float, help="δ (default: a power of ten below 1/(10N))")
    p.add_argument("--accountant", default=accountant, help=f"{listed(Accountant)}, or all (default: {accountant})")
    p.add_argument("--json", action="store_true", help="print JSON")


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
    e.add_argument("--accountant", choices=values(Accountant), default=Accountant.PLD.value)
    e.add_argument("--steps", type=_positive_int, help="T")
    e.add_argument("--epochs", type=_float, help="E; steps = ceil(E/q) (default 1)")
    e.add_argument("--optimizer", choices=values(Optimizer), default=Optimizer.MOMENTUM.value)
    e.add_argument("--momentum", type=_float, default=0.9)
    e.add_argument("--microbatch-size", type=_positive_int, default=256)
    e.add_argument("--clipping", choices=values(Clipping), default=Clipping.AUTO.value)
    e.add_argument("--devices", type=_positive_int, help="number of local devices (default: all)")
    e.add_argument("--seed", type=int, default=0, help="public seed (initialisation, data split)")
    e.add_argument("--private-seed", type=int, help="fix sampling, noise and canary inclusion (keep it secret)")
    c = a.add_argument_group("the audit")
    c.add_argument("--threat-model", choices=values(ThreatModel), default=ThreatModel.WHITE_BOX.value,
                   help="white-box: Dirac gradient canaries, every update observed; black-box: noise-image "
                        "canaries, the released model's loss")
    c.add_argument("--canaries", type=_positive_int, default=1000, help="m (default 1000)")
    c.add_argument("--canary-seed", type=int, default=0, help="public seed of the canaries' content")
    c.add_argument("--confidence", type=_confidence, default=0.95, help="of the lower bound (default 0.95)")
    a.add_argument("--cache-dir", help="JAX persistent compilation cache")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)


def _study_args(p: argparse.ArgumentParser, *, name_required: bool = True) -> None:
    p.add_argument("--study-name", required=name_required)
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study-name>.db)")
    p.add_argument("--json", action="store_true")


def _add_training_args(t: argparse.ArgumentParser) -> None:
    """The flags of ``dptune train`` and ``pretrain``: the run's settings, how it runs, where it starts."""
    _run_flags(t)
    _engine_flags(t)
    _start_flags(t)
    t.set_defaults(func=cmd_train)


def _default_of(name: str) -> str:
    """``(default: …)``: a study setting's default, as the schema writes it."""
    from dptune.config.schema import default

    return f"(default: {default(name)})"


def _run_flags(t: argparse.ArgumentParser) -> None:
    from dptune.config.schema import RUN_DEFAULTS, Hyperparameters, PrivacyConfig

    hp = Hyperparameters()
    default_accountant = PrivacyConfig(epsilon=1.0).accountant
    t.add_argument("--config", help="a study file: its settings (dataset, model, privacy, training) are this run's; "
                                    "the flags below override them")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting by its dotted key, e.g. --set budget.max_epochs=20 (repeatable)")
    t.add_argument("--dataset", help=f"mnist5k, digits, tfds:<name> or arrayrecord:<dir> {_default_of('dataset')}")
    t.add_argument("--data-dir", help="TFDS data directory (for tfds:<name>)")
    t.add_argument("--model", help=f"cnn, wrn16_4, resnet18, resnet50 {_default_of('model')}")
    t.add_argument("--epsilon", type=_float, help=f"ε budget (default: {RUN_DEFAULTS['privacy']['epsilon']})")
    t.add_argument("--delta", type=_float, help="δ (default: a power of ten below 1/(10N))")
    t.add_argument("--accountant", choices=values(Accountant), help=f"(default: {default_accountant})")
    t.add_argument("--batch-size", type=_positive_int, help=f"expected batch size B (default: {hp.batch_size})")
    t.add_argument("--epochs", type=_float, help=f"(default: {hp.epochs})")
    t.add_argument("--noise-multiplier", type=_float,
                   help="σ; if omitted, calibrated so that --epochs fit the budget")
    t.add_argument("--learning-rate", type=_float, help=f"(default: {hp.learning_rate})")
    t.add_argument("--clip-norm", type=_float, help=f"(default: {hp.clip_norm})")
    t.add_argument("--optimizer", choices=values(Optimizer), help=f"(default: {hp.optimizer})")
    t.add_argument("--momentum", type=_float, help=f"(default: {hp.momentum})")
    t.add_argument("--ema-decay", type=_float, help=f"(default: {hp.ema_decay}: off)")
    t.add_argument("--trainable", help="all, head, or last_<k> blocks; the rest stay frozen (default: all)")


def _engine_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--microbatch-size", type=_int_or_auto,
                   help="examples per accumulation call, or 'auto' (measured once, cached) "
                        f"{_default_of('microbatch_size')}")
    t.add_argument("--clipping", choices=values(Clipping),
                   help="per-example clipping path: bookkeeping (built-in models), fast (per-layer norms), vmap "
                        f"(reference), normalize (every gradient scaled to norm C), auto {_default_of('clipping')}")
    t.add_argument("--eval-every", type=_positive_int)
    t.add_argument("--devices", type=_positive_int, help="number of local devices (default: all)")
    t.add_argument("--feed", choices=values(Feed),
                   help="how batches reach the devices: data kept on the device, one transfer per step, "
                        f"or one per microbatch {_default_of('feed')}")
    t.add_argument("--loader-workers", type=_nonnegative_int,
                   help=f"processes decoding record datasets ahead of the step (0: on this thread) "
                        f"{_default_of('loader_workers')}")
    t.add_argument("--device-data-fraction", type=_float,
                   help=f"keep the training split on the device when it fits in this share of its memory "
                        f"{_default_of('device_data_fraction')}")
    t.add_argument("--coordinator", help="HOST:PORT of process 0, to run one trial across processes/hosts")
    t.add_argument("--num-processes", type=_positive_int, default=1)
    t.add_argument("--process-id", type=_nonnegative_int, default=0)
    t.add_argument("--seed", type=int, help=f"public seed (initialisation, data split) {_default_of('seed')}")
    t.add_argument("--private-seed", type=int, help="fix sampling and noise (reproducible; keep it secret)")
    t.add_argument("--non-private", action="store_true", help="no clipping, no noise (a baseline)")
    t.add_argument("--cache-dir", help="JAX persistent compilation cache (default ~/.cache/dptune/jax)")
    t.add_argument("--json", action="store_true")
    _log_format(t)


def _start_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--image-size", type=_positive_int, help="resize and centre-crop images to this size")
    t.add_argument("--weight-standardization", action="store_true", help="weight-standardised convolutions")
    t.add_argument("--init-checkpoint", help="start from this checkpoint (Flax msgpack file or Orbax directory)")
    t.add_argument("--reinitialize", nargs="*", metavar="MODULE",
                   help="top-level modules to start fresh instead of from the checkpoint (e.g. Dense_1)")
    t.add_argument("--augment-multiplicity", type=_positive_int,
                   help="K augmented copies per example, averaged before clipping (default: 1)")
    t.add_argument("--augment-shift", type=int, help="random shift of up to this many pixels (default: 0)")
    t.add_argument("--augment-flip", action="store_true", help="random horizontal flips")
    t.add_argument("--save-checkpoint", help="write the final (raw or EMA, by validation) parameters here")
    t.add_argument("--unsafe-ignore-checkpoint-provenance", action="store_true",
                   help="accept an --init-checkpoint trained without (recorded) privacy on this dataset; the printed "
                        "ε then does not cover what it learnt")


def _log_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=values(LogFormat), default=LogFormat.AUTO.value,
                   help="progress on stderr: auto (a live line per running trial on a terminal, else text), "
                        "text (one key=value line per evaluation and trial), json (one object per event) "
                        "(default: auto)")


STORAGE_HELP = "Optuna storage URL (default: sqlite:///studies/<study-name>.db)"


def _train_command(sub: Subparsers) -> None:
    """dptune train: one run."""
    t = sub.add_parser("train", help="train one model with DP-SGD and print its accuracy and ε")
    _add_training_args(t)


def _pretrain_command(sub: Subparsers) -> None:
    """dptune pretrain: a non-private run on public data."""
    pt = sub.add_parser("pretrain", help="train non-privately on a PUBLIC dataset and save a checkpoint")
    _add_training_args(pt)
    pt.add_argument("--output", required=True, help="checkpoint file to write (Flax msgpack, + .json metadata)")
    pt.add_argument("--declare-public", action="store_true",
                    help="confirm the dataset is public: pretraining spends no privacy because it protects nothing")


def _study_commands(sub: Subparsers) -> None:
    """dptune study create|list|show|best|finalize."""
    st = sub.add_parser("study", help="create and inspect studies")
    stsub = st.add_subparsers(dest="study_command", required=True)
    c = stsub.add_parser("create", help="create a study from a study file")
    c.add_argument("--config", required=True, help="studies/<name>.yaml")
    c.add_argument("--storage", help="overrides the file's storage")
    c.add_argument("--skip-if-exists", action="store_true", help="reuse an identical existing study")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting of the file by its dotted key, e.g. --set privacy.total_epsilon=3 "
                        "(repeatable)")
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

    fz = stsub.add_parser("finalize", help="search modes: train the released model with the best proxy's "
                                           "hyperparameters (one final run on the private data)")
    fz.add_argument("name", nargs="?", help="study name (or --study-name)")
    _study_args(fz, name_required=False)
    _log_format(fz)
    fz.set_defaults(func=cmd_study_finalize)


def _optimize_command(sub: Subparsers) -> None:
    """dptune optimize: run a study's trials."""
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
    _log_format(o)
    o.set_defaults(func=cmd_optimize)


def _dashboard_command(sub: Subparsers) -> None:
    """dptune dashboard."""
    d = sub.add_parser("dashboard", help="serve optuna-dashboard on a study's storage",
                       description="Save dptune's note and figures into the study, then serve optuna-dashboard "
                                   "on its storage until Ctrl-C.")
    d.add_argument("--study-name", required=True, help="the study to show")
    d.add_argument("--storage", help=STORAGE_HELP)
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                       "only; 0.0.0.0 exposes the storage's contents to the network)")
    d.add_argument("--port", type=_port, default=8080, help="port to listen on (default: 8080)")
    d.set_defaults(func=cmd_dashboard)


def _predict_command(sub: Subparsers) -> None:
    """dptune predict: an exported model on a dataset split."""
    pr = sub.add_parser("predict", help="predict with an exported model and report its accuracy",
                        description="Load a model written by 'dptune study best NAME --export-model DIR' (its "
                                    "metadata is checked against the model it builds) and predict a dataset split.")
    pr.add_argument("--model", required=True, help="the exported model's folder")
    pr.add_argument("--dataset", help="dataset name (default: the one the model was trained on, split as then)")
    pr.add_argument("--data-dir", help="TFDS data directory")
    pr.add_argument("--split", choices=("validation", "test"), default="validation",
                    help="which split to predict (default: validation, the one the model was selected on)")
    pr.add_argument("--show", type=_nonnegative_int, default=20, help="how many predictions to print (default: 20)")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)


def _report_command(sub: Subparsers) -> None:
    """dptune report: an HTML report of studies."""
    r = sub.add_parser("report", help="write a self-contained HTML report")
    r.add_argument("--study-name", action="append", required=True, help="repeat for a privacy–utility curve")
    r.add_argument("--storage", help=STORAGE_HELP)
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    r.set_defaults(func=cmd_report)


def _export_command(sub: Subparsers) -> None:
    """dptune export: trials to SQLite, CSV or JSON."""
    x = sub.add_parser("export", help="export trials to SQLite (sqlite-utils), CSV or JSON",
                       description="One row per trial (state, value, parameters, user attributes) and one per "
                                   "intermediate value. Without --to, CSV goes to stdout.")
    x.add_argument("--study-name", action="append", required=True, help="the study to export (repeat for several)")
    x.add_argument("--storage", help=STORAGE_HELP)
    x.add_argument("--to", help="SQLite file to upsert the tables 'trials' and 'intermediate_values' into "
                                "(created if missing; re-exporting updates rows)")
    x.add_argument("--format", choices=("csv", "json"),
                   help="print the trials to stdout in this format (default: csv when --to is not given)")
    x.set_defaults(func=cmd_export)


def _audit_command(sub: Subparsers) -> None:
    """dptune audit: an empirical lower bound on ε."""
    au = sub.add_parser("audit", help="empirical lower bound on ε: re-run a trial with canaries (one-run audit)",
                        description="Re-run a study's trial (default: the best) or explicit hyperparameters "
                                    "through the real training path with m canaries, each included with "
                                    "probability 1/2, and print the claimed ε beside a 95% lower bound "
                                    "(Steinke et al. 2023).")
    _add_audit_args(au)
    _log_format(au)


def _privacy_commands(sub: Subparsers) -> None:
    """dptune privacy epsilon|noise|search|steps: the accountant's answers."""
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
    ps.add_argument("--distribution", choices=values(TrialDistribution), default=TrialDistribution.GEOMETRIC.value,
                    help="the law of the number of trials (default: geometric)")
    ps.add_argument("--eta", type=_float, help="η of the truncated negative binomial")
    _add_privacy_common(ps, noise=False, duration=True, accountant=Accountant.RDP.value)
    ps.add_argument("--noise-multiplier", type=_float, help="σ of every trial")
    ps.set_defaults(func=cmd_privacy_search)
    s = psub.add_parser("steps", help="most steps that fit a target ε")
    s.add_argument("--epsilon", type=_float, required=True)
    _add_privacy_common(s, noise=True, duration=False)
    s.set_defaults(func=cmd_privacy_steps)


# The subcommands, in the order of the help text.
COMMANDS = (_train_command, _pretrain_command, _study_commands, _optimize_command, _dashboard_command,
            _predict_command, _report_command, _export_command, _audit_command, _privacy_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dptune", description="Tune differentially private training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser
