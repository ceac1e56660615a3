"""The ``dptune`` entry point: logging, parsing, one call, and errors as one line with exit code 2.

Library code raises typed errors (:mod:`dptune.errors`); only here are they
turned into a message on stderr and an exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dptune.cli.parser import EXIT_USAGE, build_parser
from dptune.errors import DptuneError


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
    if args.command == "study" and args.study_command in ("show", "best", "finalize") and not args.study_name:
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
