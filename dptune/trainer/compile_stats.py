"""How much time this process has spent compiling JAX code, and where the cache lives.

The figure comes from JAX's own monitoring events (tracing, lowering, backend
compilation), so it is measured, not estimated from a slow first step.
"""

from __future__ import annotations

import os
import threading

import jax
from jax import monitoring

_PREFIX = "/jax/core/compile/"
_lock = threading.Lock()
_total = {"seconds": 0.0, "events": 0}


def _listener(event: str, duration_secs: float, **_: str | int) -> None:
    if event.startswith(_PREFIX):
        with _lock:
            _total["seconds"] += duration_secs
            if event.endswith("backend_compile_duration"):
                _total["events"] += 1


monitoring.register_event_duration_secs_listener(_listener)


def seconds() -> float:
    """Seconds spent tracing, lowering and compiling since the process started."""
    return _total["seconds"]


def backend_compiles() -> int:
    """Number of XLA backend compilations since the process started."""
    return int(_total["events"])


def default_cache_dir() -> str:
    """``$DPTUNE_CACHE_DIR`` or ``~/.cache/dptune/jax``."""
    return os.environ.get("DPTUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dptune", "jax")


def enable_persistent_cache(directory: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache so later processes skip compiling."""
    directory = directory or default_cache_dir()
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # an explicit choice is kept
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory
