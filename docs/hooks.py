"""MkDocs hooks: the reference pages are generated from the code, so they cannot drift from it.

* ``reference/cli.md``: the help of every ``dptune`` command, from the parser the CLI runs;
* ``reference/api.md``: one mkdocstrings block per name of ``dptune.__all__``, in the module that defines it;
* ``reference/benchmarks.md``: ``benchmarks/RESULTS.md``, where the benchmark scripts' tables are recorded.
"""

from __future__ import annotations

import argparse
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _commands(parser: argparse.ArgumentParser, prog: str):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prog} {name}")


def cli_reference() -> str:
    from dptune.cli.parser import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it so the page is stable
    parts = []
    for prog, parser in _commands(build_parser(), "dptune"):
        parts.append(f"## `{prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def api_reference() -> str:
    import dptune

    renamed = getattr(dptune, "_RENAMED", {})  # a name exported under another name than its definition's
    return "\n".join(f"::: {dptune._API[name]}.{renamed.get(name, name)}\n"
                     for name in sorted(dptune.__all__, key=str.lower))


def benchmark_results() -> str:
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    return text.split("\n", 1)[1]  # the page has its own title


GENERATED = {"<!-- cli reference -->": cli_reference, "<!-- api reference -->": api_reference,
             "<!-- benchmark results -->": benchmark_results}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, generate in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
