"""Imported by Python at the start of a process that a test gave ``tests.trial_deaths.env()``."""

import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trial_deaths.py")
_spec = importlib.util.spec_from_file_location("_dptune_test_trial_deaths", _path)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.install()
