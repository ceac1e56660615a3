"""The manual cannot drift from the code: it builds with no warning, every command it shows parses, every
script, module and name it mentions exists, every block of study settings is a study the schema accepts, and the
README's links reach their files.

Its Python examples run as written elsewhere: ``docs/guide/python.md`` in ``tests/test_api.py``, the released
model's in ``tests/test_release.py``.
"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dptune.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def shell_lines() -> list[tuple[str, str]]:
    """(page, command) for every command of every bash block, continuation lines joined, comments dropped."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                for command in filter(None, (part.strip() for part in line.split("&&"))):
                    if not command.startswith("#"):
                        found.append((str(page.relative_to(ROOT)), command))
    return found


DPTUNE = [(page, c) for page, c in shell_lines() if c.startswith("dptune ")]
SCRIPTS = [(page, c) for page, c in shell_lines() if re.match(r"(python3? |bash )(benchmarks|examples)/", c)]


def test_the_manual_shows_commands():
    assert len(DPTUNE) > 40 and SCRIPTS  # the extraction itself can fail


@pytest.mark.parametrize(("page", "command"), DPTUNE, ids=[f"{p}:{c[:60]}" for p, c in DPTUNE])
def test_every_dptune_command_in_the_manual_parses(page, command):
    # "[--storage URL]" marks an optional part in the manual's text
    command = re.split(r"\s[>|]\s", command)[0]  # the shell's redirection is not the command's
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", command))[1:]
    try:
        build_parser().parse_args(words)
    except SystemExit as exit_:
        pytest.fail(f"{page}: `{command}` does not parse (exit {exit_.code})")


@pytest.mark.parametrize(("page", "command"), SCRIPTS, ids=[f"{p}:{c[:60]}" for p, c in SCRIPTS])
def test_every_script_in_the_manual_exists(page, command):
    path = ROOT / shlex.split(command)[1]
    assert path.is_file(), f"{page}: `{command}` names a file that is not there"


def test_the_manual_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").read_text().count("usage: dptune") > 15


def code_names() -> list[tuple[str, str]]:
    """(page, name) for every file path or dotted name of dptune the manual's prose mentions."""
    found = set()
    for page in PAGES:
        for name in re.findall(r"`(dptune(?:/[\w/]+\.py|(?:\.\w+)+))", page.read_text()):
            found.add((str(page.relative_to(ROOT)), name))
    return sorted(found)


@pytest.mark.parametrize(("page", "name"), code_names(), ids=[f"{p}:{n}" for p, n in code_names()])
def test_every_module_and_name_the_manual_mentions_exists(page, name):
    if "/" in name:
        assert (ROOT / name).is_file(), f"{page}: `{name}` is not a file of the package"
        return
    parts = name.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            assert hasattr(obj, attribute), f"{page}: `{name}` does not exist"
            obj = getattr(obj, attribute)
        return
    pytest.fail(f"{page}: `{name}` does not import")


def test_every_link_of_the_readme_reaches_a_file():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local and all((ROOT / link).exists() for link in local), [x for x in local if not (ROOT / x).exists()]


def yaml_variants() -> list[tuple[str, dict]]:
    """(page, settings) for every YAML block; a block listing one key several times is that many alternatives."""
    import yaml

    found = []
    for page in PAGES:
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S):
            lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            tops = [line.split(":", 1)[0] for line in lines if not line.startswith(" ")]
            repeated = {key for key in tops if tops.count(key) > 1}
            common = [line for line in lines if line.split(":", 1)[0] not in repeated]
            choices = [line for line in lines if line.split(":", 1)[0] in repeated] or [""]
            for choice in choices:
                found.append((str(page.relative_to(ROOT)), yaml.safe_load("\n".join([*common, choice]))))
    return found


YAML = yaml_variants()


def test_the_manual_shows_study_settings():
    assert len(YAML) >= 7  # the extraction itself can fail


@pytest.mark.parametrize(("page", "settings"), YAML, ids=[f"{p}:{i}" for i, (p, _) in enumerate(YAML)])
def test_every_study_setting_in_the_manual_is_accepted(page, settings, monkeypatch):
    """A block of study settings, laid over the README's study, is a study the schema accepts as written."""
    import yaml

    from dptune.config import schema

    monkeypatch.chdir(ROOT)  # the examples' import paths are the repository's
    base = yaml.safe_load((ROOT / "studies" / "mnist5k_eps3.yaml").read_text())
    if "search_privacy" in settings:
        for key in ("privacy", "sampler", "pruner"):  # a private search states its own budget and draws at random
            base.pop(key)
        base["search_space"] = "private_search.yaml"
    resolved = schema.resolve({**base, "search_space": str(ROOT / "search_spaces" / base["search_space"]),
                               **settings})
    for key, value in settings.items():
        assert getattr(resolved.study, key) is not None, (page, key, value)
