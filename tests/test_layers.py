"""The layers of the package, as the folders show them, are true of the imports.

privacy (no JAX) ← config ← data, models ← trainer (no Optuna) ← search ← inspect (no JAX), cli.
The foundation modules at the top of the package (errors, randomness, interrupt, faults, progress, seams,
choices) sit below everything. Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "dptune"
FOUNDATION = {"errors", "randomness", "interrupt", "faults", "progress", "seams", "choices"}
# layer -> the dptune layers it may import (besides itself and the foundation)
ALLOWED = {
    "foundation": set(),
    "privacy": set(),
    "config": {"privacy"},
    "data": {"privacy", "config"},
    "models": {"privacy", "config"},
    "trainer": {"privacy", "config", "data", "models"},
    "search": {"privacy", "config", "data", "models", "trainer"},
    "inspect": {"privacy", "config", "search"},
    "cli": {"privacy", "config", "data", "models", "trainer", "search", "inspect"},
}
# Third-party packages a layer must never import.
FORBIDDEN = {
    "foundation": {"optuna"},
    "privacy": {"jax", "jaxlib", "flax", "optax", "optuna"},
    "config": {"jax", "jaxlib", "flax", "optax", "optuna"},
    "data": {"optuna", "flax", "optax"},
    "models": {"optuna"},
    "trainer": {"optuna"},
    "inspect": {"jax", "jaxlib", "flax", "optax"},
}
# Modules of the search layer that inspection may read (they import no JAX).
READERS = {"dptune.search.results", "dptune.search.record", "dptune.search.storage", "dptune.search.registry",
           "dptune.search.orphans"}


def layer_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1:
        return "foundation" if rel.stem in FOUNDATION else "package"
    return rel.parts[0]


def imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "dptune" or node.module.startswith("dptune."):
                # "from dptune.trainer import dp_step" imports the module dptune.trainer.dp_step
                names += [f"{node.module}.{a.name}" for a in node.names]
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) != "package")


def test_the_layers_cover_every_module():
    layers = {layer_of(p) for p in MODULES}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)
    assert len(MODULES) > 30


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    layer = layer_of(path)
    bad = []
    for name in imports(path):
        top = name.split(".")[0]
        if top in FORBIDDEN.get(layer, set()):
            bad.append(f"{name} (no {top} in {layer})")
        if top != "dptune" or name == "dptune":
            continue
        parts = name.split(".")
        if len(parts) < 2 or parts[1] in FOUNDATION or parts[1] == "__version__":
            continue
        target = parts[1]
        if target == layer:
            continue
        if target not in ALLOWED[layer]:
            bad.append(f"{name} ({layer} may not import {target})")
        elif layer == "inspect" and target == "search" and ".".join(parts[:3]) not in READERS:
            bad.append(f"{name} (inspection reads a storage: only {sorted(READERS)})")
    assert not bad, bad


def test_reading_a_study_and_the_privacy_calculator_load_no_jax():
    code = ("import sys, dptune, dptune.privacy.calculator, dptune.config.schema, dptune.search.results, "
            "dptune.inspect.report, dptune.inspect.export, dptune.inspect.dashboard\n"
            "dptune.summarize; dptune.epsilon; dptune.search_guarantee\n"
            "print(sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_trainer_runs_without_optuna_installed():
    # A finder that refuses optuna: the trainer layer, the data and the models import without it.
    code = ("import sys\n"
            "class NoOptuna:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'optuna': raise ImportError('optuna is not for the trainer')\n"
            "sys.meta_path.insert(0, NoOptuna())\n"
            "import dptune.trainer.run, dptune.trainer.train, dptune.trainer.feed, dptune.data.pipeline\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_one_clipping_engine_with_no_import_circle():
    # The step imports the engine, so the engine importing the step would be a circle; no module besides the
    # package re-exports the engine's names.
    engine = PACKAGE / "trainer" / "clipping"
    for path in engine.glob("*.py"):
        assert "dptune.trainer.dp_step" not in imports(path), path.name
    assert not (PACKAGE / "trainer" / "bookkeeping.py").exists()
    assert not (PACKAGE / "trainer" / "fastclip.py").exists()
