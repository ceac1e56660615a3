"""Shared test fixtures and helpers.

``run_cli`` runs the real ``dptune`` command in a fresh process (``python -m dptune.cli``) on the CPU
backend, as a user would; the ``cli`` fixture is the same function.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``dptune ARGS`` in a subprocess; returns its exit code, stdout and stderr."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dptune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli
