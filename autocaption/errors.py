"""The few domain exceptions autocaption raises, and the exit codes they become.

Every message reads "what: reason" so it can be printed as one line. The CLI turns them into
exit codes in exactly one place (`autocaption.cli.main`).
"""

from __future__ import annotations

import errno
from enum import IntEnum

# Write failures that go away by themselves (space freed, quota raised, a file no longer busy): worth
# retrying later, unlike a read-only folder or a missing permission.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.EINTR})


class ExitCode(IntEnum):
    OK = 0
    FAILURES = 1  # the run finished but some files could not be described or written
    SETUP = 2  # configuration or model problem: nothing was processed
    CRASHED = 3  # a thread of the daemon died: it stops, so that the service manager restarts it
    INTERRUPTED = 130


class AutocaptionError(Exception):
    """Base class: an error the user can act on, printed as one line without a traceback."""

    exit_code = ExitCode.SETUP


class ConfigError(AutocaptionError):
    """The configuration file is missing, unreadable or invalid."""


class ModelUnavailable(AutocaptionError):
    """The model cannot be loaded (not on disk, hub unreachable, files incomplete)."""


class ImageError(AutocaptionError):
    """One image cannot be read or decoded; fatal for that image only."""

    exit_code = ExitCode.FAILURES


class WriteError(AutocaptionError):
    """A result cannot be written next to an image; fatal for that image only. `transient` ones (disk full)
    are retried later by the daemon."""

    exit_code = ExitCode.FAILURES

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    @classmethod
    def from_os(cls, what: str, exc: OSError) -> WriteError:
        """`what` ("photo.jpg: cannot write") and the system's reason, transient when it may pass."""
        return cls(f"{what}: {exc.strerror or exc}", transient=exc.errno in TRANSIENT_ERRNOS)


class EngineError(AutocaptionError):
    """The engine failed on a batch. `transient` errors (out of memory, server down) may be retried."""

    exit_code = ExitCode.FAILURES

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ServerUnreachable(EngineError):
    """A remote engine's server did not answer after its retries. The daemon retries later; a one-shot
    run stops, since every other image would wait for the same server."""

    exit_code = ExitCode.SETUP

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message, transient=True)
        self.answered = answered  # it did answer, badly (5xx, garbage), rather than not at all
