"""Typed errors raised by dptune's library code.

Library modules raise these; only the CLI turns them into one-line messages
and exit codes. Each message names the field at fault and what is allowed.
"""

from __future__ import annotations


class DptuneError(Exception):
    """Base class of every error dptune raises on purpose."""


class ConfigError(DptuneError, ValueError):
    """A user-supplied value (flag, config field) is invalid."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DataError(DptuneError):
    """A dataset cannot be found, read, or has an unexpected shape."""


class PrivacyError(DptuneError, ValueError):
    """A privacy parameter is out of range or a budget cannot be met."""


class StudyError(DptuneError):
    """A study cannot be created, found or continued."""
