"""Shared test fixtures and helpers.

``run_cli`` runs the real ``dptune`` command in a fresh process (``python -m dptune.cli``) on the CPU
backend, as a user would; the ``cli`` fixture is the same function.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """One JAX compilation cache for this session, shared by the tests and every process they start.

    Tests build the same small models many times over, in this process and in the ``dptune`` commands they run;
    XLA keys its cache on the compiled program, so each shape is compiled once per session. The directory is new
    each session (nothing carries over from the user's ``~/.cache``), so a run from a clean clone sees what CI sees.
    """
    if "DPTUNE_TEST_CACHE" in os.environ:
        return  # a test process started by a test: its parent set the cache up
    cache = tempfile.mkdtemp(prefix="dptune-tests-jax-")
    os.environ.update({"DPTUNE_TEST_CACHE": cache, "DPTUNE_CACHE_DIR": cache, "JAX_COMPILATION_CACHE_DIR": cache,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    config.stash[_CACHE] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CACHE in config.stash:
        shutil.rmtree(config.stash[_CACHE], ignore_errors=True)


def run_cli(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``dptune ARGS`` in a subprocess; returns its exit code, stdout and stderr."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dptune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The seed of this run's test order and random seeds (pytest-randomly), at the end where ``-q`` shows it."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order and seeds: replay them with --randomly-seed={seed}")
