"""The ``dptune`` command line: parse, call the library, render."""

from dptune.cli.commands import main  # noqa: F401
