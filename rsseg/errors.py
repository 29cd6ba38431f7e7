"""Errors that reach the user as one clear line.

Every failure a user can cause (a wrong name, a bad file, a missing dataset) is raised as an
``RssegError`` subclass. The CLI prints ``rsseg: error: <message>`` and exits with the error's
``exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations

import warnings


class RssegError(Exception):
    """Base class for user-facing errors. ``str(err)`` must be a single, self-contained line."""

    exit_code: int = 1


class UsageError(RssegError):
    """The user named something that does not exist (model, dataset, option value)."""

    exit_code = 2


class BundleError(RssegError):
    """A model bundle is missing, corrupted, altered, or inconsistent with its model."""


class DataError(RssegError):
    """Input data is missing, incomplete, or not what the command expects."""


class OutputError(RssegError):
    """An output cannot be written (exists without --overwrite, unwritable folder, bad suffix)."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> UsageError:
    """The standard error for an unknown model/dataset/... name, listing the valid ones."""
    return UsageError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


class RssegWarning(UserWarning):
    """Something the user should know that does not stop the command; shown as one
    ``rsseg: warning: ...`` line by the CLI."""


def warn(message: str) -> None:
    """Emit ``message`` as an :class:`RssegWarning` (one line, shown once per call site)."""
    warnings.warn(message, RssegWarning, stacklevel=2)
