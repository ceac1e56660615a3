"""The one way tests reach into the production path: named seams, empty in production.

A test that must break or stop a run (a deliberate privacy bug for ``dptune
audit`` to catch, a worker that dies mid-trial) does not get a call of its own
in production code. Instead production code marks, once, where something may be
put in:

* :func:`seam` decorates a function (the DP step, the Poisson sampler); a test
  may install a *wrapper* ``wrapper(original, *args, **kwargs)`` that is called
  instead, and decides what reaches the original;
* :func:`reached` marks a point (a trial about to train, a trial that reported);
  a test may install an *observer* called there with the point's arguments.

Nothing is installed unless test code calls :func:`install` (or :func:`installed`):
no setting, flag, file or environment variable of dptune's reaches this registry,
so in production every seam calls its function unchanged and every point does
nothing. Whoever installs must guard itself: :mod:`dptune.faults` refuses
without ``DPTUNE_TEST_ONLY_FAULTS``, the trial-death hooks of the tests run only
under pytest.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_installed: dict[str, Callable[..., Any]] = {}


def name_of(target: str | Callable[..., Any]) -> str:
    """The seam's name: a point's name, or ``module.qualname`` of a function marked with :func:`seam`."""
    return target if isinstance(target, str) else getattr(target, "seam_name", f"{target.__module__}."
                                                                               f"{target.__qualname__}")


def seam(fn: F) -> F:
    """Mark ``fn`` as replaceable by a test's wrapper (see the module docstring)."""
    name = name_of(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        wrapper = _installed.get(name)
        return fn(*args, **kwargs) if wrapper is None else wrapper(fn, *args, **kwargs)

    call.seam_name = name  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def reached(point: str, *args: Any) -> None:
    """A named point of the production path: calls the observer a test installed there, if any."""
    observer = _installed.get(point)
    if observer is not None:
        observer(*args)


def active(target: str | Callable[..., Any]) -> bool:
    """Whether a test installed something at ``target``."""
    return name_of(target) in _installed


def install(target: str | Callable[..., Any], hook: Callable[..., Any]) -> None:
    """Install ``hook`` at ``target`` (a function marked with :func:`seam`, or a point's name).

    Raises:
      RuntimeError: something is already installed there.
    """
    name = name_of(target)
    if name in _installed:
        raise RuntimeError(f"seam {name!r} is already taken")
    _installed[name] = hook


def uninstall(target: str | Callable[..., Any]) -> None:
    """Remove what was installed at ``target`` (nothing happens if nothing was)."""
    _installed.pop(name_of(target), None)


@contextlib.contextmanager
def installed(hooks: Mapping[str | Callable[..., Any], Callable[..., Any]]) -> Iterator[None]:
    """Install ``hooks`` (target -> hook) inside this block; all are removed on the way out."""
    done: list[str | Callable[..., Any]] = []
    try:
        for target, hook in hooks.items():
            install(target, hook)
            done.append(target)
        yield
    finally:
        for target in done:
            uninstall(target)
