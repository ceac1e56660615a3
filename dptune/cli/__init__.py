"""The ``dptune`` command line: parse (:mod:`.parser`), call the library and render (:mod:`.commands`)."""

from dptune.cli.app import main

__all__ = ["main"]
