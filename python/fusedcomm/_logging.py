"""The ``fusedcomm`` logger: quiet for library use, builds reported, progress on a terminal.

Loggers:
    fusedcomm                  everything (backend choices, skipped prebuilt modules, ...)
    fusedcomm.build            start and end of a kernel build, waits for another process's build
    fusedcomm.build.progress   one line per finished compile unit

Without FUSEDCOMM_LOGLEVEL: ``fusedcomm`` shows WARNING and above, ``fusedcomm.build`` INFO (a
first-use build takes tens of seconds and should not look like a hang), and
``fusedcomm.build.progress`` INFO only when stderr is a terminal. With FUSEDCOMM_LOGLEVEL all
three use that level. FUSEDCOMM_QUIET_BUILD=1 silences the build messages at any level.

Records are written to stderr by a handler on ``fusedcomm``. They also propagate, so an
application that configured logging receives them; when its root logger already prints to
stderr or stdout, our handler stays silent and nothing is printed twice.
"""

from __future__ import annotations

import logging
import sys
import warnings

from . import envs

logger = logging.getLogger("fusedcomm")
build_logger = logging.getLogger("fusedcomm.build")
progress_logger = logging.getLogger("fusedcomm.build.progress")


def _prints_to_console(handler: logging.Handler) -> bool:
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    return any(handler.stream is c for c in consoles if c is not None)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"fusedcomm: {text}"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (so captures work)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(
        self, value
    ) -> None:  # StreamHandler.__init__ assigns it; we always follow sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if any(_prints_to_console(h) for h in logging.getLogger().handlers):
            return  # the application's own console handler shows it
        super().emit(record)


_handler = StderrHandler()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def configure() -> None:
    """Apply FUSEDCOMM_LOGLEVEL (read now) to the three loggers; idempotent."""
    try:
        level = envs.log_level()
    except ValueError as e:
        warnings.warn(f"fusedcomm: {e}; using the default levels", stacklevel=2)
        level = None
    if level is not None:
        logger.setLevel(level)
        build_logger.setLevel(logging.NOTSET)
        progress_logger.setLevel(logging.NOTSET)
    else:
        logger.setLevel(logging.WARNING)
        build_logger.setLevel(logging.INFO)
        progress_logger.setLevel(logging.INFO if _stderr_is_tty() else logging.WARNING)
    if _handler not in logger.handlers:
        logger.addHandler(_handler)


configure()
