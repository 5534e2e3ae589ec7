"""Logging to stderr in a form that reads well on a terminal and in journald."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO

# syslog priorities, which journald reads from a "<N>" line prefix (sd-daemon(3)).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (JOURNAL_STREAM=dev:ino matches fd 2)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            message += "\n" + self.formatException(record.exc_info)
        if self.journal:  # journald adds time and unit; one priority prefix per line keeps levels right
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + line for line in message.splitlines() or [""])
        level = record.levelname.lower()
        return f"autocaption: {level}: {message}" if record.levelno != logging.INFO else f"autocaption: {message}"


# Warnings a library raises about its own bookkeeping, harmless to us: watchdog warns that it "overwrites"
# a callback when a watched subfolder is moved out and back in (it re-adds the folder's inotify watch).
_QUIET_WARNINGS = ("/watchdog/",)


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
    line: str | None = None,
) -> None:  # fmt: skip
    """Python warnings as one log line each (the default prints the warning and a line of source)."""
    level = logging.DEBUG if any(part in filename for part in _QUIET_WARNINGS) else logging.WARNING
    where = f"{os.path.basename(filename)}:{lineno}"
    logging.getLogger("autocaption").log(level, "%s: %s (%s)", category.__name__, str(message).splitlines()[0], where)


def setup(verbosity: int) -> None:
    """verbosity: -1 quiet (errors only), 0 normal, 1 verbose, 2 debug (libraries too)."""
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.DEBUG}.get(min(verbosity, 1), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(_stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    logging.getLogger("autocaption").setLevel(level)
    warnings.showwarning = _log_warning
