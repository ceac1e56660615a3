"""The storage schema is named in one module: dptune.search.record."""

from __future__ import annotations

import ast
import pathlib

import optuna

from dptune.search import record
from dptune.search.record import ResumeLink, StudyRecord

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dptune"
RECORD = PACKAGE / "search" / "record.py"

ATTR_NAMES = ("user_attrs", "system_attrs")
WRITERS = ("set_user_attr", "set_system_attr", "set_trial_user_attr", "set_trial_system_attr")


def _is_attrs(node: ast.AST, aliases: set[str]) -> bool:
    """``x.user_attrs``, ``x.system_attrs()``, ``x.trial_system_attrs(n)``, or a name bound to one of them."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr.endswith(ATTR_NAMES)
    return isinstance(node, ast.Name) and node.id in aliases


def _literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def storage_keys_named(path: pathlib.Path) -> list[str]:
    """Where ``path`` spells a storage key as a string literal: writes, reads, membership tests, dict literals."""
    tree = ast.parse(path.read_text())
    aliases = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and _is_attrs(node.value, set())
               for t in node.targets if isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr in WRITERS and node.args and _literal(node.args[-2] if f.attr.startswith("set_trial")
                                                             and len(node.args) == 3 else node.args[0]):
                found.append(f"{where} {f.attr}")
            if f.attr == "get" and _is_attrs(f.value, aliases) and node.args and _literal(node.args[0]):
                found.append(f"{where} .get")
            for kw in node.keywords:  # create_trial(user_attrs={...}), enqueue_trial(user_attrs={...})
                if kw.arg in ATTR_NAMES and isinstance(kw.value, ast.Dict) and any(map(_literal, kw.value.keys)):
                    found.append(f"{where} {kw.arg}=")
        if isinstance(node, ast.Subscript) and _is_attrs(node.value, aliases) and _literal(node.slice):
            found.append(f"{where} [...]")
        if (isinstance(node, ast.Compare) and _literal(node.left) and len(node.comparators) == 1
                and isinstance(node.ops[0], (ast.In, ast.NotIn)) and _is_attrs(node.comparators[0], aliases)):
            found.append(f"{where} in")
    return found


def test_only_the_record_module_names_storage_keys() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != RECORD
             for hit in storage_keys_named(path)]
    assert not found, found


def test_the_scan_sees_each_kind_of_use(tmp_path: pathlib.Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f(trial, study, b):\n"
        "    trial.set_user_attr('touched_data', True)\n"
        "    a = trial.user_attrs\n"
        "    x = a.get('steps'), a['delta'], 'retry_of' in trial.user_attrs\n"
        "    b.set_system_attr('dptune:study_id', 1)\n"
        "    b.storage.set_trial_user_attr(1, 'rejected_reason', 'x')\n"
        "    study.enqueue_trial({}, user_attrs={'retry_of': 1})\n"
        "    return study.system_attrs().get('k')\n")
    hits = storage_keys_named(probe)
    assert len(hits) == 8, hits


def test_old_and_new_studies_read_the_same() -> None:
    study = optuna.create_study()
    study.set_user_attr(record.CONFIG, {"study": {"validation_dataset": "digits"}})
    study.set_user_attr(record.DELTA, 1e-5)
    study.set_user_attr(record.PRIOR_EVENTS, [[0.01, 1.1, 100]])
    study.set_user_attr(record.SPLIT, {"train": 900, "validation": 100})
    rec = StudyRecord.of(study)
    assert rec.is_dptune and rec.delta == 1e-5 and rec.prior == ((0.01, 1.1, 100),)
    assert rec.validation_dataset == "digits" and rec.n_validation == 100 and rec.n_train == 900
    assert rec.private_search is None and not rec.non_private and rec.search_mode is None
    bare = StudyRecord.read({})
    assert not bare.is_dptune and bare.prior == () and bare.config == {}


def test_a_resume_link_round_trips() -> None:
    link = ResumeLink(3, 40, replayed=False, diverged_at=50)
    t = optuna.trial.create_trial(value=0.1, user_attrs={record.RESUMED_FROM: link.as_attr()})
    assert ResumeLink.of(t) == link
    assert ResumeLink.of(optuna.trial.create_trial(value=0.1)) is None
